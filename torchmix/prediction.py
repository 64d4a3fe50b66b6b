r"""Predictions of a fitted model for new data (MATH.md 9, "Prediction").

.. math:: \hat\eta_i = x_i^\top\hat\beta + o_i + \sum_{l\in\mathcal R} z^{(l)\top}_i\hat b^{(l)}_{g_l(i)}

with :math:`o_i` the offset and :math:`\mathcal R` the levels whose random effects are included (all by
default; none for population-level predictions, lme4's ``re.form = NA``). New data are prepared as the
fit's data were: the training centering means are re-applied (:class:`~torchmix.centering.Centering`),
the offset re-evaluated, and the model matrices rebuilt from the fit's formulaic specs. A factor level
not seen in fitting is an error naming the column and the level.
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import pandas as pd

from .design import Design, group_keys
from .errors import DataError

__all__ = ["as_frame", "check_factor_levels", "linear_predictor", "resolve_levels"]

_C_CALL = re.compile(r"^C\(\s*([A-Za-z_][A-Za-z0-9_.]*)\s*[,)]")


def as_frame(newdata) -> pd.DataFrame:
    """``newdata`` as a DataFrame: a DataFrame, or a dict of columns (scalars give one row)."""
    if isinstance(newdata, pd.DataFrame):
        return newdata
    if isinstance(newdata, dict):
        if all(np.ndim(v) == 0 for v in newdata.values()):
            return pd.DataFrame({k: [v] for k, v in newdata.items()})
        try:
            return pd.DataFrame(newdata)
        except ValueError as exc:
            raise DataError(f"newdata: cannot make a table of the dict: {exc}") from exc
    raise DataError(f"newdata must be a pandas DataFrame or a dict of columns, got {type(newdata).__name__}")


def check_factor_levels(spec, data: pd.DataFrame, what: str) -> None:
    """Raise a DataError naming column and level when ``data`` holds a category not seen in fitting."""
    for expr, (kind, state) in getattr(spec, "encoder_state", {}).items():
        if "categorical" not in str(kind).lower() or "categories" not in state:
            continue
        col = expr if expr in data.columns else None
        if col is None:
            m = _C_CALL.match(expr)
            col = m.group(1) if m and m.group(1) in data.columns else None
        if col is None:
            continue
        known = set(state["categories"])
        values = data[col].dropna()
        unseen = [v for v in pd.unique(values) if v not in known and str(v) not in {str(k) for k in known}]
        if unseen:
            raise DataError(f"newdata column {col!r} has level(s) {unseen[:5]} not seen in fitting ({what}); "
                            f"known levels: {list(state['categories'])[:10]}")


def _matrix(spec, data: pd.DataFrame, what: str) -> np.ndarray:
    check_factor_levels(spec, data, what)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mm = spec.get_model_matrix(data, na_action="ignore")
    for w in caught:
        if "outside of the nominated levels" in str(w.message):
            raise DataError(f"newdata has a factor level not seen in fitting ({what}): {w.message}")
    return np.asarray(mm, dtype=float)


def resolve_levels(design: Design, include_random) -> list:
    """Names of the grouping levels whose random effects enter the prediction."""
    names = [info.name for info in design.levels]
    if include_random is True:
        return names
    if include_random is False or include_random is None:
        return []
    chosen = [include_random] if isinstance(include_random, str) else list(include_random)
    unknown = [c for c in chosen if c not in names]
    if unknown:
        raise DataError(f"include_random: unknown grouping factor(s) {unknown}; the model has {names}")
    return chosen


def required_columns(design: Design, levels: list) -> list:
    """Data columns a prediction reads."""
    cols = set(getattr(design.fixed_spec, "required_variables", set()))
    for info in design.levels:
        if info.name in levels:
            cols.update(info.group_vars)
            for _, spec, _ in info.term_specs:
                cols.update(getattr(spec, "required_variables", set()))
    cols.update(design.offset.required_columns())
    return sorted(cols)


def linear_predictor(design: Design, beta: np.ndarray, ranef: list, newdata: pd.DataFrame,
                     allow_new_levels: bool = False, include_random=True) -> np.ndarray:
    r""":math:`\hat\eta` for the rows of ``newdata`` (NaN where a needed value is missing).

    Parameters
    ----------
    design : the fit's design; beta : ``(p_kept,)``; ranef : per level ``(G_l, q_l)`` arrays of :math:`\hat b`.
    newdata : DataFrame on the original (uncentred) scale.
    allow_new_levels : a group id not seen in fitting predicts with :math:`b = 0` instead of an error.
    include_random : True (all levels), False (none), or names of grouping factors to include.
    """
    levels = resolve_levels(design, include_random)
    cols = required_columns(design, levels)
    missing = [c for c in cols if c not in newdata.columns]
    if missing:
        raise DataError(f"newdata lacks column(s) {missing}")
    ok = newdata[cols].notna().all(axis=1).to_numpy() if cols else np.ones(len(newdata), bool)
    out = np.full(len(newdata), np.nan)
    nd = newdata.loc[ok]
    if not len(nd):
        return out
    offset = design.offset.evaluate(nd)
    nd = design.centering.apply(nd, allow_new_levels=allow_new_levels)
    x = _matrix(design.fixed_spec, nd, "fixed effects")
    keep = [design.all_fixed_names.index(n) for n in design.fixed_names]
    eta = x[:, keep] @ beta
    if offset is not None:
        eta = eta + offset
    for info, b in zip(design.levels, ranef):
        if info.name not in levels:
            continue
        keys = group_keys(nd, info.group_vars)
        codes = info.labels.get_indexer(keys)
        new = codes < 0
        if new.any() and not allow_new_levels:
            raise DataError(f"newdata has {int(new.sum())} row(s) in group(s) of {info.name!r} not seen "
                            f"in fitting (e.g. {list(pd.unique(keys[new]))[:5]}); pass "
                            "allow_new_levels=True to predict them with random effects 0")
        z = np.concatenate([_matrix(spec, nd, f"random effects of {info.name!r}")[:, sl]
                            for _, spec, sl in info.term_specs], axis=1)
        contrib = (z * b[np.where(new, 0, codes)]).sum(1)
        eta = eta + np.where(new, 0.0, contrib)
    out[ok] = eta
    return out
