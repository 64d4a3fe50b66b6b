r"""Replicate refits of a two-level gaussian model, all replicates at once.

A replicate multiplies the weight of top-level group :math:`g` by :math:`a_{rg}`; the level-1
conditional weights, and with them every per-group crossproduct of :math:`[Z | X | y]`
(:mod:`torchmix.likelihood.gaussian`), are the same in every replicate. Only the way the
per-group terms are combined changes: with weights :math:`W_{rg} = w_g a_{rg}` and
:math:`N_{w,r} = \sum_g a_{rg}N_{w,g}`. With :math:`A_{rg} = \Lambda_r^\top C_g\Lambda_r + I`,
:math:`P_{rg} = \Lambda_rA_{rg}^{-1}\Lambda_r^\top` and the crossproduct blocks
:math:`C_g = C_{oo,g}`, :math:`C_{or,g}`, :math:`C_{rr,g}`,

.. math::
    K_r = \sum_g W_{rg}C_{rr,g} - \sum_g\sum_{ij}W_{rg}P_{rg,ij}\,C_{or,g,i\cdot}^\top C_{or,g,j\cdot},\qquad
    \ell_{p,r} = -\sum_g W_{rg}\log|L_{rg}| - \tfrac{N_{w,r}}2\bigl(1 + \log(2\pi r_r^2/N_{w,r})\bigr),

where :math:`r_r^2 = \min_\beta\xi^\top K_r\xi` (:math:`\xi = (\beta, -1)`). Both sums over groups
are matrix products of the ``(R, G)`` weights with per-group tensors shared by all replicates
(the outer products :math:`C_{or,g,i\cdot}^\top C_{or,g,j\cdot}` are formed once). The gradient is
the closed form of :mod:`torchmix.likelihood.gaussian_grad` with replicate weights,

.. math::
    \partial_\Lambda\ell_{p,r} = \sum_g W_{rg}\bigl[-C_g\Lambda_rA_{rg}^{-1}
    + \tfrac{N_{w,r}}{r_r^2}(c_{rg} - C_g\Lambda_rm_{rg})m_{rg}^\top\bigr],\quad
    c_{rg} = C_{or,g}\hat\xi_r,\; m_{rg} = A_{rg}^{-1}\Lambda_r^\top c_{rg}.

Every replicate starts from the full-sample :math:`\theta` and takes damped Newton steps on
:math:`-\ell_{p,r}/N_{w,r}` (Hessian from central differences of the exact gradient, per-replicate
backtracking), the steps of :func:`~torchmix.fit.optimize.minimize` with ``newton_first=True``,
taken by all replicates together. A replicate this does not bring to the gradient tolerance is
refitted on its own (:func:`~torchmix.fit.replicates.gaussian_estimates`), so the estimates are
those of one-by-one refits. Pure tensor math: no pandas.
"""

from __future__ import annotations

import math
import warnings

import torch

from ..covariance import diagonal_theta_mask, lambda_from_theta, n_theta, tau_from_lambda, theta_index
from ..errors import ConvergenceWarning
from ..likelihood.gaussian import weighted_crossproducts
from ..likelihood.modes import chol_solve
from ..likelihood.smallmat import cholesky_lower
from ..tensors import ModelTensors
from .replicates import BOUNDARY_TOL, gaussian_estimates, scale_top_weights

__all__ = ["GaussianReplicateFit", "ReplicateLikelihood", "supported"]

_HALVINGS = 30


def supported(tensors: ModelTensors) -> bool:
    """Whether the batched path applies: one grouping level (a two-level model)."""
    return len(tensors.levels) == 1


class ReplicateLikelihood:
    r"""Profiled log-likelihoods of one two-level gaussian model under many sets of top-level weights.

    Parameters
    ----------
    tensors : the full-sample model (one grouping level), its response included.
    factors : ``(R, G)`` factor of every top-level group in every replicate.
    """

    def __init__(self, tensors: ModelTensors, factors: torch.Tensor):
        lv = tensors.levels[0]
        self.term_sizes = tuple(lv.term_sizes)
        self.q, self.p = lv.q, tensors.n_fixed
        y = tensors.y if tensors.offset is None else tensors.y - tensors.offset
        cp = weighted_crossproducts([lv.Z, tensors.X, y[:, None]], tensors.w1_cond, lv.group, lv.n_groups)
        q, r = self.q, self.p + 1
        g = lv.n_groups
        self.c_oo = cp[:, :q, :q].contiguous()                                  # (G, q, q)
        self.c_or = cp[:, :q, q:].contiguous()                                  # (G, q, r)
        self.c_rr = cp[:, q:, q:].reshape(g, r * r)                             # (G, r*r)
        self.outer = (self.c_or[:, :, None, :, None] * self.c_or[:, None, :, None, :]).reshape(g * q * q, r * r)
        n_w_top = torch.zeros(g, dtype=cp.dtype, device=cp.device).index_add(0, tensors.row_top,
                                                                              tensors.w1_uncond)
        a = factors.to(dtype=cp.dtype, device=cp.device)
        self.weights = a * lv.w_uncond                                          # (R, G)
        self.n_w = a @ n_w_top                                                  # (R,)
        rows, cols = theta_index(self.term_sizes)
        self._free = (rows.to(cp.device), cols.to(cp.device))

    def profile(self, theta: torch.Tensor, idx: torch.Tensor, gradient: bool = True):
        r"""Objective :math:`-\ell_p/N_w`, its gradient and the profiled estimates for some replicates.

        Parameters
        ----------
        theta : ``(B, n_theta)``; idx : int64 ``(B,)`` replicate of each row.

        Returns
        -------
        value ``(B,)``, gradient ``(B, n_theta)`` (None when ``gradient`` is False),
        beta ``(B, p)``, sigma2 ``(B,)``.
        """
        w, n_w = self.weights[idx], self.n_w[idx]                               # (B, G), (B,)
        b, g = w.shape
        q, p, r = self.q, self.p, self.p + 1
        lam = lambda_from_theta(theta, self.term_sizes)                         # (B, q, q)
        if q == 1:
            lam2 = lam.reshape(b, 1) ** 2
            a = lam2 * self.c_oo.reshape(1, g) + 1.0                            # (B, G)
            logdet = 0.5 * torch.log(a)
            a_inv = 1.0 / a
            p_mat = (lam2 * a_inv).reshape(b, g, 1, 1)
        else:
            a = torch.einsum("bja,gjk,bkc->bgac", lam, self.c_oo, lam) + torch.eye(q, dtype=lam.dtype,
                                                                                   device=lam.device)
            chol = cholesky_lower(a.reshape(b * g, q, q))
            logdet = torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1).reshape(b, g)
            eye = torch.eye(q, dtype=lam.dtype, device=lam.device).expand(b * g, q, q)
            a_inv = chol_solve(chol, eye).reshape(b, g, q, q)
            p_mat = torch.einsum("bij,bgjk,blk->bgil", lam, a_inv, lam)
        k_top = (w @ self.c_rr - (w[:, :, None, None] * p_mat).reshape(b, g * q * q) @ self.outer).reshape(b, r, r)
        k_top = 0.5 * (k_top + k_top.transpose(1, 2))
        beta = torch.linalg.solve(k_top[:, :p, :p], k_top[:, :p, p])
        r2 = k_top[:, p, p] - (k_top[:, :p, p] * beta).sum(-1)
        sigma2 = r2 / n_w
        ell = -(w * logdet).sum(-1) - 0.5 * n_w * (1.0 + torch.log(2 * math.pi * sigma2))
        if not gradient:
            return -ell / n_w, None, beta, sigma2
        xi = torch.cat([beta, -torch.ones_like(beta[:, :1])], dim=1)           # (B, r)
        c = torch.einsum("gqs,bs->bgq", self.c_or, xi)                          # (B, G, q)
        if q == 1:
            c = c[:, :, 0]
            m = a_inv * lam.reshape(b, 1) * c                                   # (B, G)
            c_lam = self.c_oo.reshape(1, g) * lam.reshape(b, 1)                 # (B, G)
            resid = c - c_lam * m
            grad_lam = (-(w * c_lam * a_inv).sum(-1)
                        + (n_w / r2) * (w * resid * m).sum(-1)).reshape(b, 1, 1)
        else:
            m = torch.einsum("bgij,bkj,bgk->bgi", a_inv, lam, c)               # A^{-1} Lambda' c
            c_lam = torch.einsum("gij,bjk->bgik", self.c_oo, lam)               # (B, G, q, q)
            resid = c - torch.einsum("bgij,bgj->bgi", c_lam, m)
            grad_lam = (-torch.einsum("bg,bgij,bgjk->bik", w, c_lam, a_inv)
                        + (n_w / r2)[:, None, None] * torch.einsum("bg,bgi,bgj->bij", w, resid, m))
        grad = grad_lam[:, self._free[0], self._free[1]]
        return -ell / n_w, -grad / n_w[:, None], beta, sigma2

    def value_and_grad(self, theta: torch.Tensor, idx: torch.Tensor):
        """``(value (B,), gradient (B, n_theta))`` of :math:`-\\ell_p/N_w`."""
        val, grad, _, _ = self.profile(theta, idx)
        return val, grad

    def estimates(self, theta: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        r"""``(B, p + n_tau)``: :math:`\hat\beta`, then :math:`\tau = \operatorname{free}(\hat\sigma^2\Lambda\Lambda^\top)`
        and :math:`\hat\sigma^2` last, with diagonal :math:`\theta` entries below 1e-6 set to zero."""
        tiny = diagonal_theta_mask(self.term_sizes).to(theta.device) & (theta.abs() < BOUNDARY_TOL)
        theta = torch.where(tiny, torch.zeros_like(theta), theta)
        _, _, beta, sigma2 = self.profile(theta, idx, gradient=False)
        lam = lambda_from_theta(theta, self.term_sizes)
        tau = tau_from_lambda(lam, self.term_sizes, sigma2[:, None, None])
        return torch.cat([beta, tau, sigma2[:, None]], dim=1)


def _fd_hessian(lik: ReplicateLikelihood, theta: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    r"""``(B, k, k)`` Hessians from central differences of the exact gradients, step
    :math:`\epsilon^{1/3}(1 + |\theta_s|)` (as :func:`~torchmix.fit.optimize.minimize`), symmetrised."""
    k = theta.shape[1]
    h = torch.finfo(theta.dtype).eps ** (1 / 3) * (1 + theta.abs())
    cols = []
    for s in range(k):
        e = torch.zeros_like(theta)
        e[:, s] = h[:, s]
        cols.append((lik.value_and_grad(theta + e, idx)[1] - lik.value_and_grad(theta - e, idx)[1])
                    / (2 * h[:, s, None]))
    hess = torch.stack(cols, dim=2)
    return 0.5 * (hess + hess.transpose(1, 2))


def newton_all(lik: ReplicateLikelihood, theta0: torch.Tensor, n_rep: int, *, tol: float = 1e-8,
               newton_steps: int = 20, progress=None):
    r"""Damped Newton steps for every replicate together, from the common start ``theta0``.

    A replicate stops when its largest gradient entry is below ``tol * 1e-4``, when its Hessian
    is not positive definite or when no step length in 30 halvings passes the test of
    :func:`~torchmix.fit.optimize.minimize` (sufficient decrease, or no increase beyond rounding
    with a smaller gradient).

    Returns
    -------
    theta ``(R, n_theta)``; converged ``(R,)`` bool (largest gradient entry below ``tol``).
    """
    theta = theta0.reshape(1, -1).expand(n_rep, -1).clone()
    every = torch.arange(n_rep, device=theta.device)
    val, g = lik.value_and_grad(theta, every)
    active = torch.ones(n_rep, dtype=torch.bool, device=theta.device)
    eps = torch.finfo(theta.dtype).eps
    reported = 0

    def report():   # the bar counts replicates that have converged
        nonlocal reported
        if progress is not None:
            done = int((~active & torch.isfinite(val) & (g.abs().amax(1) < tol)).sum())
            progress.update(done - reported)
            reported = done

    for _ in range(newton_steps):
        active &= g.abs().amax(1) >= tol * 1e-4
        report()
        if not bool(active.any()):
            break
        idx = torch.nonzero(active).reshape(-1)
        th, gi, vi = theta[idx], g[idx], val[idx]
        chol, info = torch.linalg.cholesky_ex(_fd_hessian(lik, th, idx))
        pd = info == 0
        eye = torch.eye(th.shape[1], dtype=th.dtype, device=th.device)
        chol = torch.where(pd[:, None, None], chol, eye)
        step = -torch.cholesky_solve(gi[:, :, None], chol).squeeze(2)
        slope = (gi * step).sum(1)
        noise = 1024 * eps * (1 + vi.abs())
        alpha = torch.ones_like(vi)
        pending = pd.clone()
        new_th, new_v, new_g = th.clone(), vi.clone(), gi.clone()
        for _ in range(_HALVINGS):
            sub = torch.nonzero(pending).reshape(-1)
            trial = th[sub] + alpha[sub, None] * step[sub]
            tv, tg = lik.value_and_grad(trial, idx[sub])
            ok = torch.isfinite(tv) & ((tv <= vi[sub] + 1e-4 * alpha[sub] * slope[sub])
                                       | ((tv <= vi[sub] + noise[sub]) & (tg.abs().amax(1) < gi[sub].abs().amax(1))))
            take = sub[ok]
            new_th[take], new_v[take], new_g[take] = trial[ok], tv[ok], tg[ok]
            pending[take] = False
            if not bool(pending.any()):
                break
            alpha = torch.where(pending, alpha / 2, alpha)
        moved = pd & ~pending
        theta[idx], val[idx], g[idx] = new_th, new_v, new_g
        active[idx[~moved]] = False                                            # stuck: no further steps
    active[:] = False
    report()
    return theta, torch.isfinite(val) & (g.abs().amax(1) < tol)


class GaussianReplicateFit:
    """Estimates of one replicate (``fit(tensors, theta0)``), with a batched path for all replicates.

    Parameters
    ----------
    max_iter, tol : as in :func:`~torchmix.fit.replicates.gaussian_estimates`.
    """

    def __init__(self, max_iter: int = 200, tol: float = 1e-8):
        self.max_iter, self.tol = max_iter, tol

    def __call__(self, tensors: ModelTensors, theta0: torch.Tensor):
        return gaussian_estimates(tensors, theta0, max_iter=self.max_iter, tol=self.tol)

    def batched(self, tensors: ModelTensors, factors: torch.Tensor, start: torch.Tensor, progress=None):
        r"""Every replicate of a two-level model at once; None for deeper models (refit one by one).

        Replicates the batched Newton steps leave above the gradient tolerance are refitted one by
        one from ``start``; those that still do not converge are counted.

        Returns
        -------
        estimates ``(R, p + n_tau)``; n_failed.
        """
        if not supported(tensors):
            return None
        n_rep = factors.shape[0]
        lik = ReplicateLikelihood(tensors, factors)
        start = start.to(dtype=tensors.X.dtype, device=tensors.X.device)
        with torch.no_grad():
            theta, ok = newton_all(lik, start, n_rep, tol=self.tol, newton_steps=min(20, self.max_iter),
                                   progress=progress)
            est = lik.estimates(theta, torch.arange(n_rep, device=theta.device))
        n_failed = 0
        for r in torch.nonzero(~ok).reshape(-1).tolist():
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                est[r], conv = self(scale_top_weights(tensors, factors[r]), start)
            if not conv or any(issubclass(w.category, ConvergenceWarning) for w in caught):
                n_failed += 1
            if progress is not None:
                progress.update(1)
        return est, n_failed
