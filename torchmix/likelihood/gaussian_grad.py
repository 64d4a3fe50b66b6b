r"""Closed-form derivatives of the two-level gaussian log-likelihood (one grouping level).

With the notation of :mod:`torchmix.likelihood.gaussian` for a level-2 group :math:`j` (weight
:math:`w_j`, crossproduct blocks :math:`C_j = C_{oo,j}`, :math:`C_{or,j}`, :math:`C_{rr,j}`),
:math:`A_j = \Lambda^\top C_j\Lambda + I = L_jL_j^\top`, :math:`V_j = L_j^{-1}\Lambda^\top C_{or,j}`,
:math:`S_j = C_{rr,j} - V_j^\top V_j` and :math:`\xi = (\beta, -1)`, put

.. math::
    c_j = C_{or,j}\xi,\qquad m_j = A_j^{-1}\Lambda^\top c_j,\qquad
    \partial_\Lambda\tfrac12\log|A_j| = C_j\Lambda A_j^{-1},\qquad
    \partial_\Lambda(\xi^\top S_j\xi) = -2\,(c_j - C_j\Lambda m_j)\,m_j^\top .

The group contributions :math:`\ell_j = -\tfrac{w_j}2\log|A_j| - \tfrac{N_{w,j}}2\log(2\pi\sigma^2)
- \tfrac{w_j}{2\sigma^2}\xi^\top S_j\xi` of (4.3) then have the scores

.. math::
    \partial_\beta\ell_j = -\tfrac{w_j}{\sigma^2}(S_j\xi)_{1:p},\quad
    \partial_\sigma\ell_j = -\tfrac{N_{w,j}}{\sigma} + \tfrac{w_j}{\sigma^3}\xi^\top S_j\xi,\quad
    \partial_\Lambda\ell_j = -w_jC_j\Lambda A_j^{-1} + \tfrac{w_j}{\sigma^2}(c_j - C_j\Lambda m_j)m_j^\top,

and, by the envelope theorem (:math:`r^2 = \min_\beta \xi^\top K\xi`), the profiled log-likelihood
:math:`\ell_p(\theta)` has :math:`\partial_\Lambda\ell_p = \sum_j\big[-w_jC_j\Lambda A_j^{-1} +
\tfrac{N_w}{r^2}w_j(c_j - C_j\Lambda\hat m_j)\hat m_j^\top\big]` at :math:`\hat\beta`. The
:math:`\theta` derivatives are the entries of :math:`\partial_\Lambda` at the free positions. Every
step is a small per-group operation on :math:`q\times q` and :math:`q\times r` blocks: no autograd
graph, and the functions can be ``vmap``-ed over responses. :func:`hessian_vc` gives the
:math:`(\theta,\sigma)` Hessian in closed form as well.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..covariance import theta_index
from .modes import solve_upper_t

__all__ = ["supported", "known_gradient", "profiled", "profiled_loglik", "scores_by_group", "hessian_vc",
           "standard_error_pieces"]


def supported(lik) -> bool:
    """Whether the closed forms apply: one grouping level (a two-level model)."""
    return len(lik.tensors.levels) == 1


def _group_terms(lik, ps, xi: torch.Tensor):
    r"""Per group: :math:`C\Lambda A^{-1}` ``(G, q, q)``, :math:`c - C\Lambda m` and :math:`m` ``(G, q)``,
    :math:`u = V\xi` ``(G, q)``."""
    chol, v, lam = ps.chol[0], ps.v[0], ps.lams[0]
    c_oo = lik.c_oo
    c = lik.c_or @ xi                                               # (G, q)
    u = v @ xi                                                      # (G, q) = L^{-1} Lambda' c
    m = solve_upper_t(chol, u[:, :, None])[:, :, 0]                 # A^{-1} Lambda' c
    c_lam = c_oo @ lam                                              # (G, q, q) = C Lambda
    # C Lambda A^{-1} = (A^{-1} Lambda' C)' with A^{-1} = L^{-T} L^{-1}
    a_inv_lam_c = solve_upper_t(chol, _lower_solve(chol, c_lam.transpose(1, 2)))
    resid = c - (c_lam @ m[:, :, None])[:, :, 0]
    return a_inv_lam_c.transpose(1, 2), resid, m, u


def _lower_solve(chol, b):
    from .smallmat import solve_lower

    return b / chol if chol.shape[-1] == 1 else solve_lower(chol, b)


def _theta_entries(lik, grad_lam: torch.Tensor) -> torch.Tensor:
    rows, cols = theta_index(lik.term_sizes[0])
    return grad_lam[..., rows.to(grad_lam.device), cols.to(grad_lam.device)]


def profiled_loglik(lik, theta: torch.Tensor):
    r""":math:`\ell_p(\theta)` and its gradient ``(n_theta,)`` in closed form (two levels)."""
    ell, beta, sigma2, _, ps = lik.profile([theta])
    xi = torch.cat([beta, -torch.ones(1, dtype=beta.dtype, device=beta.device)])
    logdet_part, resid, m, _ = _group_terms(lik, ps, xi)
    w = lik.tensors.levels[0].w_uncond
    r2 = sigma2 * lik.n_w
    grad_lam = (-torch.einsum("g,gab->ab", w, logdet_part)
                + (lik.n_w / r2) * torch.einsum("g,ga,gb->ab", w, resid, m))
    return ell, _theta_entries(lik, grad_lam)


def _at(lik, beta: torch.Tensor, theta: torch.Tensor):
    """One integration pass and the per-group terms at :math:`(\beta, \theta)`."""
    ps = lik.integrate([theta])
    xi = torch.cat([beta, -torch.ones(1, dtype=beta.dtype, device=beta.device)])
    terms = _group_terms(lik, ps, xi)
    s_xi = lik.c_rr @ xi - (ps.v[0].transpose(1, 2) @ terms[3][:, :, None])[:, :, 0]   # (G, r) = S xi
    return ps, xi, terms, s_xi


def standard_error_pieces(lik, beta: torch.Tensor, theta: torch.Tensor, sigma: torch.Tensor):
    r"""Scores ``(G, p + n_theta + 1)``, :math:`K_{\beta\beta}` ``(p, p)`` and the :math:`(\theta,\sigma)`
    Hessian from one integration pass."""
    at = _at(lik, beta, theta)
    p = beta.shape[-1]
    return (scores_by_group(lik, beta, theta, sigma, at), lik.k_top(at[0])[:p, :p],
            hessian_vc(lik, beta, theta, sigma, at))


def scores_by_group(lik, beta: torch.Tensor, theta: torch.Tensor, sigma: torch.Tensor, at=None) -> torch.Tensor:
    r"""Per-group scores of (4.3) over :math:`\psi = (\beta, \theta, \sigma)`, ``(G, p + n_theta + 1)``."""
    ps, xi, (logdet_part, resid, m, u), s_xi = _at(lik, beta, theta) if at is None else at
    w = lik.tensors.levels[0].w_uncond
    quad = s_xi @ xi
    sigma2 = sigma * sigma
    p = beta.shape[-1]
    s_beta = -(w / sigma2)[:, None] * s_xi[:, :p]
    s_sigma = -lik.n_w_top / sigma + w * quad / (sigma2 * sigma)
    s_lam = w[:, None, None] * (-logdet_part + resid[:, :, None] * m[:, None, :] / sigma2)
    return torch.cat([s_beta, _theta_entries(lik, s_lam), s_sigma[:, None]], dim=1)


def hessian_vc(lik, beta: torch.Tensor, theta: torch.Tensor, sigma: torch.Tensor, at=None) -> torch.Tensor:
    r"""Hessian of :math:`\ell(\beta,\theta,\sigma)` over :math:`(\theta, \sigma)` at fixed :math:`\beta`, in closed form.

    With :math:`P = A^{-1}`, :math:`B = A^{-1}\Lambda^\top C`, :math:`\rho = c - C\Lambda m` and
    :math:`E = e_ae_b^\top`, :math:`F = e_ce_d^\top` (entries of :math:`\Lambda`), per group

    .. math::
        \partial^2_{EF}\tfrac12\log|A| = P_{bd}C_{ca} - P_{bd}(C\Lambda B)_{ca} - B_{bc}B_{da},

        \tfrac12\partial^2_{EF}\,c^\top\Lambda m = -C_{ac}m_bm_d - m_bB_{da}\rho_c + m_b(C\Lambda B)_{ac}m_d
        + \rho_aP_{bd}\rho_c - \rho_aB_{bc}m_d,

    and :math:`\ell_j = -w_j\tfrac12\log|A_j| + \tfrac{w_j}{2\sigma^2}c_j^\top\Lambda m_j + \dots`;
    the :math:`\sigma` entries are :math:`\sum_j (N_{w,j}/\sigma^2 - 3w_j\xi^\top S_j\xi/\sigma^4)` and
    :math:`-\tfrac2{\sigma^3}\sum_j w_j\rho_jm_j^\top`. Shape ``(n_theta + 1, n_theta + 1)``.
    """
    ps, xi, (logdet_part, rho, m, u), s_xi = _at(lik, beta, theta) if at is None else at
    chol, lam, c = ps.chol[0], ps.lams[0], lik.c_oo
    q = c.shape[-1]
    w = lik.tensors.levels[0].w_uncond
    eye = torch.eye(q, dtype=c.dtype, device=c.device).expand(c.shape[0], q, q)
    p_inv = solve_upper_t(chol, _lower_solve(chol, eye))            # A^{-1}
    b_mat = logdet_part.transpose(1, 2)                             # A^{-1} Lambda' C
    clb = (c @ lam) @ b_mat                                         # C Lambda A^{-1} Lambda' C
    wm, wr = w[:, None] * m, w[:, None] * rho
    logdet2 = (torch.einsum("gbd,gca->abcd", w[:, None, None] * p_inv, c - clb)
               - torch.einsum("gbc,gda->abcd", w[:, None, None] * b_mat, b_mat))
    quad2 = (-torch.einsum("gac,gb,gd->abcd", c, wm, m) - torch.einsum("gb,gda,gc->abcd", wm, b_mat, rho)
             + torch.einsum("gb,gac,gd->abcd", wm, clb, m) + torch.einsum("ga,gbd,gc->abcd", wr, p_inv, rho)
             - torch.einsum("ga,gbc,gd->abcd", wr, b_mat, m))
    sigma2 = sigma * sigma
    h_lam = (-logdet2 + quad2 / sigma2).reshape(q * q, q * q)
    rows, cols = theta_index(lik.term_sizes[0])
    flat = (rows * q + cols).to(c.device)
    h_tt = h_lam[flat][:, flat]
    h_ts = (-2.0 / (sigma2 * sigma)) * _theta_entries(lik, torch.einsum("ga,gb->ab", wr, m))
    h_ss = (lik.n_w_top / sigma2 - 3.0 * w * (s_xi @ xi) / (sigma2 * sigma2)).sum()
    top = torch.cat([h_tt, h_ts[:, None]], dim=1)
    bottom = torch.cat([h_ts, h_ss.reshape(1)])[None, :]
    return torch.cat([top, bottom], dim=0)


class _KnownGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, value_and_grad):
        with torch.no_grad():
            value, grad = value_and_grad(x.detach())
        ctx.save_for_backward(grad)
        return value

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return grad_out * grad, None


def known_gradient(x: torch.Tensor, value_and_grad) -> torch.Tensor:
    r"""A differentiable 0-d tensor :math:`f(x)` whose backward is a gradient computed with it.

    ``value_and_grad(x) -> (f(x), \nabla f(x))`` (a 0-d tensor and one of ``x``'s shape) is called
    once, without autograd; backpropagating ``g`` into the result gives :math:`g\,\nabla f(x)`.
    """
    return _KnownGradient.apply(x, value_and_grad)


def profiled(lik, thetas: Sequence[torch.Tensor]) -> torch.Tensor:
    r""":math:`\ell_p(\theta)` as a differentiable 0-d tensor whose backward is the closed-form gradient."""
    return known_gradient(thetas[0], lambda t: profiled_loglik(lik, t))
