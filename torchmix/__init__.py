"""torchmix: survey-weighted multilevel (mixed-effects) models in PyTorch.

The errors are imported at once; ``mix``, the results class and the datasets on first use (they
pull in torch, pandas and formulaic, which take a second or more to import), so that
``import torchmix`` and the command line's quick paths stay fast.
"""

from .errors import (BoundaryWarning, ConfigError, ConvergenceWarning, DataError, DataWarning, FormulaError,
                     NumericalError, SmallSampleWarning, TorchmixError, TorchmixWarning, WeightError)

__version__ = "0.1.0"

__all__ = [
    "mix", "lrt", "MixedResults", "list_datasets", "load_dataset",
    "TorchmixError", "FormulaError", "DataError", "WeightError", "ConfigError", "NumericalError",
    "TorchmixWarning", "DataWarning", "ConvergenceWarning", "BoundaryWarning", "SmallSampleWarning",
]

_LAZY = {"mix": ".api", "lrt": ".report.comparison", "MixedResults": ".results", "list_datasets": ".data", "load_dataset": ".data"}


def __getattr__(name):
    if name in _LAZY:
        from importlib import import_module
        value = getattr(import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
