r"""Offsets: known terms added to the linear predictor, :math:`\eta = X\beta + Zb + o`.

An offset comes from ``offset(expr)`` terms of the formula (``expr`` is evaluated by formulaic, the
machinery of the fixed part, e.g. ``offset(log(n))``) and/or the ``offset=`` argument of
:func:`~torchmix.mix` (a column name). Several offsets add up. The gaussian family fits
:math:`y - o` in closed form; the other families carry :math:`o` inside the quadrature; predictions
add it back.
"""

from __future__ import annotations

from typing import Optional, Sequence

import formulaic
import numpy as np
import pandas as pd

from .errors import DataError, FormulaError
from .formula_context import evaluation_context
from .formula_safety import part_columns

__all__ = ["OffsetSpec", "offset_spec"]


class OffsetSpec:
    """The offset of a model: formula expressions plus an optional data column.

    Parameters
    ----------
    expressions : ``offset(...)`` contents from the formula.
    column : name of a numeric column given as ``offset=``, or None.
    """

    def __init__(self, expressions: Sequence[str] = (), column: Optional[str] = None):
        if column is not None and not isinstance(column, str):
            raise DataError(f"offset must be a column name (a string), got {type(column).__name__}")
        self.expressions = tuple(expressions)
        self.column = column
        self.context = None  # names the expressions may resolve (formula_context); None = the default allow-list
        self.transforms = ()  # names of the caller's extra transforms the expressions may call

    def __bool__(self) -> bool:
        return bool(self.expressions) or self.column is not None

    def __repr__(self) -> str:
        parts = [f"offset({e})" for e in self.expressions] + ([repr(self.column)] if self.column else [])
        return " + ".join(parts) if parts else "no offset"

    def required_columns(self) -> list[str]:
        """Data columns the offset reads."""
        cols: list[str] = []
        for e in self.expressions:  # checked against the allow-list before formulaic sees them
            names = part_columns(e, f"offset({e})", f"offset({e})", tuple(self.transforms), lhs=True)
            cols += [c for c in names if c not in cols]
        if self.column is not None and self.column not in cols:
            cols.append(self.column)
        return cols

    def evaluate(self, data: pd.DataFrame) -> Optional[np.ndarray]:
        """The offset of every row of ``data`` (``(n,)`` float), or None without an offset.

        Raises
        ------
        DataError when a value is not finite (naming the term) or the column is missing or not numeric;
        FormulaError when an expression gives more than one column.
        """
        if not self:
            return None
        total = np.zeros(len(data))
        for e in self.expressions:
            try:
                context = self.context if self.context is not None else evaluation_context()
                lhs = formulaic.model_matrix(f"{e} ~ 1", data, na_action="ignore", context=context).lhs
            except Exception as exc:
                raise FormulaError(f"cannot evaluate offset({e}): {exc}") from exc
            if lhs.shape[1] != 1:
                raise FormulaError(f"offset({e}) must give one column, got {list(lhs.columns)}; "
                                   "write arithmetic inside I(...)")
            total = total + self._finite(np.asarray(lhs, dtype=float).ravel(), f"offset({e})")
        if self.column is not None:
            if self.column not in data.columns:
                raise DataError(f"offset column {self.column!r} not found in data")
            if not pd.api.types.is_numeric_dtype(data[self.column]):
                raise DataError(f"offset column {self.column!r} is not numeric")
            total = total + self._finite(data[self.column].to_numpy(dtype=float), f"offset column {self.column!r}")
        return total

    @staticmethod
    def _finite(values: np.ndarray, what: str) -> np.ndarray:
        bad = ~np.isfinite(values)
        if bad.any():
            raise DataError(f"{what} is not finite on {int(bad.sum())} row(s) (e.g. log of 0 or a negative "
                            "exposure); drop or fix those rows")
        return values


def offset_spec(parsed, column: Optional[str] = None) -> OffsetSpec:
    """The :class:`OffsetSpec` of a parsed formula plus an ``offset=`` column."""
    return OffsetSpec(getattr(parsed, "offsets", ()), column)
