r"""Replicate refits of a GLMM, estimates only, batched over replicates.

A replicate multiplies the weight of top-level group :math:`k` by :math:`a_{rk}` and changes
nothing else (:mod:`torchmix.fit.replicates`). The AGQ log-likelihood is a sum of top-group
contributions :math:`\ell_k(\psi)=w^{(L)}_k\log\mathcal L_k(\psi)`, and :math:`\log\mathcal L_k` (its
modes included) depends on the conditional weights only, so every replicate shares the functions
:math:`\ell_k` and differs only in how they are combined:

.. math::
    f_r(\psi) = \frac{1}{W_r}\sum_k a_{rk}\,\ell_k(\psi),\qquad
    W_r = I_r\sum_k a_{rk}\,w^{(L)}_k

(:math:`I_r` the information scale of :func:`~torchmix.fit.glmm.information_scale` at the start, as a
separate fit normalises). The refit of every replicate therefore starts with no evaluation of its own:

1. at the full-sample solution :math:`\psi_0` the per-group contributions, scores
   :math:`s_k=\partial\ell_k/\partial\psi` and Hessians :math:`H_k` (central differences of the
   per-group scores, :math:`2m+1` evaluations of the full sample) give every replicate's value,
   gradient :math:`\sum_k a_{rk}s_k/W_r` and Hessian :math:`\sum_k a_{rk}H_k/W_r` at :math:`\psi_0`;
2. from there each replicate takes Newton steps with that Hessian, updated by BFGS, with a
   backtracking line search (:func:`~torchmix.fit.glmm_many._newton`); the replicates are evaluated
   side by side as copies of the data (:func:`~torchmix.fit.glmm_many.stack_responses`), in chunks
   of at most :data:`~torchmix.fit.glmm_many.CHUNK_ROWS` rows, only those still moving;
3. a replicate has converged when its gradient on its own standardised columns
   (:mod:`torchmix.fit.standardize`) is below ``tol`` -- the test of a separate
   :func:`~torchmix.fit.glmm.fit_glmm` -- and the steps continue to ``tol * STOP`` (a separate fit
   polishes to ``tol * 1e-3``) so that the estimates equal a separate fit's to rounding.

A replicate that does not get there, comes near the boundary of the variance parameters, or whose
fitted probabilities separate, is refitted on its own with the caller's ``fit``. Pure tensor math.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Optional

import torch

from ..covariance import lambda_from_theta, n_theta, theta_index
from ..errors import ConvergenceWarning
from ..likelihood.agq import AGQLogLik
from ..tensors import FitOutput, ModelTensors
from .glmm import information_scale
from .glmm_many import CHUNK_ROWS, _newton, _regular, even_chunks, stack_responses, stacked_pieces
from .glmm_se import EPS_QUARTER, tau_of_theta
from .separation import separated_rows
from .standardize import Standardizer, column_rms

__all__ = ["glmm_replicate_estimates", "group_derivatives", "GLMMReplicateFit"]

STOP = 1e-2            # steps continue until max |gradient| < STOP * tol
MAX_STEPS = 30


class _Copies:
    """Replicates as copies of the full-sample data in one AGQ module; parameters ``(c, m)``.

    ``weights`` ``(c, G_L)`` holds :math:`a_{rk}/W_r`; evaluations take a subset of the copies
    (``rows``), with a module over those copies only (rebuilt when the subset changes). The modes of
    every copy are kept between evaluations (warm starts).
    """

    def __init__(self, tensors: ModelTensors, family, n_quad: int, weights: torch.Tensor, modes: list):
        self.tensors, self.family, self.n_quad, self.weights = tensors, family, n_quad, weights
        self.k = weights.shape[0]
        self.p = tensors.n_fixed
        self.term_sizes = [tuple(lv.term_sizes) for lv in tensors.levels]
        self.sizes = [n_theta(ts) for ts in self.term_sizes]
        self.n_top = tensors.levels[-1].n_groups
        self.u = [mode[None].repeat(self.k, 1, 1) for mode in modes]
        self._cache = (None, None)
        self.n_evals = 0

    def _module(self, rows: tuple) -> AGQLogLik:
        key, module = self._cache
        if key != rows:
            y = self.tensors.y[:, None].expand(-1, len(rows))
            module = AGQLogLik(stack_responses(self.tensors, y), self.family, self.n_quad)
            self._cache = (rows, module)
        return module

    def pieces(self, psi: torch.Tensor):
        """:func:`~torchmix.fit.glmm_many.stacked_pieces` of this model."""
        return stacked_pieces(self.tensors, psi, self.term_sizes)

    def value_grad(self, psi: torch.Tensor, rows: torch.Tensor, keep_modes: bool = True):
        """Values :math:`f_r` ``(r,)`` and gradients ``(r, m)`` of the copies ``rows`` (bool ``(c,)``)."""
        sel = torch.nonzero(rows).flatten().tolist()
        module = self._module(tuple(sel))
        module.set_modes([u[sel].reshape(-1, u.shape[2]) for u in self.u])
        x = psi[sel].detach().clone().requires_grad_(True)
        self.n_evals += 1
        try:
            with torch.enable_grad():
                eta0, zls = self.pieces(x)
                ell = module(eta0, zls).reshape(len(sel), self.n_top)
                val = (ell * self.weights[sel]).sum(1)
                (grad,) = torch.autograd.grad(val.sum(), x)
        except torch.linalg.LinAlgError:  # a curvature not positive definite at some trial point: reject it
            bad = torch.full((len(sel),), -math.inf, dtype=x.dtype, device=x.device)
            return bad, torch.full_like(x, math.nan), None
        if keep_modes:
            for u, new in zip(self.u, module.modes):
                u[sel] = new.reshape(len(sel), -1, u.shape[2])
        return val.detach(), grad, None

    def keep(self, rows, take, extra) -> None:
        """Nothing to record: replicates need estimates only."""


def _split(psi: torch.Tensor, p: int, term_sizes):
    thetas, pos = [], p
    for ts in term_sizes:
        k = n_theta(ts)
        thetas.append(psi[pos:pos + k])
        pos += k
    return psi[:p], [lambda_from_theta(t, ts) for t, ts in zip(thetas, term_sizes)]


def _scores(module: AGQLogLik, psi: torch.Tensor, p: int, term_sizes):
    """Per-top-group contributions ``(G,)`` and scores over :math:`\\psi` ``(G, m)`` at ``psi``."""
    beta, lams = _split(psi, p, term_sizes)
    ell, s_beta, s_lam = module.top_scores(beta, lams)
    cols = [s_beta]
    for ts, s in zip(term_sizes, s_lam):
        rows, cc = theta_index(ts)
        cols.append(s[:, rows, cc])
    return ell, torch.cat(cols, dim=1)


def group_derivatives(module: AGQLogLik, psi: torch.Tensor, p: int, term_sizes):
    r"""Per-top-group contributions, scores and Hessians of the AGQ log-likelihood at ``psi``.

    Hessians by central differences of the per-group scores, step
    :math:`h_r=(|\psi_r|+1)\epsilon^{1/4}` (as :func:`~torchmix.fit.glmm_se.fd_hessian`), every
    evaluation warm-started from the modes at ``psi``; their sum over groups is the Hessian of a fit.

    Returns
    -------
    ell ``(G,)``; scores ``(G, m)``; hessians ``(G, m, m)`` (symmetrised); the modes at ``psi``.
    """
    ell, scores = _scores(module, psi, p, term_sizes)
    base = module.modes
    cols = []
    for r in range(psi.numel()):
        e = torch.zeros_like(psi)
        e[r] = (abs(float(psi[r])) + 1.0) * EPS_QUARTER
        module.set_modes(base)
        plus = _scores(module, psi + e, p, term_sizes)[1]
        module.set_modes(base)
        minus = _scores(module, psi - e, p, term_sizes)[1]
        cols.append((plus - minus) / (2.0 * e[r]))
    module.set_modes(base)
    hess = torch.stack(cols, dim=2)
    return ell, scores, 0.5 * (hess + hess.transpose(1, 2)), base


def _replicate_scales(tensors: ModelTensors, factors: torch.Tensor, term_sizes) -> torch.Tensor:
    r"""``(R, m)``: the standardisation factors :math:`(s^x, s^\theta)` a separate fit of each replicate
    uses (weighted column RMS with the replicate's level-1 weights)."""
    out = []
    for a in factors:
        w = tensors.w1_uncond * a[tensors.row_top]
        std = Standardizer(sx=column_rms(tensors.X, w), sz=[column_rms(lv.Z, w) for lv in tensors.levels],
                           term_sizes=term_sizes)
        out.append(torch.cat([std.sx, std.theta_factor()]))
    return torch.stack(out)


def _refit_alone(fit: Callable, tensors: ModelTensors, a: torch.Tensor, start):
    """A separate refit of one replicate: ``(estimates, converged)``."""
    from .replicates import estimate_vector, scale_top_weights
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fit(scale_top_weights(tensors, a), start)
    est, ok = (estimate_vector(out), out.converged) if isinstance(out, FitOutput) else out
    return est, bool(ok) and not any(issubclass(w.category, ConvergenceWarning) for w in caught)


def glmm_replicate_estimates(tensors: ModelTensors, factors: torch.Tensor, fit: Callable, start, progress=None, *,
                             family, full: FitOutput, n_quad: int = 13, tol: float = 1e-8,
                             max_steps: int = MAX_STEPS) -> Optional[tuple[torch.Tensor, int]]:
    r"""Estimates of every replicate refit of a GLMM, batched (see the module notes).

    Parameters
    ----------
    tensors : the full-sample model; factors : ``(R, G_L)`` replicate factors.
    fit : ``fit(tensors, start)`` -> :class:`~torchmix.tensors.FitOutput`, the separate refit used for
        replicates the batch does not settle; start : its start (the full-sample estimates).
    progress : optional tqdm bar, advanced once per replicate.
    family, n_quad, tol : those of the full-sample fit ``full`` (:func:`~torchmix.fit.glmm.fit_glmm` or a
        batched plausible value): its ``extra["psi"]`` on standardised columns and its modes ``u``.

    Returns
    -------
    ``(estimates (R, p + n_tau), n_failed)`` as :func:`~torchmix.fit.replicates.refit_replicates`, or
    None when the full-sample fit is not an interior, converged optimum (then refit one by one).
    """
    p = tensors.n_fixed
    term_sizes = [tuple(lv.term_sizes) for lv in tensors.levels]
    psi0 = full.extra.get("psi")
    if psi0 is not None and factors.shape[0] == 0:
        return psi0.new_zeros(0, psi0.numel()), 0
    if psi0 is None or not full.converged or full.extra.get("boundary") or not _regular(psi0, p, term_sizes):
        return None
    std = Standardizer.from_tensors(tensors)
    scale0 = torch.cat([std.sx, std.theta_factor()])
    st = std.tensors(tensors)
    dt, dev = st.X.dtype, st.X.device
    a_all = factors.to(dtype=dt, device=dev)
    module = AGQLogLik(st, family, n_quad)
    module.set_modes(full.u)
    ell, scores, hess, modes = group_derivatives(module, psi0, p, term_sizes)
    w_top = tensors.levels[-1].w_cond
    eta_start = tensors.X @ (psi0[:p] / std.sx)
    info = torch.tensor([information_scale(family, eta_start, tensors.w1_uncond * a[tensors.row_top]) for a in a_all],
                        dtype=dt, device=dev)
    weights = a_all / ((a_all @ w_top) * info)[:, None]       # a_rk / W_r
    test_scale = scale0[None, :] / _replicate_scales(tensors, a_all, term_sizes)
    rows, n_failed = [], 0
    for chunk in even_chunks(list(range(a_all.shape[0])), CHUNK_ROWS // max(tensors.n_obs, 1)):
        c0 = chunk[0]
        sl = slice(c0, chunk[-1] + 1)
        w = weights[sl]
        copies = _Copies(st, family, n_quad, w, modes)
        k = copies.k
        psi = psi0.expand(k, -1).clone()
        val, g = w @ ell, w @ scores
        neg_hess = -torch.einsum("rk,kij->rij", w, hess)
        everyone = torch.ones(k, dtype=torch.bool, device=dev)
        psi, val, g, _, _ = _newton(copies, psi, val, g, neg_hess, everyone, tol * STOP, max_steps,
                                    test_scale=test_scale[sl])
        grad_max = (g * test_scale[sl]).abs().amax(1)
        for j in range(k):
            r = c0 + j
            psi_r = psi[j] * test_scale[r].reciprocal()  # on the replicate's own standardised columns
            ok = bool(grad_max[j] < tol) and bool(torch.isfinite(val[j])) and _regular(psi_r, p, term_sizes)
            if ok:
                beta, lams = _split(psi[j], p, term_sizes)
                b = [u[j] @ lam.transpose(0, 1) for u, lam in zip(copies.u, lams)]
                ok = separated_rows(family, st, beta, b) == 0
            if ok:
                orig = psi[j] / scale0
                rows.append(torch.cat([orig[:p], tau_of_theta(orig[p:], term_sizes)]).detach())
            else:
                est, ok_alone = _refit_alone(fit, tensors, factors[r], start)
                rows.append(est)
                n_failed += int(not ok_alone)
            if progress is not None:
                progress.update(1)
    return torch.stack(rows), n_failed


class GLMMReplicateFit:
    """The replicate refit of a fitted GLMM, as :func:`~torchmix.fit.replicates.refit_replicates` takes it.

    Called with one replicate's tensors and the start it is the separate refit ``fit``; its
    :meth:`batched` refits every replicate at once (:func:`glmm_replicate_estimates`).

    Parameters
    ----------
    fit : ``fit(tensors, start)`` -> :class:`~torchmix.tensors.FitOutput`, the separate refit.
    family, full, n_quad, tol : as for :func:`glmm_replicate_estimates`.
    """

    def __init__(self, fit: Callable, family, full: FitOutput, *, n_quad: int = 13, tol: float = 1e-8):
        self.fit, self.family, self.full, self.n_quad, self.tol = fit, family, full, n_quad, tol

    def __call__(self, tensors: ModelTensors, start):
        return self.fit(tensors, start)

    def batched(self, tensors: ModelTensors, factors: torch.Tensor, start, progress=None):
        """``(estimates, n_failed)`` of every replicate, or None where the batch does not apply."""
        return glmm_replicate_estimates(tensors, factors, self.fit, start, progress, family=self.family,
                                        full=self.full, n_quad=self.n_quad, tol=self.tol)
