r"""Covariance parameterisation of the random effects (MATH.md 1.2).

Each level holds one or more random-effect *terms*; term :math:`t` with :math:`q_t`
columns owns a lower-triangular factor :math:`T_t` whose :math:`q_t(q_t+1)/2` free
entries are filled column by column (lme4 order :math:`T_{11}, T_{21}, \dots, T_{q1}, T_{22}, \dots`).
The level factor is :math:`\Lambda = \operatorname{blockdiag}_t(T_t)` and the level's
covariance is :math:`\Sigma = s\,\Lambda\Lambda^\top` with :math:`s = \sigma^2` (gaussian,
relative factor) or :math:`s = 1` (other families, absolute factor).

Reported variance components of a level (:math:`\tau`): per term, its variances then
its covariances in column-major lower-triangle order. Pure tensor math, no pandas.
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = [
    "n_theta",
    "theta_index",
    "lambda_from_theta",
    "identity_theta",
    "tau_index",
    "tau_from_lambda",
    "theta_from_tau",
    "normalise_theta_signs",
    "diagonal_theta_mask",
    "blank_zero_variances",
]


def n_theta(term_sizes: Sequence[int]) -> int:
    """Number of free Cholesky entries of a level with the given term sizes."""
    return sum(q * (q + 1) // 2 for q in term_sizes)


def theta_index(term_sizes: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column of every free entry of :math:`\\Lambda`, in theta order.

    Returns
    -------
    rows, cols : int64 tensors of shape ``(n_theta,)``.
    """
    rows, cols = [], []
    offset = 0
    for q in term_sizes:
        for c in range(q):
            for r in range(c, q):
                rows.append(offset + r)
                cols.append(offset + c)
        offset += q
    return torch.tensor(rows, dtype=torch.int64), torch.tensor(cols, dtype=torch.int64)


def lambda_from_theta(theta: torch.Tensor, term_sizes: Sequence[int]) -> torch.Tensor:
    r"""Build the block-diagonal lower-triangular :math:`\Lambda` from ``theta``.

    Parameters
    ----------
    theta : tensor ``(n_theta,)`` or ``(..., n_theta)``
    term_sizes : sizes :math:`q_t` of the level's terms.

    Returns
    -------
    tensor ``(..., q, q)`` with :math:`q = \sum_t q_t`. Differentiable in ``theta``.
    """
    q = sum(term_sizes)
    rows, cols = theta_index(term_sizes)
    flat = rows * q + cols
    batch = theta.shape[:-1]
    out = torch.zeros(*batch, q * q, dtype=theta.dtype, device=theta.device)
    out = out.index_add(-1, flat.to(theta.device), theta)
    return out.reshape(*batch, q, q)


def identity_theta(term_sizes: Sequence[int], dtype=torch.float64, device=None) -> torch.Tensor:
    """Theta for :math:`T_t = I` for every term (lme4's starting value)."""
    rows, cols = theta_index(term_sizes)
    return (rows == cols).to(dtype=dtype, device=device)


def diagonal_theta_mask(term_sizes: Sequence[int]) -> torch.Tensor:
    """Boolean mask ``(n_theta,)`` of the theta entries that sit on the diagonal."""
    rows, cols = theta_index(term_sizes)
    return rows == cols


def tau_index(term_sizes: Sequence[int]) -> tuple[list[int], list[int]]:
    """Row and column (in the level's :math:`q\\times q` matrix) of each reported component.

    Order: per term, variances (diagonal) then covariances (column-major strictly lower).
    """
    rows, cols = [], []
    offset = 0
    for q in term_sizes:
        for r in range(q):
            rows.append(offset + r)
            cols.append(offset + r)
        for c in range(q):
            for r in range(c + 1, q):
                rows.append(offset + r)
                cols.append(offset + c)
        offset += q
    return rows, cols


def tau_from_lambda(lam: torch.Tensor, term_sizes: Sequence[int], scale=1.0) -> torch.Tensor:
    r"""Variance components :math:`\tau = \operatorname{free}(s\,\Lambda\Lambda^\top)`.

    Parameters
    ----------
    lam : tensor ``(q, q)``
    scale : :math:`s` (``sigma**2`` for the gaussian relative factor, 1 otherwise);
        a float or a 0-d tensor.

    Returns
    -------
    tensor ``(n_tau,)`` with ``n_tau == n_theta(term_sizes)``.
    """
    sigma_mat = scale * (lam @ lam.transpose(-1, -2))
    rows, cols = tau_index(term_sizes)
    return sigma_mat[..., rows, cols]


def theta_from_tau(tau: torch.Tensor, term_sizes: Sequence[int], scale=1.0, eig_floor: float = 0.0) -> torch.Tensor:
    r"""Inverse of :func:`tau_from_lambda`: the Cholesky factor of :math:`\Sigma/s` as theta.

    A covariance matrix outside the positive semi-definite cone is projected back
    by flooring its eigenvalues at ``eig_floor`` before the factorisation.
    Differentiable where :math:`\Sigma` is positive definite.
    """
    q = sum(term_sizes)
    rows, cols = tau_index(term_sizes)
    sig = torch.zeros(q, q, dtype=tau.dtype, device=tau.device)
    sig = sig.index_put((torch.tensor(rows), torch.tensor(cols)), tau / scale)
    upper = sig.transpose(0, 1).triu(1)
    sig = sig + upper
    thetas = []
    offset = 0
    for qt in term_sizes:
        block = sig[offset:offset + qt, offset:offset + qt]
        evals, evecs = torch.linalg.eigh(block)
        if bool((evals <= eig_floor).any()):
            evals = evals.clamp_min(eig_floor)
            block = (evecs * evals) @ evecs.transpose(0, 1)
        jitter = torch.eye(qt, dtype=tau.dtype, device=tau.device) * 0.0
        chol, info = torch.linalg.cholesky_ex(block + jitter)
        if int(info) != 0:  # singular: fall back to the eigen square root, made triangular by QR
            root = evecs * evals.clamp_min(0).sqrt()
            _, r = torch.linalg.qr(root.transpose(0, 1))
            chol = r.transpose(0, 1)
        for c in range(qt):
            for r in range(c, qt):
                thetas.append(chol[r, c])
        offset += qt
    return torch.stack(thetas)


def normalise_theta_signs(theta: torch.Tensor, term_sizes: Sequence[int]) -> torch.Tensor:
    r"""Flip the sign of each column of :math:`\Lambda` so its diagonal entry is :math:`\ge 0`.

    :math:`\Lambda\Lambda^\top` is unchanged.
    """
    q = sum(term_sizes)
    lam = lambda_from_theta(theta, term_sizes)
    signs = torch.where(torch.diagonal(lam) < 0, -1.0, 1.0).to(theta.dtype)
    lam = lam * signs.reshape(1, q)
    rows, cols = theta_index(term_sizes)
    return lam[rows, cols]


def blank_zero_variances(tau: torch.Tensor, cov: torch.Tensor, level_term_sizes) -> torch.Tensor:
    r"""Set to NaN the rows and columns of ``cov`` whose variance in ``tau`` is exactly zero.

    A variance estimated on the boundary (0) has no standard error. ``tau`` holds the levels'
    components in reporting order (anything after them, such as the residual, is left alone).

    Parameters
    ----------
    tau : ``(n_tau,)``; cov : ``(n_tau, n_tau)``, modified in place and returned;
    level_term_sizes : per level, its term sizes.
    """
    start = 0
    for ts in level_term_sizes:
        rows, cols = tau_index(ts)
        for j, (r, c) in enumerate(zip(rows, cols)):
            if r == c and float(tau[start + j]) == 0.0:
                cov[start + j, :] = float("nan")
                cov[:, start + j] = float("nan")
        start += len(rows)
    return cov
