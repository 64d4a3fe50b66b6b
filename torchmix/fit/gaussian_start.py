r"""Moment starting values for the two-level linear fit, from the per-group crossproducts.

With the blocks of :mod:`torchmix.likelihood.gaussian` for group :math:`j` (:math:`C_j` ``q x q``,
:math:`R_j` ``q x r``, :math:`D_j` ``r x r``, weight :math:`w_j`, :math:`n_j` rows with conditional
weights summing to :math:`s_j`, mean :math:`\omega_j = s_j/n_j`):

1. :math:`\beta_0` by weighted least squares (:math:`\bar D_{\beta\beta}\beta_0 = \bar D_{\beta y}`),
   :math:`\xi_0 = (\beta_0, -1)`;
2. per group, the regression of the residuals on :math:`Z_j`: :math:`c_j = R_j\xi_0`,
   :math:`\hat b_j = C_j^{-1}c_j` and the within-group sum of squares
   :math:`SS_j = \xi_0^\top D_j\xi_0 - c_j^\top\hat b_j`;
3. :math:`\hat\sigma^2 = \sum_j w_jSS_j / \sum_j w_j\omega_j(n_j - q)` and, since
   :math:`E[\hat b_j\hat b_j^\top] \approx \Sigma + \sigma^2\omega_jC_j^{-1}`,
   :math:`\hat\Sigma = \sum_j w_j(\hat b_j\hat b_j^\top - \hat\sigma^2\omega_jC_j^{-1})/\sum_j w_j`

over the groups where :math:`C_j` is well conditioned and :math:`n_j > q`. The start is
:math:`\theta_0` = the Cholesky factor of :math:`\hat\Sigma/\hat\sigma^2`, per term, with eigenvalues
floored at :data:`EIG_FLOOR` (the columns are standardised, so this is a small relative variance).
It is only a start: the fit then maximises the likelihood. ``None`` when the moments are unusable.
"""

from __future__ import annotations

import torch

from ..covariance import tau_index, theta_from_tau

__all__ = ["moment_theta", "EIG_FLOOR"]

EIG_FLOOR = 1e-2
_RCOND = 1e-8


def _inverse(c: torch.Tensor):
    """Inverses ``(G, q, q)`` of the blocks and a mask ``(G,)`` of the well-conditioned ones."""
    q = c.shape[-1]
    if q == 1:
        ok = c[:, 0, 0] > 0
        return 1.0 / torch.where(ok, c[:, 0, 0], 1.0)[:, None, None], ok
    if q == 2:
        a, b, d = c[:, 0, 0], c[:, 0, 1], c[:, 1, 1]
        det = a * d - b * b
        ok = (a > 0) & (d > 0) & (det > _RCOND * a * d)
        det = torch.where(ok, det, 1.0)
        inv = torch.stack([torch.stack([d, -b], -1), torch.stack([-b, a], -1)], -2) / det[:, None, None]
        return inv, ok
    scale = torch.diagonal(c, dim1=-2, dim2=-1).clamp_min(torch.finfo(c.dtype).tiny).sqrt()
    cs = c / (scale[:, :, None] * scale[:, None, :])
    chol, info = torch.linalg.cholesky_ex(cs)
    ok = info == 0
    diag = torch.diagonal(chol, dim1=-2, dim2=-1)
    ok = ok & (diag.amin(-1) ** 2 > _RCOND * diag.amax(-1) ** 2)
    eye = torch.eye(q, dtype=c.dtype, device=c.device)
    inv = torch.cholesky_inverse(torch.where(ok[:, None, None], chol, eye))
    return inv / (scale[:, :, None] * scale[:, None, :]), ok


def moment_theta(lik) -> torch.Tensor | None:
    r"""Moment start :math:`\theta_0` ``(n_theta,)`` for a two-level
    :class:`~torchmix.likelihood.gaussian.GaussianLikelihood` (None when unusable)."""
    lv = lik.tensors.levels[0]
    q, p = lv.q, lik.p
    w = lv.w_uncond
    dbar = lik.rr_const
    chol, info = torch.linalg.cholesky_ex(dbar[:p, :p])
    if int(info) != 0:
        return None
    beta0 = torch.cholesky_solve(dbar[:p, p:], chol)[:, 0]
    xi = torch.cat([beta0, -torch.ones(1, dtype=beta0.dtype, device=beta0.device)])
    n_groups, r = lik.c_or.shape[0], xi.numel()
    cvec = (lik.c_or.reshape(-1, r) @ xi).reshape(n_groups, q)
    ss = (lik.c_rr.reshape(-1, r) @ xi).reshape(n_groups, r) @ xi
    inv, ok = _inverse(lik.c_oo)
    counts = lik.counts2.to(w.dtype)
    ok = ok & (counts > q) & (w > 0)
    b = (inv * cvec[:, None, :]).sum(-1)
    within = ss - (cvec * b).sum(-1)
    omega = lik.n_w2 / torch.where(w > 0, w, 1.0) / counts.clamp_min(1.0)
    wk = torch.where(ok, w, 0.0)
    den = wk @ (omega * (counts - q))
    if not bool(den > 0):
        return None
    sigma2 = (wk @ within.clamp_min(0.0)) / den
    if not bool(torch.isfinite(sigma2)) or not bool(sigma2 > 0):
        return None
    outer = b[:, :, None] * b[:, None, :] - sigma2 * omega[:, None, None] * inv
    sigma_mat = (wk @ outer.reshape(n_groups, -1)).reshape(q, q) / wk.sum()
    if not bool(torch.isfinite(sigma_mat).all()):
        return None
    ts = lik.term_sizes[0]
    rows, cols = tau_index(ts)
    tau = 0.5 * (sigma_mat + sigma_mat.transpose(0, 1))[rows, cols]
    theta = theta_from_tau(tau, ts, scale=sigma2, eig_floor=EIG_FLOOR)
    return theta if bool(torch.isfinite(theta).all()) else None
