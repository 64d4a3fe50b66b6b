r"""Replicate refits: the same model with the weights of the top-level units multiplied by factors.

A replicate changes only the weight of each top-level unit (PSU): with factor :math:`a_k` for
top-level group :math:`k`, its weight becomes :math:`a_k w^{(L)}_k`, every unconditional weight
below it (levels :math:`1..L-1`) is multiplied by the same :math:`a_k`, and all conditional
weights stay as they are. Everything else -- the design, the response, the per-group structure --
is shared. Each replicate starts from the full-sample solution.

Pure tensor math: no pandas.
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from typing import Callable

import torch
from tqdm.auto import tqdm

from ..errors import ConvergenceWarning
from ..tensors import FitOutput, ModelTensors

__all__ = ["scale_top_weights", "estimate_vector", "refit_replicates"]


def scale_top_weights(tensors: ModelTensors, factors: torch.Tensor) -> ModelTensors:
    r"""The model with top-level weights :math:`a_k w^{(L)}_k` (and unconditional weights below scaled alike).

    Parameters
    ----------
    tensors : the full-sample model.
    factors : ``(G_L,)`` non-negative factor of each top-level group.

    Returns
    -------
    :class:`~torchmix.tensors.ModelTensors` sharing every other tensor with ``tensors``.
    """
    a = factors.to(device=tensors.X.device, dtype=tensors.X.dtype)
    n_lv = len(tensors.levels)
    levels = []
    for l, lv in enumerate(tensors.levels):
        f = a[lv.top]
        if l == n_lv - 1:
            levels.append(replace(lv, w_cond=lv.w_cond * f, w_uncond=lv.w_uncond * f))
        else:
            levels.append(replace(lv, w_uncond=lv.w_uncond * f))
    return replace(tensors, levels=tuple(levels), w1_uncond=tensors.w1_uncond * a[tensors.row_top])


def estimate_vector(out: FitOutput) -> torch.Tensor:
    """``(p + n_tau,)``: fixed effects then variance components (reporting order), one fit."""
    return torch.cat([out.beta.reshape(-1), out.tau.reshape(-1)]).detach()


def refit_replicates(tensors: ModelTensors, factors: torch.Tensor, fit: Callable, start: torch.Tensor,
                     progress=None) -> tuple[torch.Tensor, int]:
    r"""Refit the model once per replicate.

    Parameters
    ----------
    tensors : the full-sample model (its response included).
    factors : ``(R, G_L)`` replicate factors.
    fit : ``fit(tensors, start) -> FitOutput``.
    start : ``(p + n_tau,)`` full-sample estimates, the start of every replicate.
    progress : optional tqdm bar, advanced once per replicate.

    Returns
    -------
    estimates : ``(R, p + n_tau)``; n_failed : number of replicates that did not converge
    (their estimates are kept, as in the R ``survey`` package).
    """
    rows, n_failed = [], 0
    for r in range(factors.shape[0]):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = fit(scale_top_weights(tensors, factors[r]), start)
        if not out.converged or any(issubclass(w.category, ConvergenceWarning) for w in caught):
            n_failed += 1
        rows.append(estimate_vector(out))
        if progress is not None:
            progress.update(1)
    return torch.stack(rows), n_failed


def make_progress(total: int, enabled: bool):
    """One progress bar over every replicate fit (replicates x plausible values)."""
    return tqdm(total=total, desc="replicates", unit="fit", disable=not enabled, leave=False, delay=1.0)
