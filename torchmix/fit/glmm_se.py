r"""Hessian, scores and the sandwich for GLMM fits (MATH.md 7.1, 7.4, 6.5).

* Hessian: central finite differences of the exact (autograd) gradient, step
  :math:`h_r=(|\psi_r|+1)\epsilon^{1/4}`, symmetrised; each evaluation re-solves the modes from the
  same warm start.
* Scores: per top-level group, from one backward pass of the AGQ module
  (:meth:`~torchmix.likelihood.agq.AGQLogLik.top_scores`).
* The sandwich :math:`\mathcal H^{-1}J\mathcal H^{-1}` is formed over
  :math:`\psi=(\beta,\theta)` (absolute Cholesky entries, signs normalised) and carried to
  :math:`(\beta,\tau)` by the delta method, :math:`V_\tau = DV_\theta D^\top`,
  :math:`D=\partial\tau/\partial\theta`. This equals forming it over :math:`(\beta,\tau)` directly:
  :math:`\mathcal H_\tau = D^{-\top}\mathcal H_\theta D^{-1}` and :math:`s_\tau = s_\theta D^{-1}` at a
  stationary point, so :math:`\mathcal H_\tau^{-1}J_\tau\mathcal H_\tau^{-1} = D\,V_\theta D^\top`; the
  :math:`\theta` form also stays defined at a zero variance.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..covariance import lambda_from_theta, n_theta, tau_from_lambda, tau_index, theta_index
from ..inference import safe_inverse_negative_hessian, sandwich

__all__ = ["fd_hessian", "tau_of_theta", "tau_jacobian", "boundary_pattern", "assemble"]

EPS_QUARTER = torch.finfo(torch.float64).eps ** 0.25


def fd_hessian(grad_fn: Callable[[torch.Tensor], torch.Tensor], psi: torch.Tensor, free: torch.Tensor) -> torch.Tensor:
    r"""Symmetrised central-difference Hessian of a function with exact gradient ``grad_fn``.

    Parameters
    ----------
    grad_fn : ``(k,) -> (k,)`` gradient.
    psi : ``(k,)`` point; ``free`` : boolean ``(k,)``, coordinates to differentiate.

    Returns
    -------
    tensor ``(m, m)`` over the free coordinates (``m = free.sum()``).
    """
    idx = torch.nonzero(free).flatten().tolist()
    cols = []
    for r in idx:
        h = (abs(float(psi[r])) + 1.0) * EPS_QUARTER
        e = torch.zeros_like(psi)
        e[r] = h
        cols.append((grad_fn(psi + e)[free] - grad_fn(psi - e)[free]) / (2.0 * h))
    hess = torch.stack(cols, dim=1)
    return 0.5 * (hess + hess.transpose(0, 1))


def tau_of_theta(theta_all: torch.Tensor, term_sizes: Sequence[Sequence[int]]) -> torch.Tensor:
    r"""All variance components :math:`\tau` (reporting order) from the concatenated absolute :math:`\theta`."""
    out, pos = [], 0
    for ts in term_sizes:
        k = sum(q * (q + 1) // 2 for q in ts)
        lam = lambda_from_theta(theta_all[pos:pos + k], ts)
        out.append(tau_from_lambda(lam, ts))
        pos += k
    return torch.cat(out)


def tau_jacobian(theta_all: torch.Tensor, term_sizes: Sequence[Sequence[int]]) -> torch.Tensor:
    r""":math:`D=\partial\tau/\partial\theta`, ``(n_tau, n_theta)`` (square, block diagonal over levels).

    With :math:`\tau_j=(\Lambda\Lambda^\top)_{a_jb_j}` and :math:`\theta_i=\Lambda_{r_ic_i}`,
    :math:`D_{ji}=[a_j=r_i]\Lambda_{b_jc_i}+[b_j=r_i]\Lambda_{a_jc_i}` (in closed form, as autograd
    would compute it, without building a graph).
    """
    blocks, pos = [], 0
    for ts in term_sizes:
        k = n_theta(ts)
        lam = lambda_from_theta(theta_all[pos:pos + k], ts)
        r, c = theta_index(ts)
        a, b = (torch.as_tensor(v, dtype=torch.long) for v in tau_index(ts))
        r, c, a, b = (v.to(lam.device) for v in (r, c, a, b))
        blocks.append((a[:, None] == r[None, :]).to(lam.dtype) * lam[b[:, None], c[None, :]]
                      + (b[:, None] == r[None, :]).to(lam.dtype) * lam[a[:, None], c[None, :]])
        pos += k
    return torch.block_diag(*blocks) if blocks else theta_all.new_zeros(0, 0)


def boundary_pattern(theta_all: torch.Tensor, term_sizes: Sequence[Sequence[int]], tol: float):
    r"""Which :math:`\theta` entries to fix at 0 and which components are zero variances (MATH.md 6.5).

    A random effect whose whole row of :math:`T_t` is below ``tol`` in absolute value has variance 0:
    its row is fixed at 0, and its variance and covariances are reported as 0 with SE NaN. A
    diagonal entry below ``tol`` in an otherwise non-zero row (a singular covariance matrix) is fixed
    at 0 as well.

    Returns
    -------
    fixed : bool ``(n_theta,)``; zero_tau : bool ``(n_tau,)``; singular : bool, whether any
    diagonal entry was below ``tol``.
    """
    fixed, zero_tau, singular = [], [], False
    pos = 0
    for ts in term_sizes:
        offset = 0
        for q in ts:
            k = q * (q + 1) // 2
            th = theta_all[pos:pos + k]
            rows, cols = theta_index([q])
            tiny = th.abs() < tol
            row_zero = torch.tensor([bool(tiny[rows == r].all()) for r in range(q)])
            fixed.append(row_zero[rows] | (tiny & (rows == cols)))
            singular = singular or bool((tiny & (rows == cols)).any())
            # reporting order within the term: variances, then covariances (column-major lower)
            zt = [bool(row_zero[r]) for r in range(q)]
            zt += [bool(row_zero[r] or row_zero[c]) for c in range(q) for r in range(c + 1, q)]
            zero_tau.append(torch.tensor(zt, dtype=torch.bool))
            pos += k
            offset += q
    return torch.cat(fixed), torch.cat(zero_tau), singular


def assemble(psi: torch.Tensor, hess: torch.Tensor, free: torch.Tensor, fixed_theta: torch.Tensor,
             zero_tau: torch.Tensor, ell: torch.Tensor, s_beta: torch.Tensor, s_lam: Sequence[torch.Tensor],
             modes: Sequence[torch.Tensor], term_sizes, p: int, w_total: float, small_sample: str) -> dict:
    r"""Estimates and sandwich covariances at the optimum :math:`\psi=(\beta,\theta)` (MATH.md 7.1, 7.4).

    Parameters
    ----------
    psi : ``(p + n_theta,)`` sign-normalised estimates (boundary entries already 0).
    hess : ``(m, m)`` Hessian of :math:`\ell/\sum_k w^{(L)}_k` over the ``free`` coordinates.
    free : bool ``(p + n_theta,)``; fixed_theta : bool ``(n_theta,)``; zero_tau : bool ``(n_tau,)``
        (:func:`boundary_pattern`).
    ell : ``(G_L,)`` contributions; s_beta : ``(G_L, p)`` and s_lam (per level ``(G_L, q_l, q_l)``)
        per-top-group scores (:meth:`~torchmix.likelihood.agq.AGQLogLik.top_scores`).
    modes : per level ``(G_l, q_l)`` spherical modes.

    Returns
    -------
    dict with the :class:`~torchmix.tensors.FitOutput` fields ``beta, cov_beta, cov_beta_model,
    theta, tau, tau_cov, u, b, scores``, ``lnl`` and ``tau_cov_model`` (the model-based covariance
    of ``tau``, for ``extra``).
    """
    dt, dev = psi.dtype, psi.device
    s_theta = []
    for ts, s in zip(term_sizes, s_lam):
        rows, cols = theta_index(ts)
        s_theta.append(s[:, rows, cols])
    scores_psi = torch.cat([s_beta] + s_theta, dim=1)[:, free]
    hess_raw = hess * w_total
    v_free = sandwich(hess_raw, scores_psi, small_sample, what="fixed effects and variance components")
    model_inv = safe_inverse_negative_hessian(hess_raw, what="fixed effects and variance components")
    n_th = psi.numel() - p
    free_theta = ~fixed_theta
    jac = tau_jacobian(psi[p:], term_sizes)[:, free_theta.to(dev)]  # (n_tau, m_theta)
    tau = tau_of_theta(psi[p:], term_sizes)
    tau_cov = jac @ v_free[p:, p:] @ jac.transpose(0, 1)
    tau_cov_model = jac @ model_inv[p:, p:] @ jac.transpose(0, 1)
    zero_tau = zero_tau.to(dev)
    if bool(zero_tau.any()):
        tau = torch.where(zero_tau, torch.zeros_like(tau), tau)
        nan = torch.tensor(float("nan"), dtype=dt, device=dev)
        tau_cov = torch.where(zero_tau[:, None] | zero_tau[None, :], nan, tau_cov)
        tau_cov_model = torch.where(zero_tau[:, None] | zero_tau[None, :], nan, tau_cov_model)
    s_tau = torch.full((scores_psi.shape[0], n_th), float("nan"), dtype=dt, device=dev)
    if int(free_theta.sum()) > 0:
        s_tau_free = scores_psi[:, p:] @ torch.linalg.pinv(jac)
        s_tau = torch.where(zero_tau[None, :], s_tau, s_tau_free)
    thetas, u, b, pos = [], [], [], p
    for ts, mode in zip(term_sizes, modes):
        k = n_theta(ts)
        th = psi[pos:pos + k].clone()
        thetas.append(th)
        u.append(mode)
        b.append(mode @ lambda_from_theta(th, ts).transpose(0, 1))
        pos += k
    return dict(beta=psi[:p].clone(), cov_beta=v_free[:p, :p], cov_beta_model=model_inv[:p, :p], theta=thetas,
                tau=tau, tau_cov=tau_cov, lnl=float(ell.sum()), u=u, b=b, tau_cov_model=tau_cov_model,
                scores=torch.cat([scores_psi[:, :p], s_tau], dim=1))
