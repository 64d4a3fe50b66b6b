"""torchmix: survey-weighted multilevel (mixed-effects) models in PyTorch."""

from .api import mix
from .data import list_datasets, load_dataset
from .errors import (BoundaryWarning, ConfigError, ConvergenceWarning, DataError, DataWarning, FormulaError,
                     NumericalError, TorchmixError, TorchmixWarning, WeightError)
from .results import MixedResults

__version__ = "0.1.0"

__all__ = [
    "mix", "MixedResults", "list_datasets", "load_dataset",
    "TorchmixError", "FormulaError", "DataError", "WeightError", "ConfigError", "NumericalError",
    "TorchmixWarning", "DataWarning", "ConvergenceWarning", "BoundaryWarning",
]
