r"""The adaptation step of two-level AGQ: mode correction and quadrature curvature, differentiable.

Given the modes :math:`\hat u` found without a graph (:func:`~torchmix.likelihood.modes.newton_modes_2`),

.. math::
    \hat\eta = \eta^0 + \tilde z\cdot\hat u_{g},\quad
    \gamma_j = \sum_{i\in j} w_{i\mid j}\,\partial_\eta\log f(\hat\eta_i)\,\tilde z_i - \hat u_j,\quad
    u^\ast_j = \hat u_j + H_{{\rm obs},j}^{-1}\gamma_j,

    \eta^\ast = \eta^0 + \tilde z\cdot u^\ast_{g},\qquad
    H_j = \sum_{i\in j} w_{i\mid j} W(\eta^\ast_i)\,\tilde z_i\tilde z_i^\top + I,

with :math:`H_{\rm obs}` (observed curvature at :math:`\hat u`) held constant: :math:`u^\ast` equals
:math:`\hat u` to rounding and its derivative is the implicit derivative of the mode (MATH.md 5.6).
:func:`adapt2` returns :math:`(u^\ast, \eta^\ast, H)` as functions of :math:`(\eta^0, \tilde Z)` with a
hand-written backward pass (a handful of :math:`N`-sized operations); :func:`adapt2_autograd` is the
same computation through autograd (used when the dispersion needs a gradient, and as a check).
"""

from __future__ import annotations

import torch

from .modes import chol, chol_solve, linear_predictor, weighted_outer
from .segments import Grouping

__all__ = ["adapt2", "adapt2_autograd", "observed_chol"]


def observed_chol(family, y, w1, g: Grouping, eta, zl, kappa, curv=None):
    r"""Cholesky factor of :math:`\sum w_{i\mid j}(-\partial^2_\eta\log f)\tilde z\tilde z^\top + I` (negative
    curvature dropped where the result would not be positive definite), no graph."""
    with torch.no_grad():
        if curv is None:
            curv = family.derivs(y, eta, kappa)[2]
        eye = torch.eye(zl.shape[1], dtype=zl.dtype, device=zl.device)
        try:
            return chol(weighted_outer(w1 * curv, zl, zl, g) + eye)
        except torch.linalg.LinAlgError:  # not log-concave here
            return chol(weighted_outer(w1 * curv.clamp_min(0.0), zl, zl, g) + eye)


def adapt2_autograd(family, y, w1, g: Grouping, eta0, zl, u_hat, kappa=None):
    """:math:`(u^\\ast, \\eta^\\ast, H)` through autograd (differentiable in ``kappa`` too)."""
    eta_hat = linear_predictor(eta0, [(zl, u_hat, g)])
    grad = g.sum((w1 * family.d1(y, eta_hat, kappa))[:, None] * zl) - u_hat
    chol_obs = observed_chol(family, y, w1, g, eta_hat.detach(), zl.detach(), kappa)
    u_star = u_hat + chol_solve(chol_obs, grad[:, :, None])[:, :, 0]
    eta_star = linear_predictor(eta0, [(zl, u_star, g)])
    eye = torch.eye(zl.shape[1], dtype=zl.dtype, device=zl.device)
    hess = weighted_outer(w1 * family.fisher_w(eta_star, kappa), zl, zl, g) + eye
    return u_star, eta_star, hess


def adapt2(family, y, w1, g: Grouping, eta0, zl, u_hat, kappa=None, at_mode=None):
    """:math:`(u^\\ast\\ (G, q), \\eta^\\ast\\ (N,), H\\ (G, q, q))` with the hand-written backward.

    ``at_mode`` optionally passes ``(eta_hat, d1, curvature)`` already evaluated at ``u_hat``.
    """
    if torch.is_tensor(kappa) and kappa.requires_grad:
        return adapt2_autograd(family, y, w1, g, eta0, zl, u_hat, kappa)
    return _Adapt2.apply(eta0, zl, u_hat.detach(), (family, y, w1, g, kappa, at_mode))


def _rowdot(a, b):
    return a[:, 0] * b[:, 0] if a.shape[1] == 1 else (a * b).sum(-1)


class _Adapt2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, eta0, zl, u_hat, consts):
        family, y, w1, g, kappa, at_mode = consts
        if at_mode is not None:
            eta_hat, d1, curv = at_mode
        else:
            eta_hat = linear_predictor(eta0, [(zl, u_hat, g)])
            d1, _, curv = family.derivs(y, eta_hat, kappa)
        gamma = g.sum((w1 * d1)[:, None] * zl) - u_hat
        chol_obs = observed_chol(family, y, w1, g, eta_hat, zl, kappa, curv=curv)
        delta = chol_solve(chol_obs, gamma[:, :, None])[:, :, 0]
        u_star = u_hat + delta
        eta_star = linear_predictor(eta_hat, [(zl, delta, g)])
        w = family.fisher_w(eta_star, kappa)
        dw = family.dfisher_w(eta_star, kappa)
        eye = torch.eye(zl.shape[1], dtype=zl.dtype, device=zl.device)
        hess = weighted_outer(w1 * w, zl, zl, g) + eye
        ctx.consts = consts[:5]
        ctx.save_for_backward(zl, u_hat, u_star, chol_obs, d1, curv, w, dw)
        return u_star, eta_star, hess

    @staticmethod
    def backward(ctx, g_u, g_eta, g_h):
        zl, u_hat, u_star, chol_obs, d1, curv, w, dw = ctx.saved_tensors
        family, y, w1, g, kappa = ctx.consts
        q = zl.shape[1]
        if q == 1:
            return _backward_scalar(g, w1, zl[:, 0], u_hat[:, 0], u_star[:, 0], chol_obs[:, 0, 0], d1, curv, w, dw,
                                    g_u, g_eta, g_h)
        g_u = torch.zeros_like(u_star) if g_u is None else g_u
        g_eta = torch.zeros_like(w) if g_eta is None else g_eta.clone()
        g_zl = torch.zeros_like(zl)
        if g_h is not None:  # H = sum w1 W(eta*) zl zl' + I
            gh = g.gather(g_h)  # (N, q, q)
            if q == 1:
                quad = gh[:, 0, 0] * zl[:, 0] * zl[:, 0]
                g_zl += (2.0 * w1 * w * gh[:, 0, 0] * zl[:, 0])[:, None]
            else:
                quad = torch.einsum("nr,nrs,ns->n", zl, gh, zl)
                g_zl += (w1 * w)[:, None] * ((gh + gh.transpose(-1, -2)) @ zl[:, :, None])[:, :, 0]
            g_eta += w1 * dw * quad
        # eta* = eta0 + zl . u*[g]
        g_eta0 = g_eta.clone()
        g_zl += g_eta[:, None] * g.gather(u_star)
        g_ustar = g_u + g.sum(g_eta[:, None] * zl)
        # u* = u_hat + H_obs^{-1} gamma ; gamma = sum w1 d1(eta_hat) zl - u_hat
        g_gamma = g.gather(chol_solve(chol_obs, g_ustar[:, :, None])[:, :, 0])  # (N, q)
        g_eta_hat = -(w1 * curv) * _rowdot(zl, g_gamma)
        g_zl += (w1 * d1)[:, None] * g_gamma
        # eta_hat = eta0 + zl . u_hat[g]
        g_eta0 += g_eta_hat
        g_zl += g_eta_hat[:, None] * g.gather(u_hat)
        return g_eta0, g_zl, None, None


def _backward_scalar(g: Grouping, w1, z, u_hat, u_star, l_obs, d1, curv, w, dw, g_u, g_eta, g_h):
    """The backward of :class:`_Adapt2` for one random effect per group, with few row-sized passes."""
    n_rows = z.shape[0]
    g_eta_star = torch.zeros_like(z) if g_eta is None else g_eta.clone()
    if g_h is not None:
        gh = g.gather(g_h[:, 0, 0])
        g_eta_star.addcmul_(w1 * dw * z * z, gh)
        g_zl = (2.0 * w1 * w * z).mul_(gh)
    else:
        g_zl = torch.zeros(n_rows, dtype=z.dtype, device=z.device)
    g_zl.addcmul_(g_eta_star, g.gather(u_star))
    g_ustar = g.sum((g_eta_star * z)[:, None])[:, 0]
    if g_u is not None:
        g_ustar = g_ustar + g_u[:, 0]
    g_gamma = g.gather(g_ustar / (l_obs * l_obs))
    g_eta_hat = (w1 * curv * z).mul_(g_gamma).neg_()
    g_zl.addcmul_(w1 * d1, g_gamma)
    g_zl.addcmul_(g_eta_hat, g.gather(u_hat))
    return g_eta_star.add_(g_eta_hat), g_zl[:, None], None, None
