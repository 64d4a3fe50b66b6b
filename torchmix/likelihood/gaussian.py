r"""Closed-form weighted log-likelihood of the gaussian (identity-link) mixed model.

MATH.md section 4. Per level-2 group :math:`j` the raw weighted crossproduct of
:math:`M_j = [Z^{(2)}_j | \dots | Z^{(L)}_j | X_j | y_j]` is computed once,

.. math:: CP_j = M_j^\top W^c_j M_j,\qquad W^c_j = \operatorname{diag}(w_{i\mid j}),

so one evaluation for a new :math:`\theta` costs :math:`O(G_2 d^3)` whatever the number of rows.
Levels are integrated out bottom-up by batched Cholesky factors and Schur complements; children
enter their parent scaled by their conditional weight and log-determinants accumulate with
unconditional weights. The top-level pieces give

.. math::
    \hat\beta = K_{\beta\beta}^{-1}k_{\beta y},\quad r^2 = k_{yy} - k_{\beta y}^\top\hat\beta,\quad
    \hat\sigma^2 = r^2/N_w,\quad
    \ell_p(\theta) = -\text{logdet}(\theta) - \tfrac{N_w}{2}\big(1 + \log(2\pi\hat\sigma^2)\big).

Pure tensor math: no pandas, no files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from ..covariance import lambda_from_theta
from ..tensors import ModelTensors
from .smallmat import cholesky_lower, solve_lower

__all__ = ["GaussianLikelihood", "gaussian_loglik_by_group", "weighted_crossproducts"]

_CHUNK_ROWS = 1 << 17


def weighted_crossproducts(m: torch.Tensor, w: torch.Tensor, group: torch.Tensor, n_groups: int,
                           chunk_rows: int = _CHUNK_ROWS) -> torch.Tensor:
    r"""Per-group weighted crossproducts :math:`CP_g = \sum_{i\in g} w_i m_i m_i^\top`.

    Parameters
    ----------
    m : ``(N, d)``; w : ``(N,)`` positive; group : int64 ``(N,)`` in ``[0, n_groups)``.

    Returns
    -------
    ``(n_groups, d, d)``.

    Notes
    -----
    When groups are of similar size the rows :math:`\sqrt{w_i}m_i` are laid into a zero-padded
    ``(G, n_max, d)`` tensor and multiplied with one batched GEMM; otherwise outer products are
    accumulated with ``index_add`` in chunks of ``chunk_rows`` rows (extra memory
    ``chunk_rows * d * d`` values).
    """
    n, d = m.shape
    counts = torch.bincount(group, minlength=n_groups)
    n_max = int(counts.max()) if n else 0
    if n and n_groups * n_max <= 3 * n:
        if bool((group[1:] >= group[:-1]).all()):
            order, sorted_group = None, group
        else:
            sorted_group, order = torch.sort(group, stable=True)
        start = torch.cumsum(counts, 0) - counts
        rank = torch.arange(n, device=m.device) - start[sorted_group]
        rows = m * torch.sqrt(w)[:, None]
        padded = torch.zeros(n_groups * n_max, d, dtype=m.dtype, device=m.device)
        padded[sorted_group * n_max + rank] = rows if order is None else rows[order]
        padded = padded.reshape(n_groups, n_max, d)
        out = padded.transpose(1, 2) @ padded
    else:
        out = torch.zeros(n_groups, d * d, dtype=m.dtype, device=m.device)
        for first in range(0, n, chunk_rows):
            sl = slice(first, first + chunk_rows)
            mc = m[sl]
            outer = (mc * w[sl, None]).unsqueeze(2) * mc.unsqueeze(1)
            out.index_add_(0, group[sl], outer.reshape(-1, d * d))
        out = out.reshape(n_groups, d, d)
    return 0.5 * (out + out.transpose(1, 2))


@dataclass
class _Pass:
    """Intermediate results of one bottom-up pass (kept for the modes)."""

    chol: list        # per level: (G_l, q_l, q_l) lower Cholesky factors of A
    v: list           # per level: (G_l, q_l, r_l) = L^{-1} B
    s_top: torch.Tensor      # (G_L, p+1, p+1) top-level Schur complements (unweighted)
    logdet_top: torch.Tensor  # (G_L,) weighted log-determinants summed into top groups


class GaussianLikelihood(nn.Module):
    r"""Weighted marginal log-likelihood of a gaussian mixed model with any number of levels.

    Parameters
    ----------
    tensors : :class:`~torchmix.tensors.ModelTensors`
        The model; its crossproducts are computed once here.

    Notes
    -----
    ``thetas`` arguments are lists with one ``(n_theta_l,)`` tensor per level holding the
    *relative* Cholesky entries: :math:`\Sigma_l = \sigma^2\Lambda_l\Lambda_l^\top`.
    """

    def __init__(self, tensors: ModelTensors):
        super().__init__()
        self.tensors = tensors
        self.term_sizes = [tuple(lv.term_sizes) for lv in tensors.levels]
        self.q = [lv.q for lv in tensors.levels]
        self.p = tensors.n_fixed
        lv2 = tensors.levels[0]
        m = torch.cat([lv.Z for lv in tensors.levels] + [tensors.X, tensors.y[:, None]], dim=1)
        self.register_buffer("cp", weighted_crossproducts(m, tensors.w1_cond, lv2.group, lv2.n_groups),
                             persistent=False)
        top = tensors.levels[-1]
        self.register_buffer("n_w_top", torch.zeros(top.n_groups, dtype=m.dtype, device=m.device)
                             .index_add(0, tensors.row_top, tensors.w1_uncond), persistent=False)
        self.n_w = float(tensors.w1_uncond.sum())

    # ------------------------------------------------------------------ core pass
    def _scale(self, thetas: Sequence[torch.Tensor]) -> torch.Tensor:
        blocks = [lambda_from_theta(th, ts) for th, ts in zip(thetas, self.term_sizes)]
        eye = torch.eye(self.p + 1, dtype=self.cp.dtype, device=self.cp.device)
        return torch.block_diag(*blocks, eye)

    def integrate(self, thetas: Sequence[torch.Tensor], aggregate_top: bool = False) -> _Pass:
        r"""Integrate all random effects out, bottom-up (MATH.md 4.2).

        With ``aggregate_top`` the top level's Schur complements are not kept per group: only
        :math:`K_{top} = \sum_k w^{(L)}_k S_k` is formed (in ``s_top``, shape ``(p+1, p+1)``),
        which is all the profiled likelihood needs.
        """
        scale = self._scale(thetas)
        g, d = self.cp.shape[0], self.cp.shape[1]
        # K_g = S^T CP_g S as two plain GEMMs (CP_g and K_g symmetric: (CP_g S)^T S = K_g)
        t = (self.cp.reshape(g * d, d) @ scale).reshape(g, d, d)
        k = (t.transpose(1, 2).reshape(g * d, d) @ scale).reshape(g, d, d)
        chols, vs = [], []
        levels = self.tensors.levels
        logdet_top = torch.zeros(levels[-1].n_groups, dtype=k.dtype, device=k.device)
        for idx, lv in enumerate(levels):
            q = lv.q
            a = k[:, :q, :q] + torch.eye(q, dtype=k.dtype, device=k.device)
            b = k[:, :q, q:]
            dd = k[:, q:, q:]
            chol = cholesky_lower(a)
            ld = torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
            logdet_top = logdet_top.index_add(0, lv.top, lv.w_uncond * ld)
            v = solve_lower(chol, b)
            chols.append(chol)
            vs.append(v)
            if idx + 1 < len(levels):
                s = dd - v.transpose(1, 2) @ v
                nxt = levels[idx + 1]
                k = torch.zeros(nxt.n_groups, *s.shape[1:], dtype=s.dtype, device=s.device).index_add(
                    0, lv.parent, lv.w_cond[:, None, None] * s)
            elif aggregate_top:
                w = lv.w_uncond
                s = torch.einsum("g,gab->ab", w, dd) - torch.einsum("gqa,gqb->ab", v * w[:, None, None], v)
            else:
                s = dd - v.transpose(1, 2) @ v
        return _Pass(chol=chols, v=vs, s_top=s, logdet_top=logdet_top)

    def _k_top(self, ps: _Pass) -> torch.Tensor:
        if ps.s_top.dim() == 2:
            return ps.s_top
        w_top = self.tensors.levels[-1].w_uncond
        return (w_top[:, None, None] * ps.s_top).sum(0)

    # ------------------------------------------------------------------ profiled
    def profile(self, thetas: Sequence[torch.Tensor]):
        r"""Profiled quantities at ``thetas``: :math:`(\ell_p, \hat\beta, \hat\sigma^2, K_{top})`."""
        ps = self.integrate(thetas, aggregate_top=True)
        kt = self._k_top(ps)
        p = self.p
        kbb, kby, kyy = kt[:p, :p], kt[:p, p], kt[p, p]
        beta = torch.linalg.solve(kbb, kby)
        r2 = kyy - kby @ beta
        sigma2 = r2 / self.n_w
        ell = -ps.logdet_top.sum() - 0.5 * self.n_w * (1.0 + torch.log(2 * math.pi * sigma2))
        return ell, beta, sigma2, kt, ps

    def forward(self, thetas: Sequence[torch.Tensor]) -> torch.Tensor:
        r"""Profiled log-likelihood :math:`\ell_p(\theta)` (4.2), a 0-d tensor."""
        return self.profile(thetas)[0]

    # ------------------------------------------------------------------ unprofiled
    def loglik_by_group(self, beta: torch.Tensor, thetas: Sequence[torch.Tensor], sigma: torch.Tensor) -> torch.Tensor:
        r"""Top-group contributions :math:`\ell_k(\beta,\theta,\sigma)` of (4.3), shape ``(G_L,)``.

        .. math:: \ell_k = -\text{logdet}_k - \tfrac{N_{w,k}}{2}\log(2\pi\sigma^2)
                  - \tfrac{w^{(L)}_k}{2\sigma^2}[\beta;-1]^\top S_k[\beta;-1]
        """
        ps = self.integrate(thetas)
        xi = torch.cat([beta, -torch.ones(1, dtype=beta.dtype, device=beta.device)])
        quad = torch.einsum("i,kij,j->k", xi, ps.s_top, xi)
        w_top = self.tensors.levels[-1].w_uncond
        sigma2 = sigma * sigma
        return -ps.logdet_top - 0.5 * self.n_w_top * torch.log(2 * math.pi * sigma2) - 0.5 * w_top * quad / sigma2

    # ------------------------------------------------------------------ modes
    def modes(self, thetas: Sequence[torch.Tensor], beta: torch.Tensor, ps: _Pass | None = None) -> list:
        r"""Conditional modes :math:`\hat u_g = -A_g^{-1}B_g\xi_r` per level, top-down (4.3).

        Returns a list (level 2 first) of ``(G_l, q_l)`` spherical modes (relative scale);
        :math:`\hat b_g = \Lambda_l\hat u_g`.
        """
        if ps is None:
            ps = self.integrate(thetas)
        levels = self.tensors.levels
        xi = torch.cat([beta, -torch.ones(1, dtype=beta.dtype, device=beta.device)])
        rest = xi.expand(levels[-1].n_groups, -1)
        us = [None] * len(levels)
        for idx in range(len(levels) - 1, -1, -1):
            chol, v = ps.chol[idx], ps.v[idx]
            rhs = (v @ rest.unsqueeze(-1))
            u = -torch.linalg.solve_triangular(chol.transpose(1, 2), rhs, upper=True).squeeze(-1)
            us[idx] = u
            if idx > 0:
                parent = levels[idx - 1].parent
                rest = torch.cat([u[parent], rest[parent]], dim=1)
        return us


def gaussian_loglik_by_group(tensors: ModelTensors, beta: torch.Tensor, thetas: Sequence[torch.Tensor],
                             sigma) -> torch.Tensor:
    r"""Convenience wrapper: :math:`\ell_k(\beta,\theta,\sigma)` of (4.3), shape ``(G_L,)``.

    ``thetas`` are relative Cholesky entries (:math:`\Sigma_l=\sigma^2\Lambda_l\Lambda_l^\top`).
    """
    sigma = torch.as_tensor(sigma, dtype=tensors.X.dtype, device=tensors.X.device)
    return GaussianLikelihood(tensors).loglik_by_group(beta, thetas, sigma)
