r"""Identifiability checks on a built model, before any fitting.

Each check turns a model whose parameters are not identified (or whose likelihood has no maximum)
into a typed error that names the cause, instead of a fit that looks converged:

* a random term without columns, e.g. ``(0 | g)`` -> :class:`~torchmix.errors.FormulaError`;
* a random-effect column that is zero in every row (a random slope on an all-zero column) ->
  :class:`~torchmix.errors.DataError` naming the column;
* a single top-level group (the sandwich over one cluster is zero, the top variance is not
  identified) -> :class:`~torchmix.errors.DataError`;
* gaussian family: a constant response (the residual variance would be zero), and every group of the
  lowest level having one row (the residual and the level-2 variance are not separately identified);
* binomial family: every response 0, or every response 1 (the intercept runs to :math:`\mp\infty`),
  and single 0/1 observations in every lowest-level group (the variance is not identified);
  poisson family: every count 0.

Works on :class:`~torchmix.design.Design` labels and tensors; no fitting, no pandas I/O.
"""

from __future__ import annotations

import numpy as np
import torch

from .errors import ConfigError, DataError, FormulaError

__all__ = ["check_identifiable", "check_start"]


def _term_text(info, t: int) -> str:
    spec = info.term_specs[t] if t < len(info.term_specs) else None
    expr = spec[0] if isinstance(spec, (tuple, list)) and spec else "?"
    return f"({expr} | {info.name})"


def check_identifiable(design, family_name: str, y: torch.Tensor) -> None:
    """Raise a typed error when the model's parameters are not identified (see the module docstring).

    Parameters
    ----------
    design : :class:`~torchmix.design.Design`.
    family_name : ``"gaussian"``, ``"binomial"``, ``"poisson"`` or another family's name.
    y : ``(N,)`` validated response.

    Raises
    ------
    FormulaError, DataError
    """
    tensors = design.tensors
    for info, lv in zip(design.levels, tensors.levels):
        for t, q in enumerate(lv.term_sizes):
            if q == 0:
                raise FormulaError(f"the random term {_term_text(info, t)} has no random effects (no columns); "
                                   "remove it or give it at least one column, e.g. (1 | "
                                   f"{info.name})")
        if lv.Z.shape[1]:
            zero = (lv.Z == 0).all(dim=0)
            if bool(zero.any()):
                names = [info.effect_names[j] for j in torch.nonzero(zero).flatten().tolist()]
                raise DataError(f"random-effect column(s) {', '.join(map(repr, names))} of grouping factor "
                                f"{info.name!r} are zero in every row: their variance is not identified")
    top = tensors.levels[-1]
    if top.n_groups < 2:
        raise DataError(f"grouping factor {design.levels[-1].name!r} has a single group: its variance is not "
                        "identified and cluster-robust standard errors need at least two top-level groups")
    if family_name == "gaussian":
        if bool((y == y[0]).all()):
            raise DataError(f"the response {design.response!r} is constant ({float(y[0]):g}); "
                            "the residual variance would be zero")
        low = tensors.levels[0]
        sizes = torch.bincount(low.group, minlength=low.n_groups)
        if int(sizes.max()) <= 1:
            raise DataError(f"every group of {design.levels[0].name!r} has a single observation: the residual "
                            "variance and the variance of its random effects are not separately identified")
    elif family_name == "binomial":
        if bool((y == 0).all()) or bool((y == 1).all()):
            raise DataError(f"the binomial response {design.response!r} is {int(y[0])} in every row: the "
                            "fixed effects have no finite maximum likelihood estimate")
        low = tensors.levels[0]
        sizes = torch.bincount(low.group, minlength=low.n_groups)
        if int(sizes.max()) <= 1 and bool(((y == 0) | (y == 1)).all()):
            raise DataError(f"every group of {design.levels[0].name!r} has a single 0/1 observation: the variance "
                            "of its random effects is not identified")
    elif family_name == "poisson":
        if bool((y == 0).all()):
            raise DataError(f"the poisson response {design.response!r} is 0 in every row: the fixed effects "
                            "have no finite maximum likelihood estimate")


def check_start(start):
    """``start`` as a flat float64 array of finite numbers, or None.

    Raises
    ------
    ConfigError
        When ``start`` is not a sequence of numbers.
    DataError
        When it is empty or has non-finite values.
    """
    if start is None:
        return None
    if isinstance(start, (str, bytes, dict)):
        raise ConfigError(f"start must be a list of numbers (fixed effects, then variance components), got {start!r}")
    try:
        arr = np.asarray(start, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise ConfigError("start must be a list of numbers (fixed effects, then variance components), got "
                          f"{type(start).__name__}") from None
    if arr.size == 0:
        raise DataError("start is empty; give the fixed effects, then the variance components")
    if not np.isfinite(arr).all():
        raise DataError(f"start has non-finite values at position(s) {np.flatnonzero(~np.isfinite(arr)).tolist()}")
    return arr
