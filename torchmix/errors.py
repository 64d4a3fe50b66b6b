"""Errors and warnings raised by torchmix, grouped by pipeline stage.

Every error subclasses both :class:`TorchmixError` and the closest builtin
(``ValueError`` or ``ArithmeticError``) so that ordinary ``except`` clauses work.
"""

from __future__ import annotations

__all__ = [
    "TorchmixError",
    "FormulaError",
    "DataError",
    "WeightError",
    "ConfigError",
    "NumericalError",
    "DistributedError",
    "TorchmixWarning",
    "DataWarning",
    "ConvergenceWarning",
    "BoundaryWarning",
    "SmallSampleWarning",
]


class TorchmixError(Exception):
    """Base class of every error torchmix raises on purpose."""


class FormulaError(TorchmixError, ValueError):
    """The model formula cannot be parsed or does not fit the data (bars, nesting, columns)."""


class DataError(TorchmixError, ValueError):
    """The data or an argument describing it is unusable (types, columns, response domain)."""


class WeightError(DataError):
    """The sampling weights are unusable (missing columns, wrong count, varying within a group)."""


class ConfigError(TorchmixError, ValueError):
    """A run configuration or an option value is invalid (unknown key, family, link, survey)."""


class NumericalError(TorchmixError, ArithmeticError):
    """The computation failed numerically (non-finite likelihood, singular information)."""


class DistributedError(TorchmixError, RuntimeError):
    """A fit spanning several processes could not go on: another process failed, left, or did not
    answer within the collective timeout (:mod:`torchmix.distributed.collectives`)."""


class TorchmixWarning(UserWarning):
    """Base class of torchmix warnings."""


class DataWarning(TorchmixWarning):
    """Rows were dropped or data were changed before fitting (missing values, zero weights)."""


class ConvergenceWarning(TorchmixWarning):
    """The optimiser stopped before its convergence test passed."""


class BoundaryWarning(TorchmixWarning):
    """An estimate lies on the boundary of the parameter space (a variance of zero)."""


class SmallSampleWarning(TorchmixWarning):
    """An inference rests on few top-level clusters (the sandwich standard errors are biased down)."""
