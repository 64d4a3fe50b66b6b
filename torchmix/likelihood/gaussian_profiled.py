r"""Profiled log-likelihood of the two-level gaussian model with its exact gradient and Hessian in :math:`\theta`.

Notation of :mod:`torchmix.likelihood.gaussian` and :mod:`torchmix.likelihood.gaussian_grad` for a
group :math:`j` (weight :math:`w_j`, blocks :math:`C_j` ``q x q``, :math:`R_j = C_{or,j}` ``q x r``,
:math:`r = p + 1`): :math:`A_j = \Lambda^\top C_j\Lambda + I`, :math:`P_j = A_j^{-1}`,
:math:`G_j = \Lambda P_j\Lambda^\top`,

.. math::
    K = \bar D - \sum_j w_j R_j^\top\Lambda P_j\Lambda^\top R_j,\qquad
    r^2 = \min_\beta \xi^\top K\xi,\qquad
    \ell_p(\theta) = -\tfrac12\sum_j w_j\log|A_j| - \tfrac{N_w}2\big(1 + \log(2\pi r^2/N_w)\big).

With :math:`c_j = R_j\xi`, :math:`m_j = P_j\Lambda^\top c_j`, :math:`\rho_j = c_j - C_j\Lambda m_j`,
:math:`M_j = C_j\Lambda P_j` and :math:`H_j = C_j - C_jG_jC_j`, a free entry :math:`t` of
:math:`\Lambda` at row :math:`a_t`, column :math:`b_t` has (sums over groups weighted by :math:`w_j`)

.. math::
    f_t = \textstyle\sum M_{a_tb_t},\qquad
    f_{ts} = \textstyle\sum \big(H_{a_ta_s}P_{b_sb_t} - M_{a_tb_s}M_{a_sb_t}\big)
    \quad (f = \tfrac12\textstyle\sum_j w_j\log|A_j|),

    S_t = -2\textstyle\sum \rho_{a_t}m_{b_t},\qquad
    S_{ts} = -2\textstyle\sum\big(\rho_{a_t}P_{b_tb_s}\rho_{a_s} - m_{b_s}H_{a_sa_t}m_{b_t}
             - \rho_{a_s}M_{a_tb_s}m_{b_t} - \rho_{a_t}M_{a_sb_t}m_{b_s}\big),

    S_{t\beta} = -2\textstyle\sum\big((R - C\Lambda P\Lambda^\top R)_{a_t,1:p}\,m_{b_t}
                 + \rho_{a_t}(P\Lambda^\top R)_{b_t,1:p}\big)

for :math:`S(\beta,\theta) = \xi^\top K\xi`. Then :math:`\partial_\theta r^2 = S_\theta` (envelope),
:math:`\partial^2_\theta r^2 = S_{\theta\theta} - \tfrac12 S_{\theta\beta}K_{\beta\beta}^{-1}S_{\beta\theta}` and

.. math::
    \nabla\ell_p = -f_\theta - \tfrac{N_w}{2r^2}S_\theta,\qquad
    \nabla^2\ell_p = -f_{\theta\theta} - \tfrac{N_w}2\Big(\frac{\partial^2_\theta r^2}{r^2}
                     - \frac{S_\theta S_\theta^\top}{r^4}\Big).

Every per-group quantity is held as one ``(G,)`` vector per entry of a small matrix ("structure of
arrays"): the loops below run over the entries (:math:`q \le` :data:`MAX_Q`), never over groups, so
one evaluation is a few dozen vector operations of length :math:`G` plus two small GEMMs, far below
one pass over the rows. Pure tensor math.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..covariance import theta_index

__all__ = ["MAX_Q", "ProfiledTwoLevel", "ProfiledState", "applies"]

MAX_Q = 4


def applies(lik) -> bool:
    """Whether :class:`ProfiledTwoLevel` handles ``lik``: one grouping level, at most :data:`MAX_Q` effects,
    one response."""
    levels = lik.tensors.levels
    return len(levels) == 1 and levels[0].q <= MAX_Q and lik.c_or.dim() == 3


def _inverse_logdet(a):
    """Inverse and log-determinant of symmetric positive definite ``q x q`` matrices given entrywise.

    ``a[i][j]`` are ``(G,)`` vectors; returns ``(p, logdet)`` with ``p[i][j]`` ``(G,)`` and ``logdet (G,)``.
    """
    q = len(a)
    if q == 1:
        return [[1.0 / a[0][0]]], torch.log(a[0][0])
    if q == 2:
        det = a[0][0] * a[1][1] - a[0][1] * a[0][1]
        inv = 1.0 / det
        off = -a[0][1] * inv
        return [[a[1][1] * inv, off], [off, a[0][0] * inv]], torch.log(det)
    # Cholesky A = LL^T, then A^{-1} = L^{-T}L^{-1}
    low = [[None] * q for _ in range(q)]
    for j in range(q):
        s = a[j][j]
        for k in range(j):
            s = s - low[j][k] * low[j][k]
        low[j][j] = torch.sqrt(s)
        for i in range(j + 1, q):
            s = a[i][j]
            for k in range(j):
                s = s - low[i][k] * low[j][k]
            low[i][j] = s / low[j][j]
    diag = low[0][0]
    for j in range(1, q):
        diag = diag * low[j][j]
    inv_diag = [1.0 / low[i][i] for i in range(q)]
    li = [[None] * q for _ in range(q)]  # L^{-1}, lower
    for j in range(q):
        li[j][j] = inv_diag[j]
        for i in range(j + 1, q):
            s = low[i][j] * li[j][j]
            for k in range(j + 1, i):
                s = s + low[i][k] * li[k][j]
            li[i][j] = -s * inv_diag[i]
    p = [[None] * q for _ in range(q)]
    for i in range(q):
        for j in range(i, q):
            s = li[j][i] * li[j][j]
            for k in range(j + 1, q):
                s = s + li[k][i] * li[k][j]
            p[i][j] = p[j][i] = s
    return p, 2.0 * torch.log(diag)


@dataclass
class ProfiledState:
    r"""One evaluation at :math:`\theta` (objects of the module docstring; ``(q, G)`` stacks per group).

    ``value`` :math:`\ell_p`, ``grad`` ``(n_theta,)``, ``hess`` ``(n_theta, n_theta)`` or None, ``beta (p,)``,
    ``sigma2`` :math:`r^2/N_w`, ``k`` ``(r, r)``; per group ``m``, ``rho`` ``(q, G)``, ``p_mat``, ``m_mat``
    ``(q, q, G)``, ``y`` :math:`\Lambda^\top R` ``(q, r, G)`` and ``s_theta`` :math:`S_\theta`.
    """

    theta: torch.Tensor
    value: torch.Tensor
    grad: torch.Tensor
    hess: torch.Tensor | None
    beta: torch.Tensor
    sigma2: torch.Tensor
    k: torch.Tensor
    m: torch.Tensor
    rho: torch.Tensor
    p_mat: torch.Tensor
    m_mat: torch.Tensor
    y: torch.Tensor
    s_theta: torch.Tensor
    f_tt: torch.Tensor | None = None
    s_tt: torch.Tensor | None = None


class ProfiledTwoLevel:
    r"""Evaluator of :math:`\ell_p`, :math:`\nabla\ell_p` and :math:`\nabla^2\ell_p` for a two-level
    :class:`~torchmix.likelihood.gaussian.GaussianLikelihood` (see :func:`applies`).

    The blocks are rearranged once: :math:`C` as ``q x q`` lists of ``(G,)`` vectors and :math:`R` as
    ``(q, r, G)``.
    """

    def __init__(self, lik):
        lv = lik.tensors.levels[0]
        self.lik = lik
        self.q, self.p = lv.q, lik.p
        self.term_sizes = lik.term_sizes[0]
        rows, cols = theta_index(self.term_sizes)
        self.rows, self.cols = rows.tolist(), cols.tolist()
        c = lik.c_oo
        self.c = [[c[:, a, b].contiguous() for b in range(self.q)] for a in range(self.q)]
        self.r_blk = lik.c_or.permute(1, 2, 0).contiguous()        # (q, r, G)
        self.w = lv.w_uncond
        self.n_w = lik.n_w
        self.dbar = lik.rr_const
        dev = c.device
        self._ia = torch.tensor(self.rows, device=dev)
        self._ib = torch.tensor(self.cols, device=dev)

    def __call__(self, theta: torch.Tensor, hessian: bool = True) -> ProfiledState:
        q, p, w, n_w = self.q, self.p, self.w, self.n_w
        lam = [[0.0] * q for _ in range(q)]
        for val, a, b in zip(theta.tolist(), self.rows, self.cols):
            lam[a][b] = val
        c, rq = self.c, range(self.q)
        # C Lambda and A = Lambda' C Lambda + I, entrywise
        cl = [[_lin([(c[a][j], lam[j][b]) for j in rq]) for b in rq] for a in rq]
        a_mat = [[None] * q for _ in rq]
        for a in rq:
            for b in range(a, q):
                s = _lin([(cl[j][b], lam[j][a]) for j in rq])
                a_mat[a][b] = a_mat[b][a] = s + 1.0 if a == b else s
        pm, logdet = _inverse_logdet(a_mat)
        y = torch.stack([_lin([(self.r_blk[j], lam[j][a]) for j in rq]) for a in rq])       # Lambda' R, (q, r, G)
        wp = [[w * pm[a][b] for b in rq] for a in rq]
        z = torch.stack([_lin_v([(y[a], wp[a][b]) for a in rq]) for b in rq])                # (q, r, G)
        k = self.dbar - torch.bmm(z, y.transpose(1, 2)).sum(0)
        k = 0.5 * (k + k.transpose(0, 1))
        kbb, kby, kyy = k[:p, :p], k[:p, p], k[p, p]
        kbb_chol, info = torch.linalg.cholesky_ex(kbb)
        if int(info) != 0:  # not positive definite: a non-finite value (the caller's fallback decides)
            kbb_chol = torch.full_like(kbb, float("nan"))
        beta = torch.cholesky_solve(kby[:, None], kbb_chol)[:, 0]
        r2 = kyy - kby @ beta
        value = -0.5 * (w @ logdet) - 0.5 * n_w * (1.0 + torch.log(2 * math.pi * r2 / n_w))

        xi = torch.cat([beta, -torch.ones(1, dtype=beta.dtype, device=beta.device)])
        cvec = [xi @ self.r_blk[a] for a in rq]                                               # c = R xi
        lc = [_lin([(cvec[j], lam[j][a]) for j in rq]) for a in rq]                          # Lambda' c
        m = [_lin_v([(lc[b], pm[a][b]) for b in rq]) for a in rq]                            # P Lambda' c
        rho = [cvec[a] - _lin_v([(m[b], cl[a][b]) for b in rq]) for a in rq]
        mm = [[_lin_v([(pm[j][b], cl[a][j]) for j in rq]) for b in rq] for a in rq]          # C Lambda P
        wr = [w * r for r in rho]
        ia, ib = self.rows, self.cols
        f_t = torch.stack([w @ mm[a][b] for a, b in zip(ia, ib)])
        s_t = -2.0 * torch.stack([wr[a] @ m[b] for a, b in zip(ia, ib)])
        grad = -f_t - (0.5 * n_w / r2) * s_t
        hess = f_ts = s_ts = None
        if hessian:
            wm = [w * v for v in m]
            hm = [[None] * q for _ in rq]                                                    # C - C G C
            for a in rq:
                for b in range(a, q):
                    hm[a][b] = hm[b][a] = c[a][b] - _lin_v([(mm[a][j], cl[b][j]) for j in rq])
            wh = [[w * v for v in row] for row in hm]
            wmm = [[w * v for v in row] for row in mm]
            wrr = [[wr[a] * rho[b] for b in rq] for a in rq]
            wmb = [[wm[a] * m[b] for b in rq] for a in rq]
            wrm = [[wr[a] * m[b] for b in rq] for a in rq]
            n = len(ia)
            pairs = [(t, s) for t in range(n) for s in range(t, n)]
            d = [[] for _ in range(6)]
            for t, s in pairs:
                at, bt, as_, bs = ia[t], ib[t], ia[s], ib[s]
                d[0].append(wh[at][as_] @ pm[bs][bt])
                d[1].append(wmm[at][bs] @ mm[as_][bt])
                d[2].append(wrr[at][as_] @ pm[bt][bs])
                d[3].append(wmb[bs][bt] @ hm[as_][at])
                d[4].append(wrm[as_][bt] @ mm[at][bs])
                d[5].append(wrm[at][bs] @ mm[as_][bt])
            d = [torch.stack(v) for v in d]
            f_pairs = d[0] - d[1]
            s_pairs = -2.0 * (d[2] - d[3] - d[4] - d[5])
            t_idx = torch.tensor([t for t, _ in pairs], device=w.device)
            s_idx = torch.tensor([s for _, s in pairs], device=w.device)
            f_ts = torch.zeros(n, n, dtype=w.dtype, device=w.device).index_put((t_idx, s_idx), f_pairs)
            f_ts = f_ts.index_put((s_idx, t_idx), f_pairs)
            s_ts = torch.zeros(n, n, dtype=w.dtype, device=w.device).index_put((t_idx, s_idx), s_pairs)
            s_ts = s_ts.index_put((s_idx, t_idx), s_pairs)
            # S_{t beta} = -2 [R_{a_t} (w m_{b_t}) + sum_j Y_j (P_{b_t j} w rho_{a_t} - M_{a_t j} w m_{b_t})], beta rows
            s_tb = torch.stack([self.r_blk[a][:p] @ wm[b] for a, b in zip(ia, ib)])
            for j in rq:
                u = torch.stack([pm[b][j] * wr[a] - mm[a][j] * wm[b] for a, b in zip(ia, ib)])   # (n_theta, G)
                s_tb = s_tb + u @ y[j][:p].transpose(0, 1)
            s_tb = -2.0 * s_tb                                                               # (n_theta, p)
            sol = torch.cholesky_solve(s_tb.transpose(0, 1), kbb_chol)
            r2_tt = s_ts - 0.5 * s_tb @ sol
            hess = -f_ts - 0.5 * n_w * (r2_tt / r2 - torch.outer(s_t, s_t) / (r2 * r2))
            hess = 0.5 * (hess + hess.transpose(0, 1))
        return ProfiledState(theta=theta, value=value, grad=grad, hess=hess, beta=beta, sigma2=r2 / n_w, k=k,
                             m=torch.stack(m), rho=torch.stack(rho), p_mat=_stack2(pm), m_mat=_stack2(mm), y=y,
                             s_theta=s_t, f_tt=f_ts, s_tt=s_ts)

    def standard_error_pieces(self, st: ProfiledState):
        r"""Per-group scores ``(G, p + n_theta + 1)`` over :math:`\psi = (\beta, \theta, \sigma)`,
        :math:`K_{\beta\beta}`
        ``(p, p)`` and the :math:`(\theta, \sigma)` Hessian of :math:`\ell(\beta, \theta, \sigma)` at
        :math:`(\hat\beta(\theta), \theta, \hat\sigma(\theta))` from an evaluation made with ``hessian=True``:
        the same numbers as :func:`~torchmix.likelihood.gaussian_grad.standard_error_pieces` there.

        With :math:`S_j\xi = D_j\xi - Y_j^\top m_j` (:math:`Y_j = \Lambda^\top R_j`): :math:`\partial_\beta\ell_j =
        -\tfrac{w_j}{\sigma^2}(S_j\xi)_{1:p}`,
        :math:`\partial_\sigma\ell_j = -N_{w,j}/\sigma + w_j\xi^\top S_j\xi/\sigma^3`,
        :math:`\partial_{\Lambda_{ab}}\ell_j = w_j(-M_{ab} + \rho_am_b/\sigma^2)`; the Hessian blocks are
        :math:`-f_{\theta\theta} - S_{\theta\theta}/(2\sigma^2)`, :math:`S_\theta/\sigma^3` and
        :math:`N_w/\sigma^2 - 3r^2/\sigma^4`.
        """
        lik, p, w = self.lik, self.p, self.w
        beta, sigma2 = st.beta, st.sigma2
        sigma = sigma2.sqrt()
        xi = torch.cat([beta, -torch.ones(1, dtype=beta.dtype, device=beta.device)])
        r = xi.numel()
        s_xi = (lik.c_rr.reshape(-1, r) @ xi).reshape(-1, r) - (st.y * st.m[:, None, :]).sum(0).transpose(0, 1)
        quad = s_xi @ xi
        s_beta = -(w / sigma2)[:, None] * s_xi[:, :p]
        s_sigma = -lik.n_w_top / sigma + w * quad / (sigma2 * sigma)
        ia, ib = self._ia, self._ib
        s_lam = w * (-st.m_mat[ia, ib] + st.rho[ia] * st.m[ib] / sigma2)
        scores = torch.cat([s_beta, s_lam.transpose(0, 1), s_sigma[:, None]], dim=1)
        h_tt = -st.f_tt - st.s_tt / (2 * sigma2)
        h_ts = st.s_theta / (sigma2 * sigma)
        h_ss = (lik.n_w_top / sigma2).sum() - 3.0 * (w @ quad) / (sigma2 * sigma2)
        top = torch.cat([h_tt, h_ts[:, None]], dim=1)
        bottom = torch.cat([h_ts, h_ss.reshape(1)])[None, :]
        return scores, st.k[:p, :p], torch.cat([top, bottom], dim=0)


def _stack2(mat):
    return torch.stack([torch.stack(row) for row in mat])


def _lin_v(terms):
    """:math:`\\sum_k x_k v_k` over ``(tensor, (G,) vector)`` pairs (broadcast over leading dimensions)."""
    out = None
    for x, v in terms:
        out = x * v if out is None else torch.addcmul(out, x, v)
    return out


def _lin(terms):
    """:math:`\\sum_k x_k s_k` over ``(vector, float)`` pairs, skipping zero coefficients (0 if none)."""
    out = None
    for vec, s in terms:
        if s == 0.0:
            continue
        out = vec * s if out is None else out + vec * s
    if out is None:
        out = torch.zeros_like(terms[0][0])
    return out
