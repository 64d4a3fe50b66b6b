r"""Sampling weights: argument checks, within-group constancy, conditional <-> unconditional.

MATH.md 2.1. With unconditional inputs :math:`(w^{(1)}, \dots, w^{(L)})`:
:math:`w_{i\mid j} = w^{(1)}_i / w^{(2)}_{j(i)}`, :math:`w_{j\mid k} = w^{(2)}_j / w^{(3)}_{k(j)}`, ...
With conditional inputs :math:`(c_1, \dots, c_L)`: :math:`w^{(L)} = c_L` and, going down,
:math:`w^{(l)} = c_l\, w^{(l+1)}_{\text{parent}}`.

Arrays here are numpy; each level's array has one entry per unit of that level
(rows at level 1, groups above).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from .errors import WeightError

__all__ = ["weight_columns", "check_weight_values", "check_weight_range", "group_constant", "to_conditional", "to_unconditional", "weight_stats"]

CONSTANCY_TOL = 1e-8


def weight_columns(weights, data: pd.DataFrame) -> list[str] | None:
    """Validate the ``weights`` argument: None, one column name, or a list of names (level 1 first).

    Raises
    ------
    WeightError
        If it is not a string or a list of strings, or names columns absent from ``data``
        (all missing names are listed).
    """
    if weights is None:
        return None
    if isinstance(weights, str):
        weights = [weights]
    if not isinstance(weights, (list, tuple)) or not all(isinstance(w, str) for w in weights):
        raise WeightError(f"weights must be a list of column names (level 1 first), got {weights!r}")
    missing = [w for w in weights if w not in data.columns]
    if missing:
        raise WeightError(f"weight column(s) not found in data: {', '.join(map(repr, missing))}")
    return list(weights)


def check_weight_values(data: pd.DataFrame, columns) -> None:
    """Reject weight columns that cannot be sampling weights: boolean, or with infinite values.

    Missing and non-positive weights are handled later (their rows are dropped with a warning).

    Raises
    ------
    WeightError
        Naming the column: a boolean column (True/False is not a weight; subset the data instead),
        or a column with infinite values (with their count).
    """
    for col in columns or []:
        if col not in data.columns:
            continue
        values = data[col]
        if pd.api.types.is_bool_dtype(values.dtype) or (
                values.dtype == object and values.map(lambda v: isinstance(v, (bool, np.bool_))).any()):
            raise WeightError(f"weight column {col!r} is boolean; weights must be positive numbers "
                              "(to fit a subset, select its rows from the data instead)")
        num = pd.to_numeric(values, errors="coerce").to_numpy(dtype=float, na_value=np.nan)
        n_inf = int(np.isinf(num).sum())
        if n_inf:
            raise WeightError(f"weight column {col!r} has infinite values in {n_inf} row(s); weights must be "
                              "finite positive numbers")
        check_weight_range(num[np.isfinite(num) & (num > 0)], col)


def check_weight_range(positive: np.ndarray, column: str) -> None:
    r"""Reject positive weights that float64 arithmetic cannot carry.

    A weight below the smallest normal float64 (subnormal), a column whose sum overflows, or
    weights spanning more than :math:`1/\epsilon \approx 4.5\times10^{15}` (the smallest would vanish
    next to the largest in every weighted sum) is a :class:`~torchmix.errors.WeightError`. The rule
    depends on ratios and on float64's range only, not on the units of the weights.
    """
    if positive.size == 0:
        return
    tiny, big = float(positive.min()), float(positive.max())
    if tiny < np.finfo(np.float64).tiny:
        raise WeightError(f"weight column {column!r} has values below {np.finfo(np.float64).tiny:.3g} (subnormal "
                          "numbers), which float64 arithmetic cannot carry; check the column")
    if not np.isfinite(positive.sum(dtype=np.float64)):
        raise WeightError(f"weight column {column!r} is too large to add up in float64 (largest {big:.3g}); "
                          "divide it by a constant")
    if big / tiny > 1.0 / np.finfo(np.float64).eps:
        raise WeightError(f"weight column {column!r} spans more than {1 / np.finfo(np.float64).eps:.2g} from its "
                          f"smallest ({tiny:.3g}) to its largest ({big:.3g}) value: the smallest weights would "
                          "vanish in every weighted sum; check the column")


def group_constant(values: np.ndarray, codes: np.ndarray, n_groups: int, column: str,
                   level_name: str, labels: Sequence) -> np.ndarray:
    r"""Per-group value of a weight that must be constant within groups.

    A group whose values have :math:`(\max-\min)/\max > 10^{-8}` is an error.

    Parameters
    ----------
    values : ``(N,)`` row values; codes : ``(N,)`` int group codes.

    Returns
    -------
    ``(n_groups,)`` the value of each group.

    Raises
    ------
    WeightError
        Listing (up to 10 of) the offending groups and their spread.
    """
    gmax = np.full(n_groups, -np.inf)
    gmin = np.full(n_groups, np.inf)
    np.maximum.at(gmax, codes, values)
    np.minimum.at(gmin, codes, values)
    spread = (gmax - gmin) / np.abs(gmax)
    bad = np.flatnonzero(spread > CONSTANCY_TOL)
    if bad.size:
        shown = ", ".join(f"{labels[g]!r} (min {gmin[g]:.6g}, max {gmax[g]:.6g})" for g in bad[:10])
        more = f" and {bad.size - 10} more" if bad.size > 10 else ""
        raise WeightError(
            f"weight column {column!r} is the weight of level {level_name!r} and must be constant within "
            f"its groups, but it varies in {bad.size} group(s): {shown}{more}")
    return gmax


def to_conditional(uncond: Sequence[np.ndarray], maps: Sequence[np.ndarray]) -> list[np.ndarray]:
    r"""Unconditional -> conditional weights.

    Parameters
    ----------
    uncond : per level ``[w1 (N,), w2 (G2,), ..., wL (GL,)]``.
    maps : per level below the top, the index of each unit's parent:
        ``[row -> level-2 group (N,), level-2 -> level-3 (G2,), ...]`` (length L-1).

    Returns
    -------
    ``[w_{i|j} (N,), w_{j|k} (G2,), ..., w^{(L)} (GL,)]``; the top level stays unconditional.
    """
    out = [u / uncond[l + 1][maps[l]] for l, u in enumerate(uncond[:-1])]
    return out + [uncond[-1]]


def to_unconditional(cond: Sequence[np.ndarray], maps: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Conditional -> unconditional weights (cumulative products from the top down).

    Same layout as :func:`to_conditional`.
    """
    out = [None] * len(cond)
    out[-1] = cond[-1]
    for l in range(len(cond) - 2, -1, -1):
        out[l] = cond[l] * out[l + 1][maps[l]]
    return out


def weight_stats(uncond: Sequence[np.ndarray]) -> list[dict]:
    """Mean, sum, min and max of the unconditional weights of each level (WeMix ``wgtStats``)."""
    return [dict(mean=float(np.mean(w)), sum=float(np.sum(w)), min=float(np.min(w)), max=float(np.max(w)))
            for w in uncond]
