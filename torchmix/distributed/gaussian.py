r"""Data-parallel fit of the weighted gaussian mixed model (any number of levels).

Each process holds a shard of whole top-level groups (:mod:`~torchmix.distributed.shard`) and its
:class:`~torchmix.likelihood.gaussian.GaussianLikelihood`. One evaluation of the profiled
log-likelihood at :math:`\theta` integrates the shard's groups (:meth:`integrate`) and sums, over
processes, the :math:`(p+1)\times(p+1)` matrix :math:`K_{top}` and the weighted log-determinant:

.. math::
    K_{top} = \sum_r K^{(r)},\qquad \text{logdet} = \sum_r \text{logdet}^{(r)},\qquad
    \hat\beta = K_{\beta\beta}^{-1}k_{\beta y},\quad \hat\sigma^2 = (k_{yy} - k_{\beta y}^\top\hat\beta)/N_w,

    \ell_p(\theta) = -\text{logdet} - \tfrac{N_w}{2}\bigl(1 + \log 2\pi\hat\sigma^2\bigr).

Its gradient is, by the envelope theorem (:math:`\partial\ell/\partial\beta = \partial\ell/\partial\sigma = 0`
at :math:`\hat\beta,\hat\sigma`), the sum over processes of the gradients of the shards' unprofiled terms
at fixed :math:`(\hat\beta, \hat\sigma)`:

.. math:: \nabla_\theta\ell_p = \sum_r \nabla_\theta\Bigl[-\text{logdet}^{(r)}(\theta)
          - \tfrac{1}{2\hat\sigma^2}\hat\xi^\top K^{(r)}(\theta)\hat\xi\Bigr],\qquad \hat\xi = (\hat\beta, -1).

The optimiser (:func:`~torchmix.fit.optimize.minimize`) then runs on every process with the same
numbers. Standard errors: the per-top-group scores are gathered in group order, the
:math:`K_{\beta\beta}` block and the :math:`(\theta,\sigma)` Hessian of the unprofiled log-likelihood
(a sum over groups) are summed over processes; the sandwiches are then those of the single-process
fit (:mod:`torchmix.fit.gaussian`). Modes are gathered per level, so every process returns the
complete fit. Column standardisation and :math:`N_w` come from the full model, which every process
holds.
"""

from __future__ import annotations

import math

import torch

from ..covariance import lambda_from_theta, n_theta, normalise_theta_signs
from ..fit.gaussian import (_split, _standard_error_pieces, _start_theta, assemble_output, boundary_thetas,
                            conclude, line_search_error)
from ..fit.optimize import minimize
from ..fit.standardize import Standardizer
from ..fit.start_check import start_passes
from ..likelihood.gaussian import GaussianLikelihood
from ..likelihood.gaussian_grad import known_gradient
from ..progress import progress_bar
from ..tensors import FitOutput, ModelTensors
from .collectives import Collectives
from .shard import Shard, shard_tensors

__all__ = ["fit_gaussian_data_parallel"]


class _Profile:
    """The profiled log-likelihood over processes (module docstring)."""

    def __init__(self, lik, full: ModelTensors, coll: Collectives):
        self.lik, self.coll = lik, coll
        self.p = full.n_fixed
        self.term_sizes = [tuple(lv.term_sizes) for lv in full.levels]
        self.sizes = [n_theta(ts) for ts in self.term_sizes]
        self.n_w = float(full.w1_uncond.sum())
        self.kw = dict(dtype=full.X.dtype, device=full.X.device)

    def _local(self, thetas):
        """This shard's ``(K_top, logdet, pass)`` (zeros for an empty shard)."""
        if self.lik is None:
            zero = torch.zeros((), **self.kw) + 0.0 * sum(t.sum() for t in thetas)
            return torch.zeros(self.p + 1, self.p + 1, **self.kw) + zero, zero, None
        ps = self.lik.integrate(thetas)
        return self.lik.k_top(ps), ps.logdet_top.sum(), ps

    def _profiled(self, kt_local, ld_local):
        p = self.p
        tot = self.coll.allsum(torch.cat([kt_local.detach().reshape(-1), ld_local.detach().reshape(1)]))
        kt, ld = tot[:-1].reshape(p + 1, p + 1), tot[-1]
        kbb, kby, kyy = kt[:p, :p], kt[:p, p], kt[p, p]
        beta = torch.linalg.solve(kbb, kby)
        sigma2 = (kyy - kby @ beta) / self.n_w
        ell = -ld - 0.5 * self.n_w * (1.0 + torch.log(2 * math.pi * sigma2))
        return ell, beta, sigma2

    def profile(self, thetas):
        r""":math:`(\ell_p, \hat\beta, \hat\sigma^2, \text{local pass})` at ``thetas`` (no gradient)."""
        with torch.no_grad():
            kt_l, ld_l, ps = self._local(thetas)
            return self._profiled(kt_l, ld_l) + (ps,)

    def value_and_grad(self, flat: torch.Tensor):
        r""":math:`-\ell_p/N_w` and its gradient ``(n_theta,)``, the same on every process."""
        x = flat.detach().requires_grad_(True)
        with torch.enable_grad():
            thetas = _split(x, self.sizes)
            kt_l, ld_l, _ = self._local(thetas)
            ell, beta, sigma2 = self._profiled(kt_l, ld_l)
            xi = torch.cat([beta, -torch.ones(1, **self.kw)])
            local = -ld_l - 0.5 * (xi @ kt_l @ xi) / sigma2
            (g,) = torch.autograd.grad(local, x, allow_unused=True)
        g = torch.zeros_like(flat) if g is None else g
        g = self.coll.allsum(g)
        return (-ell / self.n_w).detach(), (-g / self.n_w).detach()


def fit_gaussian_data_parallel(tensors: ModelTensors, coll: Collectives, *, start=None, max_iter: int = 200,
                               tol: float = 1e-8, small_sample="G/(G-1)", progress: bool = True) -> FitOutput:
    """Fit the gaussian model across the processes of ``coll``; the arguments and the result are
    those of :func:`~torchmix.fit.gaussian.fit_gaussian` (``tensors`` is the full model, held by
    every process; the result is complete and the same on every process)."""
    std = Standardizer.from_tensors(tensors)
    shard = shard_tensors(tensors, coll.rank, coll.size)
    lik = None if shard.empty else GaussianLikelihood(std.tensors(shard.tensors))
    full = tensors  # only its sizes, weights and dtype are used from here on
    prof = _Profile(lik, full, coll)
    start = std.start(start, residual=True)

    def objective(flat):
        return known_gradient(flat, prof.value_and_grad)

    theta0 = _start_theta(full, start, full.n_fixed)
    passes_at_start = start_passes(objective, theta0, tol)
    with progress_bar(desc="fit (L-BFGS rounds)", unit="round", disable=not progress) as bar:
        try:
            res = minimize(objective, theta0, max_iter=max_iter, tol=tol, progress=bar,
                           newton_first=start is not None)
        except IndexError as exc:  # torch's strong-Wolfe line search on a non-finite objective
            raise line_search_error() from exc
    res = conclude(res, passes_at_start, tol, default_start=start is None)
    return std.output(_finish(prof, shard, full, res, small_sample), gaussian=True)


def _se_pieces(prof: _Profile, shard: Shard, beta, thetas, sigma):
    """Scores gathered in top-group order; :math:`K_{\\beta\\beta}` and the :math:`(\\theta,\\sigma)`
    Hessian summed over processes."""
    p, coll = prof.p, prof.coll
    psi = torch.cat([beta] + list(thetas) + [sigma.reshape(1)])
    k = psi.numel()
    if prof.lik is None:
        scores = torch.zeros(0, k, dtype=psi.dtype, device=psi.device)
        k_bb = torch.zeros(p, p, dtype=psi.dtype, device=psi.device)
        hess_vc = torch.zeros(k - p, k - p, dtype=psi.dtype, device=psi.device)
    else:
        _, scores, k_bb, hess_vc = (t.detach() for t in _standard_error_pieces(prof.lik, beta, thetas, sigma,
                                                                               prof.sizes))
    summed = coll.allsum(torch.cat([k_bb.reshape(-1), hess_vc.reshape(-1)]))
    k_bb, hess_vc = summed[:p * p].reshape(p, p), summed[p * p:].reshape(k - p, k - p)
    return psi, coll.cat_rows(scores, shard.top_counts), k_bb, hess_vc


def _finish(prof: _Profile, shard: Shard, full: ModelTensors, res, small_sample) -> FitOutput:
    """Estimates, modes and sandwich covariances at the optimum (as :func:`torchmix.fit.gaussian._finish`)."""
    term_sizes, coll = prof.term_sizes, prof.coll
    thetas = [normalise_theta_signs(t, ts) for t, ts in zip(_split(res.x, prof.sizes), term_sizes)]
    ell, beta, sigma2, ps = prof.profile(thetas)
    with torch.no_grad():
        if prof.lik is None:
            local_us = [torch.zeros(0, lv.q, **prof.kw) for lv in full.levels]
        else:
            local_us = prof.lik.modes(thetas, beta, ps)
    us = [coll.put_rows(u, [ids[l] for ids in shard.all_group_ids], lv.n_groups)
          for l, (u, lv) in enumerate(zip(local_us, full.levels))]
    sigma = sigma2.sqrt()
    bs = [u @ lambda_from_theta(t, ts).transpose(0, 1) for u, t, ts in zip(us, thetas, term_sizes)]

    thetas, on_boundary = boundary_thetas(thetas, term_sizes)
    pieces = _se_pieces(prof, shard, beta, thetas, sigma)
    return assemble_output(res, pieces, beta, sigma2, float(ell), thetas, on_boundary, term_sizes, us, bs,
                           small_sample)
