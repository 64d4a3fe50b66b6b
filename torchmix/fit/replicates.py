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

from ..covariance import diagonal_theta_mask, lambda_from_theta, n_theta, tau_from_lambda
from ..errors import ConvergenceWarning
from ..likelihood.gaussian import GaussianLikelihood
from ..tensors import FitOutput, ModelTensors
from .optimize import minimize

__all__ = ["scale_top_weights", "estimate_vector", "gaussian_estimates", "refit_replicates"]

BOUNDARY_TOL = 1e-6


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


def gaussian_estimates(tensors: ModelTensors, theta0: torch.Tensor, *, max_iter: int = 200,
                       tol: float = 1e-8) -> tuple[torch.Tensor, bool]:
    r"""Estimates only (no standard errors) of the gaussian model, from a warm start.

    Minimises :math:`-\ell_p(\theta)/N_w` from ``theta0`` (Newton first, then L-BFGS if needed),
    then :math:`\hat\beta, \hat\sigma^2` in closed form and
    :math:`\tau_l = \operatorname{free}(\hat\sigma^2\Lambda_l\Lambda_l^\top)`, with diagonal
    :math:`\theta` entries below 1e-6 set to zero as in the full fit.

    Returns
    -------
    ``(p + n_tau,)`` fixed effects then variance components (residual last); converged flag.
    """
    lik = GaussianLikelihood(tensors)
    term_sizes = [lv.term_sizes for lv in tensors.levels]
    sizes = [n_theta(ts) for ts in term_sizes]
    n_w = lik.n_w

    def objective(flat):
        return -lik(list(torch.split(flat, sizes))) / n_w

    res = minimize(objective, theta0, max_iter=max_iter, tol=tol, newton_first=True)
    thetas = []
    for t, ts in zip(torch.split(res.x.detach(), sizes), term_sizes):
        tiny = diagonal_theta_mask(ts).to(t.device) & (t.abs() < BOUNDARY_TOL)
        thetas.append(torch.where(tiny, torch.zeros_like(t), t))
    with torch.no_grad():
        _, beta, sigma2, _, _ = lik.profile(thetas)
        taus = [tau_from_lambda(lambda_from_theta(t, ts), ts, sigma2) for t, ts in zip(thetas, term_sizes)]
    return torch.cat([beta.reshape(-1)] + taus + [sigma2.reshape(1)]), bool(res.converged)


def refit_replicates(tensors: ModelTensors, factors: torch.Tensor, fit: Callable, start: torch.Tensor,
                     progress=None) -> tuple[torch.Tensor, int]:
    r"""Refit the model once per replicate.

    Parameters
    ----------
    tensors : the full-sample model (its response included).
    factors : ``(R, G_L)`` replicate factors.
    fit : ``fit(tensors, start) -> FitOutput`` or ``(estimates, converged)``. When it also has a
        method ``batched(tensors, factors, start, progress)`` returning ``(estimates, n_failed)``
        (or None where it does not apply), every replicate is refitted by that one call.
    start : the start of every replicate (the full-sample solution, in the form ``fit`` takes).
    progress : optional tqdm bar, advanced once per replicate.

    Returns
    -------
    estimates : ``(R, p + n_tau)``; n_failed : number of replicates that did not converge
    (their estimates are kept, as in the R ``survey`` package).
    """
    batched = getattr(fit, "batched", None)
    if batched is not None:
        done = batched(tensors, factors, start, progress)
        if done is not None:
            return done
    rows, n_failed = [], 0
    for r in range(factors.shape[0]):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = fit(scale_top_weights(tensors, factors[r]), start)
        est, ok = (estimate_vector(out), out.converged) if isinstance(out, FitOutput) else out
        if not ok or any(issubclass(w.category, ConvergenceWarning) for w in caught):
            n_failed += 1
        rows.append(est)
        if progress is not None:
            progress.update(1)
    return torch.stack(rows), n_failed


def make_progress(total: int, enabled: bool):
    """One progress bar over every replicate fit (replicates x plausible values)."""
    return tqdm(total=total, desc="replicates", unit="fit", disable=not enabled, leave=False, delay=1.0)
