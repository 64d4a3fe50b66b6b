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
:math:`-\ell_{p,r}/N_{w,r}` (exact Hessian for one random effect, see
:meth:`ReplicateLikelihood._profile_scalar`, where every sum over groups is one matrix product;
forward differences of the exact gradient otherwise; per-replicate backtracking), the steps of
:func:`~torchmix.fit.optimize.minimize` with ``newton_first=True``, taken by all replicates together.
A replicate this does not bring to the gradient tolerance is refitted on its own
(:func:`~torchmix.fit.replicates.gaussian_estimates`), so the estimates are those of one-by-one
refits. Pure tensor math: no pandas.
"""

from __future__ import annotations

import math
import warnings

import torch

from ..covariance import diagonal_theta_mask, lambda_from_theta, tau_from_lambda, theta_index
from ..errors import ConvergenceWarning
from ..likelihood.gaussian import weighted_crossproducts
from ..likelihood.modes import chol_solve
from ..likelihood.smallmat import cholesky_lower
from ..tensors import ModelTensors
from .replicates import BOUNDARY_TOL, gaussian_estimates, scale_top_weights

__all__ = ["GaussianReplicateFit", "ReplicateLikelihood", "supported"]

_HALVINGS = 30


def _kron(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    r"""``(B, q^2, q^2)`` with entry :math:`((j,k),(a,c)) = L_{ja}R_{kc}`: for a row-major flattened
    :math:`q\times q` matrix :math:`M`, ``M.flatten() @ _kron(L, R)`` is :math:`L^\top MR` flattened."""
    b, q = left.shape[0], left.shape[1]
    return (left[:, :, None, :, None] * right[:, None, :, None, :]).reshape(b, q * q, q * q)


def supported(tensors: ModelTensors) -> bool:
    """Whether the batched path applies: one grouping level (a two-level model)."""
    return len(tensors.levels) == 1


class ReplicateLikelihood:
    r"""Profiled log-likelihoods of one two-level gaussian model under many sets of top-level weights.

    Parameters
    ----------
    tensors : the full-sample model (one grouping level), its response included.
    factors : ``(R, G)`` factor of every top-level group in every replicate.

    Notes
    -----
    Methods take ``idx``, the replicate of each row of a batch, or None for all replicates in order.
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
        self.outer = (self.c_or[:, :, None, :, None] * self.c_or[:, None, :, None, :]).reshape(g * q * q, r * r)
        if q == 1:   # the sums over groups of the scalar path: outer products, then C_oo
            self.outer_t = torch.cat([self.outer, self.c_oo.reshape(g, 1)], dim=1).transpose(0, 1).contiguous()
        n_w_top = torch.zeros(g, dtype=cp.dtype, device=cp.device).index_add(0, tensors.row_top,
                                                                              tensors.w1_uncond)
        a = factors.to(dtype=cp.dtype, device=cp.device)
        self.weights = a * lv.w_uncond                                          # (R, G)
        self.n_w = a @ n_w_top                                                  # (R,)
        self.k_const = self.weights @ cp[:, q:, q:].reshape(g, r * r)           # (R, r*r): sum_g W C_rr
        rows, cols = theta_index(self.term_sizes)
        self._free = (rows.to(cp.device), cols.to(cp.device))

    def _pick(self, idx):
        if idx is None:
            return self.weights, self.n_w, self.k_const
        return self.weights[idx], self.n_w[idx], self.k_const[idx]

    def _profiled(self, k_flat, n_w, logdet_sum):
        """beta ``(B, p)``, r^2, sigma^2 ``(B,)``, K ``(B, r, r)`` and the log-likelihood, from K and the
        weighted sum of the log-determinants."""
        p, r = self.p, self.p + 1
        k_top = k_flat.reshape(-1, r, r)
        k_top = 0.5 * (k_top + k_top.transpose(1, 2))
        beta = torch.linalg.solve(k_top[:, :p, :p], k_top[:, :p, p])
        r2 = k_top[:, p, p] - (k_top[:, :p, p] * beta).sum(-1)
        sigma2 = r2 / n_w
        ell = -logdet_sum - 0.5 * n_w * (1.0 + torch.log(2 * math.pi * sigma2))
        return beta, r2, sigma2, k_top, ell

    def profile(self, theta: torch.Tensor, idx=None, order: int = 1):
        r"""Objective :math:`-\ell_p/N_w` and its derivatives, and the profiled estimates, for some replicates.

        Parameters
        ----------
        theta : ``(B, n_theta)``; idx : int64 ``(B,)`` replicate of each row (None: all, in order);
        order : 0 (value only), 1 (and the gradient) or 2 (and the Hessian, one random effect only).

        Returns
        -------
        value ``(B,)``, gradient ``(B, n_theta)``, Hessian ``(B, 1, 1)`` (None where not asked for),
        beta ``(B, p)``, sigma2 ``(B,)``.
        """
        if self.q == 1:
            return self._profile_scalar(theta, idx, order)
        w, n_w, k_const = self._pick(idx)
        b, g = w.shape
        q = self.q
        lam = lambda_from_theta(theta, self.term_sizes)                         # (B, q, q)
        eye = torch.eye(q, dtype=lam.dtype, device=lam.device)
        c_flat = self.c_oo.reshape(g, q * q)
        # per-group q x q products with Lambda_r as (G, q^2) @ (q^2, q^2) Kronecker factors
        a = (c_flat @ _kron(lam, lam)).reshape(b, g, q, q) + eye                # Lambda' C Lambda + I
        chol = cholesky_lower(a.reshape(b * g, q, q))
        diag = torch.diagonal(chol, dim1=-2, dim2=-1).contiguous()              # (log of a strided view is slow)
        logdet = torch.log(diag).sum(-1).reshape(b, g)
        a_inv = chol_solve(chol, eye.expand(b * g, q, q)).reshape(b, g, q * q)
        lam_t = lam.transpose(1, 2)
        p_mat = a_inv @ _kron(lam_t, lam_t)                                     # Lambda A^{-1} Lambda'
        k_flat = k_const - (w[:, :, None] * p_mat).reshape(b, g * q * q) @ self.outer
        beta, r2, sigma2, _, ell = self._profiled(k_flat, n_w, (w * logdet).sum(-1))
        if order == 0:
            return -ell / n_w, None, None, beta, sigma2
        xi = torch.cat([beta, -torch.ones_like(beta[:, :1])], dim=1)           # (B, r)
        c = (self.c_or.reshape(g * q, -1) @ xi.transpose(0, 1)).reshape(g, q, b).permute(2, 0, 1)  # (B, G, q)
        a_inv = a_inv.reshape(b, g, q, q)
        m = (a_inv * (c @ lam)[:, :, None, :]).sum(-1)                          # A^{-1} Lambda' c
        c_lam = (c_flat @ _kron(eye.expand(b, q, q), lam)).reshape(b, g, q, q)   # C Lambda
        resid = c - (c_lam * m[:, :, None, :]).sum(-1)
        # sum_g W C Lambda A^{-1}: T[(i,j),(l,k)] = sum_g C_ij (W A^{-1})_lk, then contract j, l with Lambda
        t = (c_flat.transpose(0, 1) @ (w[:, :, None] * a_inv.reshape(b, g, q * q))).reshape(b, q, q, q, q)
        grad_lam = (-torch.einsum("bijlk,bjl->bik", t, lam)
                    + (n_w / r2)[:, None, None] * ((w[:, :, None] * resid).transpose(1, 2) @ m))
        grad = grad_lam[:, self._free[0], self._free[1]]
        return -ell / n_w, -grad / n_w[:, None], None, beta, sigma2

    def _profile_scalar(self, theta, idx, order):
        r"""One random effect (:math:`\Lambda = \lambda`, :math:`C_g = n_g`): value, gradient and Hessian.

        With :math:`t_g = 1/A_g = 1/(1 + \lambda^2n_g)` (so :math:`\lambda^2n_gt_g = 1 - t_g`),
        :math:`P = \lambda^2t`, :math:`P' = 2\lambda t^2`, :math:`P'' = 8t^3 - 6t^2`, and with
        :math:`X_k = \sum_gW_gt_g^k\,[O_g, n_g]` (:math:`O_g = C_{or,g}^\top C_{or,g}`, one matrix
        product for :math:`k = 1, 2, 3`): :math:`K = \sum_gW_gC_{rr,g} - \lambda^2X_1`,
        :math:`K' = -2\lambda X_2`, :math:`K'' = -(8X_3 - 6X_2)`;
        :math:`D = \sum_gW_g\tfrac12\log A_g` has :math:`D' = \lambda X_{1,n}` and
        :math:`D'' = 2X_{2,n} - X_{1,n}`; :math:`r^2 = \min_\beta\xi^\top K\xi` has
        :math:`(r^2)' = \hat\xi^\top K'\hat\xi` and
        :math:`(r^2)'' = \hat\xi^\top K''\hat\xi - 2u^\top K_{\beta\beta}^{-1}u`, :math:`u = (K'\hat\xi)_\beta`
        (the change of :math:`\hat\beta`); finally :math:`\ell_p' = -D' - \tfrac{N_w}2(r^2)'/r^2` and
        :math:`\ell_p'' = -D'' - \tfrac{N_w}2\bigl((r^2)''/r^2 - ((r^2)'/r^2)^2\bigr)`.
        """
        w, n_w, k_const = self._pick(idx)
        b, g = w.shape
        p, r = self.p, self.p + 1
        lam = theta.reshape(b, 1)
        t = torch.reciprocal((lam * lam) * self.c_oo.reshape(1, g) + 1.0)       # (B, G)
        logdet_sum = -0.5 * (w * torch.log(t)).sum(-1)
        wt = torch.empty(order + 1, b, g, dtype=t.dtype, device=t.device)      # W t^k, k = 1..order+1
        torch.mul(w, t, out=wt[0])
        for k in range(order):
            torch.mul(wt[k], t, out=wt[k + 1])
        x = (self.outer_t @ wt.reshape(-1, g).transpose(0, 1)).transpose(0, 1).reshape(order + 1, b, r * r + 1)
        lam = lam[:, 0]
        beta, r2, sigma2, k_top, ell = self._profiled(k_const - (lam * lam)[:, None] * x[0, :, :-1], n_w, logdet_sum)
        if order == 0:
            return -ell / n_w, None, None, beta, sigma2
        xi = torch.cat([beta, -torch.ones_like(beta[:, :1])], dim=1)           # (B, r)
        x2 = x[1, :, :-1].reshape(b, r, r)
        k1_xi = -2.0 * lam[:, None] * (x2 @ xi[:, :, None])[:, :, 0]            # K' xi
        dr2 = (k1_xi * xi).sum(-1)
        ell1 = -lam * x[0, :, -1] - 0.5 * n_w * dr2 / r2
        grad = (-ell1 / n_w)[:, None]
        if order < 2:
            return -ell / n_w, grad, None, beta, sigma2
        k2 = -(8.0 * x[2, :, :-1] - 6.0 * x[1, :, :-1]).reshape(b, r, r)
        u = k1_xi[:, :p]
        ddr2 = (((k2 @ xi[:, :, None])[:, :, 0] * xi).sum(-1)
                - 2.0 * (u * torch.linalg.solve(k_top[:, :p, :p], u)).sum(-1))
        ell2 = -(2.0 * x[1, :, -1] - x[0, :, -1]) - 0.5 * n_w * (ddr2 / r2 - (dr2 / r2) ** 2)
        return -ell / n_w, grad, (-ell2 / n_w)[:, None, None], beta, sigma2

    def value_and_grad(self, theta: torch.Tensor, idx=None, order: int = 1):
        """``(value (B,), gradient (B, n_theta), Hessian (B, 1, 1) or None)`` of :math:`-\\ell_p/N_w`;
        the Hessian when ``order`` is 2 and the level has one random effect."""
        return self.profile(theta, idx, order)[:3]

    def estimates(self, theta: torch.Tensor, idx=None) -> torch.Tensor:
        r"""``(B, p + n_tau)``: :math:`\hat\beta`, then
        :math:`\tau = \operatorname{free}(\hat\sigma^2\Lambda\Lambda^\top)` and :math:`\hat\sigma^2` last, with
        diagonal :math:`\theta` entries below 1e-6 set to zero (as the full fit)."""
        tiny = diagonal_theta_mask(self.term_sizes).to(theta.device) & (theta.abs() < BOUNDARY_TOL)
        theta = torch.where(tiny, torch.zeros_like(theta), theta)
        _, _, _, beta, sigma2 = self.profile(theta, idx, order=0)
        lam = lambda_from_theta(theta, self.term_sizes)
        tau = tau_from_lambda(lam, self.term_sizes, sigma2[:, None, None])
        return torch.cat([beta, tau, sigma2[:, None]], dim=1)


def _fd_hessian(lik: ReplicateLikelihood, theta: torch.Tensor, grad: torch.Tensor, idx) -> torch.Tensor:
    r"""``(B, k, k)`` Hessians from forward differences of the exact gradients (``grad`` at ``theta``
    is known), step :math:`\sqrt\epsilon(1 + |\theta_s|)`, symmetrised: :math:`k` gradient evaluations.
    A Newton direction needs no more accuracy; the optimum's is that of the gradient test."""
    k = theta.shape[1]
    h = torch.finfo(theta.dtype).eps ** 0.5 * (1 + theta.abs())
    cols = []
    for s in range(k):
        e = torch.zeros_like(theta)
        e[:, s] = h[:, s]
        cols.append((lik.value_and_grad(theta + e, idx)[1] - grad) / h[:, s, None])
    hess = torch.stack(cols, dim=2)
    return 0.5 * (hess + hess.transpose(1, 2))


def newton_all(lik: ReplicateLikelihood, theta0: torch.Tensor, n_rep: int, *, tol: float = 1e-8,
               newton_steps: int = 20, progress=None):
    r"""Damped Newton steps for every replicate together, from the common start ``theta0``.

    The Hessian is exact for one random effect (:meth:`ReplicateLikelihood._profile_scalar`,
    evaluated with the gradient), forward differences of the exact gradient otherwise.
    A replicate stops when its largest gradient entry is below ``tol * 1e-4``, when its Hessian
    is not positive definite or when no step length in 30 halvings passes the test of
    :func:`~torchmix.fit.optimize.minimize` (sufficient decrease, or no increase beyond rounding
    with a smaller gradient).

    Returns
    -------
    theta ``(R, n_theta)``; converged ``(R,)`` bool (largest gradient entry below ``tol``).
    """
    theta = theta0.reshape(1, -1).expand(n_rep, -1).clone()
    order = 2 if lik.q == 1 else 1
    val, g, hess = lik.value_and_grad(theta, None, order)

    def rows(i):   # None: every replicate, in order
        return None if i.numel() == n_rep else i

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
        hi = hess[idx] if hess is not None else _fd_hessian(lik, th, gi, rows(idx))
        chol, info = torch.linalg.cholesky_ex(hi)
        pd = info == 0
        eye = torch.eye(th.shape[1], dtype=th.dtype, device=th.device)
        chol = torch.where(pd[:, None, None], chol, eye)
        step = -torch.cholesky_solve(gi[:, :, None], chol).squeeze(2)
        slope = (gi * step).sum(1)
        noise = 1024 * eps * (1 + vi.abs())
        alpha = torch.ones_like(vi)
        pending = pd.clone()
        new_th, new_v, new_g, new_h = th.clone(), vi.clone(), gi.clone(), hi.clone()
        for _ in range(_HALVINGS):
            sub = torch.nonzero(pending).reshape(-1)
            trial = th[sub] + alpha[sub, None] * step[sub]
            tv, tg, th2 = lik.value_and_grad(trial, rows(idx[sub]), order)
            ok = torch.isfinite(tv) & ((tv <= vi[sub] + 1e-4 * alpha[sub] * slope[sub])
                                       | ((tv <= vi[sub] + noise[sub]) & (tg.abs().amax(1) < gi[sub].abs().amax(1))))
            take = sub[ok]
            new_th[take], new_v[take], new_g[take] = trial[ok], tv[ok], tg[ok]
            if th2 is not None:
                new_h[take] = th2[ok]
            pending[take] = False
            if not bool(pending.any()):
                break
            alpha = torch.where(pending, alpha / 2, alpha)
        moved = pd & ~pending
        theta[idx], val[idx], g[idx] = new_th, new_v, new_g
        if hess is not None:
            hess[idx] = new_h
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
            est = lik.estimates(theta)
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
