r"""Conditional (posterior) distribution of the random effects given the data, at the estimates.

What is computed (docs/MATH.md section 14):

* **Gaussian family, closed form, any number of levels.** Given :math:`y` and the estimates
  :math:`(\hat\beta,\hat\Lambda,\hat\sigma)`, the pseudo-model of section 4 integrates levels out bottom
  up; a level-:math:`l` group :math:`g` has, *given the effects of its ancestors*, the Gaussian posterior
  :math:`u_g\mid\text{anc}\sim N(\hat u_g(\text{anc}),\ \sigma^2A_g^{-1})` with
  :math:`A_g=\Lambda_l^\top K_{g,oo}\Lambda_l+I` (children enter :math:`K_g` with their conditional
  weights, level-1 rows with :math:`w_{i\mid j}`) and a mean linear in the ancestors' effects,
  :math:`\hat u_g = -A_g^{-1}B_g\rho_g`. Walking top-down, the joint covariance of a group's chain
  (own effects and all ancestors') is

  .. math:: \operatorname{Var}(u_g)=\sigma^2A_g^{-1}+M_gP_gM_g^\top,\qquad
            \operatorname{Cov}(u_g,b_{\text{anc}})=-M_gP_g,

  :math:`M_g` the ancestor columns of :math:`A_g^{-1}B_g` and :math:`P_g` the ancestors' chain
  covariance; :math:`\operatorname{Var}(b_g)=\Lambda_l\operatorname{Var}(u_g)\Lambda_l^\top`. With unit
  weights this is exactly the diagonal block of the joint posterior covariance
  :math:`\sigma^2\Lambda(\Lambda^\top Z^\top Z\Lambda+I)^{-1}\Lambda^\top` (lme4's ``condVar``; :math:`\beta`
  held at :math:`\hat\beta`). With weights, each level's own uncertainty uses the conditional weights
  of its members, and the ancestors' uncertainty is propagated through the conditional mean, as the
  nested quadrature rule (MATH.md 5.4) does.
* **Other families, quadrature.** Two levels: with the AGQ nodes
  :math:`u_{j\mathbf m}=\hat u_j+R_j^{-1}z_{\mathbf m}` and weights
  :math:`p_{j\mathbf m}\propto\omega_{\mathbf m}e^{\|z_{\mathbf m}\|^2/2+g_j(u_{j\mathbf m})}`, the posterior
  mean :math:`\sum_{\mathbf m}p_{j\mathbf m}u_{j\mathbf m}` and covariance
  :math:`\sum_{\mathbf m}p_{j\mathbf m}(u_{j\mathbf m}-\bar u_j)(u_{j\mathbf m}-\bar u_j)^\top`. Three
  levels: the nested rule of (5.2); the level-3 weights are the outer-node terms of (5.2), the
  level-2 moments mix the inner-node moments over the outer nodes (law of total variance).
  ``n_quad = 1`` gives the Laplace answer (mode, inverse curvature).

Pure tensor math: no pandas.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .covariance import lambda_from_theta
from .likelihood.gaussian import GaussianLikelihood
from .likelihood.modes import (arrow_blocks, arrow_factor, chol, chol_solve, linear_predictor, newton_modes_2,
                               newton_modes_3, solve_upper_t, weighted_outer)
from .likelihood.segments import Grouping
from .quadrature import product_grid
from .tensors import ModelTensors

__all__ = ["Posterior", "gaussian_posterior", "quadrature_posterior"]

CHUNK_ELEMS = 2 ** 22


@dataclass
class Posterior:
    r"""Conditional moments of the random effects per level (level 2 first).

    Attributes
    ----------
    mean : list of ``(G_l, q_l)`` posterior means of :math:`b` (gaussian: the modes).
    cov : list of ``(G_l, q_l, q_l)`` posterior covariances of :math:`b`.
    """

    mean: list
    cov: list

    @property
    def sd(self) -> list:
        """Posterior standard deviations ``(G_l, q_l)`` per level."""
        return [torch.diagonal(c, dim1=-2, dim2=-1).clamp_min(0.0).sqrt() for c in self.cov]


def _inv_from_chol(l: torch.Tensor) -> torch.Tensor:
    eye = torch.eye(l.shape[-1], dtype=l.dtype, device=l.device).expand(l.shape[0], -1, -1)
    return chol_solve(l, eye.contiguous())


def gaussian_posterior(tensors: ModelTensors, thetas: Sequence[torch.Tensor], beta: torch.Tensor,
                       sigma: float) -> Posterior:
    r"""Closed-form conditional covariances of the random effects of a gaussian model.

    Parameters
    ----------
    tensors : the model (any number of levels).
    thetas : per level ``(n_theta_l,)`` relative Cholesky entries (:math:`\Sigma_l=\sigma^2\Lambda_l\Lambda_l^\top`).
    beta : ``(p,)`` fixed effects; sigma : residual standard deviation.

    Returns
    -------
    :class:`Posterior` with means :math:`\hat b` and covariances ``(G_l, q_l, q_l)`` (see module text).
    """
    lik = GaussianLikelihood(tensors)
    with torch.no_grad():
        ps = lik.integrate(thetas)
        us = lik.modes(thetas, beta, ps)
    levels = tensors.levels
    s2 = float(sigma) ** 2
    n = len(levels)
    means, covs = [None] * n, [None] * n
    chain = None  # (G_l, Q, Q) covariance of (b_l, b_{l+1}, ..., b_L) of each level-l group
    for idx in range(n - 1, -1, -1):
        lchol, v, lam = ps.chol[idx], ps.v[idx], ps.lams[idx]
        var_u = s2 * _inv_from_chol(lchol)  # (G, q, q)
        if chain is None:
            cov_anc = None
        else:
            p_anc = chain[levels[idx].parent]  # (G, Q, Q)
            qa = p_anc.shape[-1]
            m = solve_upper_t(lchol, v[:, :, :qa].contiguous())  # A^{-1} B restricted to ancestors' b
            mp = m @ p_anc
            var_u = var_u + mp @ m.transpose(-1, -2)
            cov_anc = -(lam @ mp)  # Cov(b_g, b_anc) = -Lambda M P
        var_b = lam @ var_u @ lam.transpose(0, 1)
        var_b = 0.5 * (var_b + var_b.transpose(-1, -2))
        if cov_anc is None:
            chain = var_b
        else:
            top_row = torch.cat([var_b, cov_anc], dim=2)
            bottom = torch.cat([cov_anc.transpose(-1, -2), p_anc], dim=2)
            chain = torch.cat([top_row, bottom], dim=1)
        means[idx] = us[idx] @ lam.transpose(0, 1)
        covs[idx] = var_b
    return Posterior(mean=means, cov=covs)


def _node_offsets(lchol: torch.Tensor, nodes: torch.Tensor) -> torch.Tensor:
    r""":math:`R^{-1}z_{\mathbf m}` for lower ``lchol (G, q, q)`` (:math:`R=L^\top`) and ``nodes (M, q)`` -> ``(G, M, q)``."""
    rhs = nodes.transpose(0, 1).expand(lchol.shape[0], -1, -1).contiguous()
    return solve_upper_t(lchol, rhs).transpose(-1, -2)


def _rowdot(zl: torch.Tensor, d: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    r"""Per row :math:`\tilde z_i\cdot d_{g(i),\dots}`: ``zl (N, q)``, ``d (G, ..., q)`` -> ``(N, ...)``."""
    gathered = d.index_select(0, g)
    shape = (zl.shape[0],) + (1,) * (gathered.dim() - 2) + (zl.shape[1],)
    return (zl.reshape(shape) * gathered).sum(-1)


def _moments(p: torch.Tensor, pts: torch.Tensor):
    r"""Mean and covariance of the discrete distribution ``p (..., M)`` on points ``pts (..., M, q)``."""
    mean = (p[..., None] * pts).sum(-2)
    d = pts - mean[..., None, :]
    cov = (p[..., None, None] * d[..., :, None] * d[..., None, :]).sum(-3)
    return mean, cov


def quadrature_posterior(tensors: ModelTensors, family, beta: torch.Tensor, lambdas: Sequence[torch.Tensor],
                         n_quad: int, modes: Optional[Sequence[torch.Tensor]] = None, kappa=None,
                         chunk_elems: int = CHUNK_ELEMS) -> Posterior:
    r"""Posterior means and covariances of the random effects by adaptive Gauss-Hermite quadrature.

    Parameters
    ----------
    tensors : a 2- or 3-level model; family : its family.
    beta : ``(p,)``; lambdas : per level the absolute ``(q_l, q_l)`` factor :math:`\Lambda_l`.
    n_quad : nodes per random effect (1: Laplace, mean = mode and covariance = inverse curvature).
    modes : optional spherical modes per level (warm start).
    kappa : dispersion passed to the family (gaussian :math:`\sigma^2`, for checks).

    Returns
    -------
    :class:`Posterior` of :math:`b_g=\Lambda_l u_g` (means ``(G_l, q_l)``, covariances ``(G_l, q_l, q_l)``).
    """
    with torch.no_grad():
        if tensors.n_levels == 2:
            mu, cu = _two_levels(tensors, family, beta, lambdas[0], n_quad, modes, kappa, chunk_elems)
            mus, cus = [mu], [cu]
        elif tensors.n_levels == 3:
            mus, cus = _three_levels(tensors, family, beta, lambdas, n_quad, modes, kappa, chunk_elems)
        else:
            raise ValueError("quadrature posteriors are available for 2 and 3 levels")
        means = [m @ lam.transpose(0, 1) for m, lam in zip(mus, lambdas)]
        covs = [lam @ c @ lam.transpose(0, 1) for c, lam in zip(cus, lambdas)]
    return Posterior(mean=means, cov=covs)


def _eta0(tensors: ModelTensors, beta):
    eta0 = tensors.X @ beta
    return eta0 if tensors.offset is None else eta0 + tensors.offset


def _two_levels(tensors, family, beta, lam, n_quad, modes, kappa, chunk_elems):
    lv = tensors.levels[0]
    y, w1 = tensors.y, tensors.w1_cond
    g = Grouping(lv.group, lv.n_groups)
    zl = lv.Z @ lam
    eta0 = _eta0(tensors, beta)
    u0 = modes[0] if modes is not None else torch.zeros(lv.n_groups, lv.q, dtype=y.dtype, device=y.device)
    u_hat, _, _, _ = newton_modes_2(family, y, w1, g, eta0, zl, u0, kappa)
    eta_hat = linear_predictor(eta0, [(zl, u_hat, g)])
    eye = torch.eye(lv.q, dtype=y.dtype, device=y.device)
    lchol = chol(weighted_outer(w1 * family.fisher_w(eta_hat, kappa), zl, zl, g) + eye)
    if n_quad == 1:
        return u_hat, _inv_from_chol(lchol)
    grid = product_grid(n_quad, lv.q, dtype=y.dtype, device=y.device)
    offs = _node_offsets(lchol, grid.nodes)  # (G, M, q)
    n_nodes = offs.shape[1]
    step = max(1, chunk_elems // max(y.shape[0], 1))
    vals = []
    for m0 in range(0, n_nodes, step):
        d = offs[:, m0:m0 + step]
        eta = eta_hat[:, None] + _rowdot(zl, d, lv.group)
        lf = g.sum(w1[:, None] * family.logf(y[:, None], eta, kappa))
        vals.append(lf - 0.5 * ((u_hat[:, None, :] + d) ** 2).sum(-1))
    total = grid.log_weights_plus_norm + torch.cat(vals, dim=1)  # (G, M)
    p = torch.softmax(total, dim=1)
    return _moments(p, u_hat[:, None, :] + offs)


def _three_levels(tensors, family, beta, lambdas, n_quad, modes, kappa, chunk_elems):
    lv2, lv3 = tensors.levels[0], tensors.levels[1]
    y, w1, w2 = tensors.y, tensors.w1_cond, lv2.w_cond
    dt, dev = y.dtype, y.device
    g2, g3 = Grouping(lv2.group, lv2.n_groups), Grouping(lv3.group, lv3.n_groups)
    parent = Grouping(lv2.parent, lv3.n_groups)
    zl2, zl3 = lv2.Z @ lambdas[0], lv3.Z @ lambdas[1]
    eta0 = _eta0(tensors, beta)
    if modes is not None:
        u0, v0 = modes[0], modes[1]
    else:
        u0 = torch.zeros(lv2.n_groups, lv2.q, dtype=dt, device=dev)
        v0 = torch.zeros(lv3.n_groups, lv3.q, dtype=dt, device=dev)
    u_hat, v_hat, _, _ = newton_modes_3(family, y, w1, g2, g3, parent, w2, eta0, zl2, zl3, u0, v0, kappa)
    eta_hat = linear_predictor(eta0, [(zl2, u_hat, g2), (zl3, v_hat, g3)])
    a, b, d = arrow_blocks(w1, family.fisher_w(eta_hat, kappa), zl2, zl3, g2)
    fac = arrow_factor(a, b, d, w2, parent)
    c = fac.a_inv_b  # (G2, q2, q3)
    if n_quad == 1:
        var_v = _inv_from_chol(fac.chol_s)
        var_u = _inv_from_chol(fac.chol_a) + c @ var_v[lv2.parent] @ c.transpose(-1, -2)
        return [u_hat, v_hat], [var_u, var_v]
    grid2 = product_grid(n_quad, lv2.q, dtype=dt, device=dev)
    grid3 = product_grid(n_quad, lv3.q, dtype=dt, device=dev)
    outer = _node_offsets(fac.chol_s, grid3.nodes)  # (G3, M3, q3)
    inner = _node_offsets(fac.chol_a, grid2.nodes)  # (G2, M2, q2)
    n_outer, n_inner = outer.shape[1], inner.shape[1]
    step = max(1, chunk_elems // max(y.shape[0] * n_inner, 1))
    logs, means, covs = [], [], []
    for m0 in range(0, n_outer, step):
        oc = outer[:, m0:m0 + step]  # (G3, mc, q3)
        shift = -(c[:, None, :, :] @ oc.index_select(0, lv2.parent)[:, :, :, None])[..., 0]  # (G2, mc, q2)
        dd = shift[:, :, None, :] + inner[:, None, :, :]  # (G2, mc, M2, q2)
        u_nodes = u_hat[:, None, None, :] + dd
        eta = (eta_hat[:, None, None] + _rowdot(zl3, oc, lv3.group)[:, :, None] + _rowdot(zl2, dd, lv2.group))
        lf = g2.sum(w1[:, None, None] * family.logf(y[:, None, None], eta, kappa))
        vals = grid2.log_weights_plus_norm + lf - 0.5 * (u_nodes ** 2).sum(-1)  # (G2, mc, M2)
        logs.append(torch.logsumexp(vals, dim=-1))
        mean_c, cov_c = _moments(torch.softmax(vals, dim=-1), u_nodes)
        means.append(mean_c)
        covs.append(cov_c)
    inner_log = torch.cat(logs, dim=1)  # (G2, M3)
    mean_jm, cov_jm = torch.cat(means, dim=1), torch.cat(covs, dim=1)  # (G2, M3, q2), (G2, M3, q2, q2)
    v_nodes = v_hat[:, None, :] + outer
    total = grid3.log_weights_plus_norm - 0.5 * (v_nodes ** 2).sum(-1) + parent.sum(w2[:, None] * inner_log)
    p_out = torch.softmax(total, dim=1)  # (G3, M3)
    mean_v, cov_v = _moments(p_out, v_nodes)
    pj = p_out.index_select(0, lv2.parent)  # (G2, M3)
    mean_u = (pj[..., None] * mean_jm).sum(1)
    dm = mean_jm - mean_u[:, None, :]
    cov_u = (pj[..., None, None] * (cov_jm + dm[..., :, None] * dm[..., None, :])).sum(1)
    return [mean_u, mean_v], [cov_u, cov_v]


def lambdas_absolute(thetas: Sequence[torch.Tensor], term_sizes, scale: float = 1.0) -> list:
    """Absolute factors :math:`\\Lambda_l` from per-level Cholesky entries (times ``scale``)."""
    return [scale * lambda_from_theta(t, ts) for t, ts in zip(thetas, term_sizes)]
