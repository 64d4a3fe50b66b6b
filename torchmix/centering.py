r"""Weighted group- and grand-mean centering (MATH.md 9), remembered for prediction.

Group first, then grand:

.. math:: \tilde x_i = x_i-\frac{\sum_{i'\in g(i)}w_{i'}x_{i'}}{\sum_{i'\in g(i)}w_{i'}},\qquad
          \tilde x_i \leftarrow \tilde x_i-\frac{\sum_i w_i\tilde x_i}{\sum_i w_i},

with :math:`w` the unconditional level-1 weights. :class:`Centering` keeps the training means so that
:meth:`Centering.apply` centres new data exactly as the fit's data were centred (on the training rows it
reproduces the training values).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .errors import DataError

__all__ = ["Centering", "center_data"]


def _group_keys(data: pd.DataFrame, group_vars) -> pd.Series:
    if len(group_vars) == 1:
        return data[group_vars[0]]
    return data[list(group_vars)].astype(str).agg(":".join, axis=1)


@dataclass
class Centering:
    """Training means of a centred fit.

    Attributes
    ----------
    group : list of ``(factor name, group columns, variable, Series of means indexed by group id)``.
    grand : list of ``(variable, mean)``, applied after the group centering.
    """

    group: list = field(default_factory=list)
    grand: list = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.group) or bool(self.grand)

    @property
    def variables(self) -> list[str]:
        return list(dict.fromkeys([v for _, _, v, _ in self.group] + [v for v, _ in self.grand]))

    def apply(self, data: pd.DataFrame, allow_new_levels: bool = False) -> pd.DataFrame:
        """Centre ``data`` (a copy) with the training means.

        A group not seen in fitting has no training mean: an error, unless ``allow_new_levels``, in
        which case the unweighted mean of its rows in ``data`` is used.
        """
        if not self:
            return data
        data = data.copy()
        for name, gvars, var, means in self.group:
            keys = _group_keys(data, gvars)
            mean = keys.map(means)
            new = mean.isna() & keys.notna()
            if new.any():
                if not allow_new_levels:
                    raise DataError(f"newdata has group(s) of {name!r} not seen in fitting (e.g. "
                                    f"{list(pd.unique(keys[new]))[:5]}), so {var!r} cannot be centred with the "
                                    "training group means; pass allow_new_levels=True to centre them at their "
                                    "own (unweighted) means in newdata")
                own = pd.to_numeric(data[var], errors="coerce").groupby(keys).transform("mean")
                mean = mean.where(~new, own)
            data[var] = pd.to_numeric(data[var], errors="coerce") - mean.to_numpy(dtype=float)
        for var, mean in self.grand:
            data[var] = pd.to_numeric(data[var], errors="coerce") - mean
        return data


def _check_vars(data: pd.DataFrame, vars_, arg: str) -> list:
    if isinstance(vars_, str):
        vars_ = [v.strip() for v in vars_.lstrip("~").split("+")]
    if not isinstance(vars_, (list, tuple)):
        raise DataError(f"{arg} must list column names, got {vars_!r}")
    for v in vars_:
        if v not in data.columns:
            raise DataError(f"{arg}: column {v!r} not found in data")
        if not pd.api.types.is_numeric_dtype(data[v]):
            raise DataError(f"{arg}: column {v!r} is not numeric and cannot be centred")
    return list(vars_)


def center_data(data: pd.DataFrame, w1: np.ndarray, center_group, center_grand, groups: dict):
    """Weighted group- then grand-mean centering of numeric columns.

    Parameters
    ----------
    data : the cleaned rows; w1 : ``(n,)`` unconditional level-1 weights.
    center_group : ``{factor: [columns]}`` or None; center_grand : ``[columns]`` or None.
    groups : factor name -> ``(codes (n,), labels, group columns)``.

    Returns
    -------
    (centred copy of ``data``, :class:`Centering`).
    """
    spec = Centering()
    if not center_group and not center_grand:
        return data, spec
    data = data.copy()
    if center_group:
        if not isinstance(center_group, dict):
            raise DataError("center_group must map a grouping factor to a list of columns, "
                            f"e.g. {{'school': ['ses']}}, got {center_group!r}")
        for gname, vars_ in center_group.items():
            gvars = tuple(s.strip() for s in gname.replace("/", ":").split(":"))
            key = ":".join(gvars)
            if key not in groups:
                raise DataError(f"center_group: {gname!r} is not a grouping factor of the model "
                                f"(grouping factors: {', '.join(map(repr, groups))})")
            codes, labels, group_vars = groups[key]
            for v in _check_vars(data, vars_, "center_group"):
                x = data[v].to_numpy(dtype=float)
                means = np.bincount(codes, weights=w1 * x) / np.bincount(codes, weights=w1)
                data[v] = x - means[codes]
                spec.group.append((key, tuple(group_vars), v, pd.Series(means, index=labels)))
    if center_grand:
        for v in _check_vars(data, center_grand, "center_grand"):
            x = data[v].to_numpy(dtype=float)
            mean = float(np.sum(w1 * x) / np.sum(w1))
            data[v] = x - mean
            spec.grand.append((v, mean))
    return data, spec
