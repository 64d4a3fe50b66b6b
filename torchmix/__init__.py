"""torchmix: survey-weighted multilevel (mixed-effects) models in PyTorch."""

from .data import list_datasets, load_dataset
from .errors import (BoundaryWarning, ConfigError, ConvergenceWarning, DataError, DataWarning, FormulaError,
                     NumericalError, TorchmixError, TorchmixWarning, WeightError)

__version__ = "0.1.0"

__all__ = [
    "list_datasets", "load_dataset",
    "TorchmixError", "FormulaError", "DataError", "WeightError", "ConfigError", "NumericalError",
    "TorchmixWarning", "DataWarning", "ConvergenceWarning", "BoundaryWarning",
]
