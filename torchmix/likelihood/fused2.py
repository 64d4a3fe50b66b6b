r"""Two-level AGQ of a canonical-link family as one autograd function with a closed-form gradient.

Computes the same :math:`\ell_j = w^{(2)}_j\log\mathcal L_j` as the generic two-level path of
:class:`~torchmix.likelihood.agq.AGQLogLik` (modes, one implicit Newton step, Fisher curvature,
product grid; MATH.md 5.1, 5.6) from :math:`(\eta^0, \tilde Z)`. Every row belongs to one group, so
the Jacobian is block diagonal: the forward pass computes, per row, :math:`J^0_i=\partial\ell_{g(i)}/
\partial\eta^0_i` and :math:`J^z_i=\partial\ell_{g(i)}/\partial\tilde z_i` (``(N,)``, ``(N, q)``) in closed
form, and the backward pass is :math:`\bar\ell_{g(i)}J_i`. No graph is built.

Per group (indices :math:`j` dropped), with :math:`L L^\top = H = \sum_i w_i W(\eta^\ast_i)\tilde z_i\tilde z_i^\top+I`,
:math:`M = L^{-1}`, :math:`a_i = M\tilde z_i`, :math:`\eta_{im}=\eta^\ast_i+a_i^\top z_m`,
:math:`T_m=\log\omega_m-\tfrac12\|u^\ast+M^\top z_m\|^2+\sum_i w_i\log f(\eta_{im})`, :math:`P=\operatorname{softmax}(T)`,
:math:`r_{im}=\partial_\eta\log f(\eta_{im})`, :math:`\rho_i=\sum_m P_m r_{im}`, :math:`\kappa_i=\sum_m P_m r_{im}z_m`,
:math:`\bar z=\sum_m P_m z_m`, :math:`Z_s=\sum_m P_m z_m z_m^\top`:

.. math::
    G_M = \sum_i w_i\kappa_i\tilde z_i^\top - \bar z u^{\ast\top} - Z_s M,\quad
    G_L = -M^\top G_M M^\top - M^\top,\quad
    G_H = M^\top\Phi(L^\top G_L)M\ \ (\text{Cholesky adjoint}),

    e_i = w_i\rho_i + w_i W'(\eta^\ast_i)\,\tilde z_i^\top G_H\tilde z_i,\quad
    \gamma = H_{\rm obs}^{-1}\Big(\sum_i e_i\tilde z_i - u^\ast - M^\top\bar z\Big),\quad
    c_i = -w_i\,c(\hat\eta_i)\,\tilde z_i^\top\gamma,

    J^0_i = e_i + c_i,\qquad
    J^z_i = w_i M^\top\kappa_i + 2w_iW(\eta^\ast_i)G_H\tilde z_i + e_i u^\ast + w_i\,\partial_\eta\log f(\hat\eta_i)\,\gamma + c_i\hat u,

all times :math:`w^{(2)}_j`; :math:`c = -\partial^2_\eta\log f` and :math:`\Phi` keeps the lower triangle and
halves the diagonal. The last two terms are the implicit derivative of the mode (MATH.md 5.6).
The :math:`N\times M` work is one pass of the node kernel (:mod:`torchmix.likelihood.kernels`) and
one weighted reduction of its :math:`r`, done block by block: the rows, taken in group order, are cut
into blocks of whole groups of about ``chunk_elems`` :math:`/M` rows, and a block's node pass, group
sums, node probabilities :math:`P` and weighted reduction run one after the other while its
:math:`(N_b, M)` arrays are in the processor cache. Only group-sized and row-sized arrays go through
memory, so the pass is several times lighter on memory bandwidth (which the cores of a machine share)
and nothing of size :math:`N\times M` is kept. Buffers are reused between evaluations.
"""

from __future__ import annotations

import torch

from .modes import (TRUST_STEP, chol, chol_solve, linear_predictor, lower_solve, newton_modes_2, warn_modes,
                    weighted_outer)
from .segments import Grouping

__all__ = ["FusedData", "fused_forward2"]


class FusedData:
    """Constants and reusable buffers of the fused two-level evaluation of one module."""

    def __init__(self, kernel_cls, y, w1, g: Grouping, chunk_elems: int):
        self.kernel = kernel_cls(y, w1, g)
        self.y, self.w1, self.g = y, w1, g
        self.chunk_elems = int(chunk_elems)
        self._bufs = {}
        self._blocks = {}
        ker = self.kernel
        self.w_alpha = w1 * ker.alpha
        self.w_beta = None if ker.beta is None else w1 * ker.beta

    def weighted_rows(self, rho_r, kap_r, zbar):
        r""":math:`w_i\rho_i` ``(N,)`` and :math:`w_i\kappa_i` ``(N, q)`` from the kernel's
        :math:`\sum_m P_m r_{im}` and :math:`\sum_m P_m r_{im} z_m`, with
        :math:`\partial_\eta\log f = \alpha r + \beta` and :math:`\sum_m P_m = 1`."""
        kap = kap_r.mul_(self.w_alpha[:, None])
        if self.w_beta is None:
            return rho_r.mul_(self.w_alpha), kap
        kap.addcmul_(self.w_beta[:, None], zbar.index_select(0, self.g.index))
        return torch.addcmul(self.w_beta, self.w_alpha, rho_r), kap

    def buffer(self, key, shape, like: torch.Tensor) -> torch.Tensor:
        buf = self._bufs.get(key)
        if buf is None or buf.shape != shape or buf.dtype != like.dtype or buf.device != like.device:
            buf = self._bufs[key] = torch.empty(shape, dtype=like.dtype, device=like.device)
        return buf

    def fisher(self, family, eta):
        """Fisher weight :math:`W(\\eta)` and its derivative, ``(N,)`` each."""
        if hasattr(self.kernel, "fisher"):
            return self.kernel.fisher(eta)
        return family.fisher_w(eta), family.dfisher_w(eta)

    def ones(self, n: int, like: torch.Tensor) -> torch.Tensor:
        buf = self.buffer(("ones", n), (n,), like)
        return buf.fill_(1.0)

    def blocks(self, n_nodes: int) -> list:
        """``[(block, csr, y), ...]``: the :class:`~torchmix.likelihood.segments.RowBlock` s of a node pass over
        ``n_nodes`` nodes (module docstring), about ``chunk_elems // n_nodes`` rows each, with the CSR of the
        block's row weights (its weighted group sums) and its responses."""
        hit = self._blocks.get(n_nodes)
        if hit is None:
            blocks = self.g.blocks(self.chunk_elems // max(n_nodes, 1))
            hit = self._blocks[n_nodes] = [(b, b.groups.matrix(b.take(self.w1)), b.take(self.y)) for b in blocks]
        return hit


def _chunk_arg(bs, as_, nodes_t, out):
    r""":math:`t_{im} = b_i + a_i^\top z_m` into ``out`` ``(N, mc)``."""
    return torch.addmm(bs[:, None], as_, nodes_t, out=out)


def _blocked_pass(data: FusedData, base, a, nodes, lwn, centred, need_grad: bool):
    r"""The node pass, block by block (module docstring).

    Returns ``total (G, M)`` (:math:`T_m`), ``lse (G,)`` (:math:`\log\sum_m e^{T_m}`) and, with ``need_grad``,
    ``prob (G, M)`` (:math:`P`), :math:`\sum_m P_{g(i)m} r_{im}` ``(N,)`` and :math:`\sum_m P_{g(i)m} r_{im} z_m`
    ``(N, q)``; ``centred`` is :math:`u^\ast + M^\top z_m`, ``(G, M)`` for one random effect, else ``(G, M, q)``.
    """
    ker = data.kernel
    bs, as_ = ker.prepare(base, a)
    n_nodes, n_rows, n_groups = nodes.shape[0], base.shape[0], data.g.n
    like = dict(dtype=base.dtype, device=base.device)
    nodes_t = nodes.transpose(0, 1)
    blocks = data.blocks(n_nodes)
    longest = max((b.n_rows for b, *_ in blocks), default=0)
    t_buf = data.buffer("t", (longest, n_nodes), base)
    r_buf = data.buffer("r", (longest, n_nodes), base) if need_grad else None
    total = torch.empty(n_groups, n_nodes, **like)
    lse = torch.empty(n_groups, **like)
    if need_grad:
        pg_buf = data.buffer("pg", (longest, n_nodes), base)
        prob = torch.empty(n_groups, n_nodes, **like)
        rho = torch.empty(n_rows, **like)
        kap = torch.empty(n_rows, nodes.shape[1], **like)
        ones = data.ones(n_nodes, base)
    for blk, csr, y_b in blocks:
        nb, g0, g1 = blk.n_rows, blk.g0, blk.g1
        b_b, a_b = blk.take(bs), blk.take(as_)
        t = _chunk_arg(b_b, a_b, nodes_t, t_buf[:nb])
        r = r_buf[:nb] if need_grad else None
        negate, lf = ker.apply(t, r, y_b)
        sums = csr @ lf
        if ker.apply_tails is not None and not bool(torch.isfinite(sums).all()):  # underflow: again, safely
            _chunk_arg(b_b, a_b, nodes_t, t)
            negate, lf = ker.apply_tails(t, r, y_b)
            sums = csr @ lf
        tot = total[g0:g1]
        if negate:
            torch.neg(sums, out=tot)
        else:
            tot.copy_(sums)
        if ker.const is not None:
            tot += ker.const[g0:g1, None]
        tot.add_(lwn)
        if centred.dim() == 2:
            tot.addcmul_(centred[g0:g1], centred[g0:g1], value=-0.5)
        else:
            tot.add_((centred[g0:g1] * centred[g0:g1]).sum(-1), alpha=-0.5)
        lse_b = torch.logsumexp(tot, dim=1)
        lse[g0:g1] = lse_b
        if not need_grad:
            continue
        p_b = torch.exp(tot - lse_b[:, None], out=prob[g0:g1])
        r.mul_(torch.index_select(p_b, 0, blk.groups.index, out=pg_buf[:nb]))
        if blk.rows is None:
            torch.mv(r, ones, out=rho[blk.r0:blk.r1])
            torch.mm(r, nodes, out=kap[blk.r0:blk.r1])
        else:
            rho.index_copy_(0, blk.rows, torch.mv(r, ones))
            kap.index_copy_(0, blk.rows, r @ nodes)
    if not need_grad:
        return total, lse, None, None, None
    return total, lse, prob, rho, kap


def _chol_adjoint(l_fac: torch.Tensor, g_l: torch.Tensor) -> torch.Tensor:
    r"""Adjoint of :math:`H\mapsto L=\operatorname{chol}(H)`: :math:`L^{-\top}\Phi(L^\top G_L)L^{-1}`, ``(G, q, q)``."""
    x = torch.tril(l_fac.transpose(-1, -2) @ g_l)
    s = 0.5 * (x + torch.tril(x, -1).transpose(-1, -2))
    left = torch.linalg.solve_triangular(l_fac.transpose(-1, -2), s, upper=True)
    return torch.linalg.solve_triangular(l_fac, left, upper=False, left=False)


class _RowPieces:
    r"""Row pieces fixed within an evaluation: :math:`w_i\tilde z_i` ``(N, q)``, :math:`w_i\tilde z_i\tilde z_i^\top`
    ``(N, q*q)`` and, for one random effect, their sparse group-sum matrices."""

    def __init__(self, data: FusedData, zl: torch.Tensor):
        g, q, n_rows = data.g, zl.shape[1], zl.shape[0]
        self.wz = data.w1[:, None] * zl
        self.wzz = (self.wz[:, :, None] * zl[:, None, :]).reshape(n_rows, q * q)
        if q == 1:
            self.m_wz, self.m_wzz = g.matrix(self.wz[:, 0]), g.matrix(self.wzz[:, 0])


def _modes(data: FusedData, family, eta0, zl, u0, tol: float, max_iter: int, last: dict, pieces: _RowPieces):
    r"""The iterations of :func:`~torchmix.likelihood.modes.newton_modes_2` with the kernel's derivatives.

    Both kernels have :math:`\partial_\eta\log f = y-\mu`, so the gradient sums are
    :math:`\sum_i w_i y_i\tilde z_i - \sum_i w_i\mu_i\tilde z_i - u` with the first term fixed: an iteration is
    one ``sigmoid``/``exp`` and, for one random effect, two sparse matrix-vector products. While every active
    Newton step is at most ``TRUST_STEP`` (a warm start) full steps are taken; otherwise the generic
    iterations (step halving on the objective) continue from the current point. Same stopping rule and
    returns as :func:`~torchmix.likelihood.modes.newton_modes_2`.
    """
    g, ker, y = data.g, data.kernel, data.y
    q, n, n_rows = zl.shape[1], g.n, zl.shape[0]
    if q == 1:
        return _modes_scalar(data, family, eta0, zl, u0, tol, max_iter, last, pieces)
    wz, wzz = pieces.wz, pieces.wzz
    rows = data.buffer("newton", (n_rows, q + q * q), zl)
    fixed = g.sum(wz * y[:, None])
    eye = torch.eye(q, dtype=zl.dtype, device=zl.device)
    u = u0.detach().clone()
    active = torch.ones(n, dtype=torch.bool, device=u.device)
    for it in range(1, max_iter + 1):
        eta = linear_predictor(eta0, [(zl, u, g)])
        mu, curv = ker.mean_curv(eta)
        torch.mul(wz, mu[:, None], out=rows[:, :q])
        torch.mul(wzz, curv[:, None], out=rows[:, q:])
        sums = g.sum(rows)
        grad = fixed - sums[:, :q] - u
        factor = chol(sums[:, q:].reshape(n, q, q) + eye)
        step = chol_solve(factor, grad[:, :, None])[:, :, 0]
        size = step.abs().amax(-1)
        active = active & ~(size < tol)
        if not bool(active.any()):
            last.update(grad=grad, chol=factor)
            return u, it, True, (eta, y - mu, curv)
        if not bool(torch.where(active, size, 0.0).max() <= TRUST_STEP):
            u, more, ok, at_mode = newton_modes_2(family, y, data.w1, g, eta0, zl, u, None, tol, max_iter - it,
                                                  last=last)
            return u, it + more, ok, at_mode
        u = u + torch.where(active[:, None], step, torch.zeros_like(step))
    return u, max_iter, False, None


def _modes_scalar(data: FusedData, family, eta0, zl, u0, tol: float, max_iter: int, last: dict,
                  pieces: _RowPieces):
    """:func:`_modes` for one random effect per group: scalar curvature, few group-sized operations.

    A non-finite curvature gives a non-finite step, which hands over to the generic iterations (whose
    Cholesky factor reports it)."""
    g, ker, y = data.g, data.kernel, data.y
    z, gidx = zl[:, 0], g.index
    m_wz, m_wzz = pieces.m_wz, pieces.m_wzz
    fixed = m_wz @ y
    u = u0[:, 0].detach().clone()
    active = torch.ones(g.n, dtype=torch.bool, device=u.device)
    for it in range(1, max_iter + 1):
        eta = torch.addcmul(eta0, z, u.index_select(0, gidx))
        mu, curv = ker.mean_curv(eta)
        grad = fixed - m_wz @ mu - u
        hess = (m_wzz @ curv).add_(1.0)
        step = grad / hess
        size = step.abs()
        active &= ~(size < tol)  # a NaN step stays active
        if not bool(active.any()):
            last.update(grad=grad[:, None], chol=hess.sqrt_()[:, None, None])
            return u[:, None], it, True, (eta, y - mu, curv)
        if not bool(torch.where(active, size, 0.0).max() <= TRUST_STEP):
            u2, more, ok, at_mode = newton_modes_2(family, y, data.w1, g, eta0, zl, u[:, None], None, tol,
                                                   max_iter - it, last=last)
            return u2, it + more, ok, at_mode
        u = u + torch.where(active, step, 0.0)
    return u[:, None], max_iter, False, None


class _FusedAGQ2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, eta0, zl, module):
        fam, data, w2 = module.family, module._fused_data(), module.w2
        y, w1, g = data.y, data.w1, data.g
        q = zl.shape[1]
        last = {}
        pieces = _RowPieces(data, zl)
        u_hat, it, ok, at_mode = _modes(data, fam, eta0, zl, module.u2, module.mode_tol, module.mode_max_iter, last,
                                        pieces)
        module.mode_iterations = it
        warn_modes(ok, it)
        if at_mode is None:  # stopped on the objective: derivatives at the mode
            eta_hat = linear_predictor(eta0, [(zl, u_hat, g)])
            d1, _, curv = fam.derivs(y, eta_hat, None)
            at_mode = (eta_hat, d1, curv)
        eta_hat, d1, curv = at_mode
        if "grad" in last:
            gamma, chol_obs = last["grad"], last["chol"]
        else:
            gamma = g.sum((w1 * d1)[:, None] * zl) - u_hat
            eye = torch.eye(q, dtype=zl.dtype, device=zl.device)
            chol_obs = chol(weighted_outer(w1 * curv, zl, zl, g) + eye)
        delta = chol_solve(chol_obs, gamma[:, :, None])[:, :, 0]
        u_star = u_hat + delta
        eta_star = linear_predictor(eta_hat, [(zl, delta, g)])
        fw, dfw = data.fisher(fam, eta_star)
        if q == 1:
            l_fac = chol((pieces.m_wzz @ fw + 1.0)[:, None, None])
            a = zl * (1.0 / l_fac[:, 0, 0]).index_select(0, g.index)[:, None]  # M zl per row
        else:
            eye = torch.eye(q, dtype=zl.dtype, device=zl.device)
            l_fac = chol(weighted_outer(w1 * fw, zl, zl, g) + eye)
            a = lower_solve(l_fac.index_select(0, g.index), zl[:, :, None])[:, :, 0]
        module.u2 = u_star
        nodes = module.nodes2
        if q == 1:  # u* + M^T z_m, (G, M)
            centred = torch.addcmul(u_star, (1.0 / l_fac[:, 0, 0])[:, None], nodes[:, 0])
        else:
            centred = u_star[:, None, :] + _upper_solve_nodes(l_fac, nodes)  # (G, M, q)
        need_grad = any(ctx.needs_input_grad[:2])
        _, lse, prob, rho_r, kap_r = _blocked_pass(data, eta_star, a, nodes, module.lwn2, centred, need_grad)
        log_det = torch.log(torch.diagonal(l_fac, dim1=-2, dim2=-1)).sum(-1)
        ell = w2 * (lse - log_det)
        if not need_grad:
            return ell
        zbar = prob @ nodes  # (G, q)
        rho, kap = data.weighted_rows(rho_r, kap_r, zbar)  # w_i rho_i, w_i kappa_i
        args = (data, zl, fw, dfw, l_fac, u_hat, u_star, chol_obs, d1, curv, rho, kap, prob, zbar, nodes)
        g_rows = _rows_scalar(*args, pieces) if q == 1 else _gradient_rows(*args)
        ctx.save_for_backward(*g_rows, w2)
        ctx.g = g
        return ell

    @staticmethod
    def backward(ctx, grad_ell):
        j0, jz, w2 = ctx.saved_tensors
        scale = (grad_ell * w2).index_select(0, ctx.g.index)
        return scale * j0, scale[:, None] * jz, None


def _upper_solve_nodes(l_fac, nodes):
    from .agq import _upper_solve_nodes as solve

    return solve(l_fac, nodes)


def _rows_scalar(data, zl, fw, dfw, l_fac, u_hat, u_star, chol_obs, d1, curv, w_rho, w_kap, prob, zbar, nodes,
                 pieces):
    """:func:`_gradient_rows` for one random effect per group, with few row-sized operations."""
    g, w1 = data.g, data.w1
    gidx = g.index
    l1, m1, z = l_fac[:, 0, 0], 1.0 / l_fac[:, 0, 0], zl[:, 0]
    us, uh, zb = u_star[:, 0], u_hat[:, 0], zbar[:, 0]
    zs = prob @ (nodes[:, 0] * nodes[:, 0])  # (G,)
    wz, w_kap = pieces.wz[:, 0], w_kap[:, 0]
    m_z = g.matrix(z)
    g_m = m_z @ w_kap - zb * us - zs * m1
    g_h = (-m1 * g_m * m1 - m1) / (2.0 * l1)  # adjoint of H through L = sqrt(H) and M = 1/L
    ghr = g_h.index_select(0, gidx)
    e = torch.addcmul(w_rho, pieces.wzz[:, 0] * dfw, ghr)
    g_u = m_z @ e - us - m1 * zb
    gam = (g_u / (chol_obs[:, 0, 0] * chol_obs[:, 0, 0])).index_select(0, gidx)
    wzc = wz * curv
    jz = w_kap.mul_(m1.index_select(0, gidx))
    jz.addcmul_(wz * fw, ghr, value=2.0)
    jz.addcmul_(e, us.index_select(0, gidx))
    mode_part = (w1 * d1).addcmul_(wzc, uh.index_select(0, gidx), value=-1.0)
    jz.addcmul_(mode_part, gam)
    return e.addcmul_(wzc, gam, value=-1.0), jz[:, None]


def _gradient_rows(data, zl, fw, dfw, l_fac, u_hat, u_star, chol_obs, d1, curv, w_rho, w_kap, prob, zbar, nodes):
    """Per-row :math:`(J^0, J^z)` of the module docstring, without the factor :math:`w^{(2)}`."""
    g, w1 = data.g, data.w1
    gidx = g.index
    q = zl.shape[1]
    m_inv = torch.linalg.solve_triangular(l_fac, torch.eye(q, dtype=zl.dtype, device=zl.device).expand_as(l_fac),
                                          upper=False)  # M = L^{-1}
    m_t = m_inv.transpose(-1, -2)
    zs = torch.einsum("gm,mr,ms->grs", prob, nodes, nodes)
    k_mat = g.sum(w_kap[:, :, None] * zl[:, None, :])  # sum_i w_i kappa_i zl_i^T
    g_m = k_mat - zbar[:, :, None] * u_star[:, None, :] - zs @ m_inv
    g_l = -(m_t @ g_m @ m_t) - m_t
    g_h = _chol_adjoint(l_fac, g_l)  # (G, q, q), symmetric
    g_hr = g_h.index_select(0, gidx)  # (N, q, q)
    hz = (g_hr @ zl[:, :, None])[:, :, 0]  # (N, q)
    e = w_rho + w1 * dfw * (zl * hz).sum(-1)
    g_u = g.sum(e[:, None] * zl) - u_star - (m_t @ zbar[:, :, None])[:, :, 0]
    gam = g.gather(chol_solve(chol_obs, g_u[:, :, None])[:, :, 0])  # (N, q)
    c = -w1 * curv * (zl * gam).sum(-1)
    mt_k = (m_t.index_select(0, gidx) @ w_kap[:, :, None])[:, :, 0]
    jz = (mt_k + (2.0 * w1 * fw)[:, None] * hz + e[:, None] * g.gather(u_star)
          + (w1 * d1)[:, None] * gam + c[:, None] * g.gather(u_hat))
    return e + c, jz


def fused_forward2(module, eta0: torch.Tensor, zl: torch.Tensor) -> torch.Tensor:
    """``(G,)`` contributions of the two-level module through :class:`_FusedAGQ2`."""
    return _FusedAGQ2.apply(eta0, zl, module)
