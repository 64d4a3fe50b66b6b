r"""The node pass of two-level AGQ as one autograd function with a hand-written backward.

For level-2 groups :math:`j`, quadrature nodes :math:`m` and node offsets :math:`D_{jm}\in\mathbb R^q`,

.. math::
    S_{jm} = \sum_{i\in j} w_{i\mid j}\,\log f\big(y_i \mid \eta^\ast_i + \tilde z_i^\top D_{jm}\big),
    \qquad \frac{\partial S}{\partial\eta_{im}} = w_{i\mid j}\,\partial_\eta\log f(y_i\mid\eta_{im}).

This is the only :math:`N\times M` work of an evaluation, so it is written to touch memory as little
as possible: nodes are processed in column chunks small enough to stay in cache, buffers are
updated in place, segment sums over groups are one CSR sparse-dense product, and nothing of size
:math:`N\times M` is kept for the backward pass (it is recomputed chunk by chunk, which also bounds
memory). For the Bernoulli-logit family :math:`\log f = -\operatorname{softplus}(t)` with
:math:`t = -(2y-1)\eta`, so the forward needs one ``softplus`` and the backward one ``sigmoid`` per
element. Gradients flow to :math:`\eta^\ast` ``(N,)``, :math:`\tilde z` ``(N, q)`` and :math:`D` ``(G, M, q)``.
"""

from __future__ import annotations

import warnings

import torch

__all__ = ["GroupSum", "node_pass", "NodePassData"]


class GroupSum:
    r"""Weighted segment sums :math:`\sum_{i\in g} v_i x_i` through a CSR matrix (rows sorted by group).

    Parameters
    ----------
    group : int64 ``(N,)`` group of each row; ``n_groups`` the number of groups.
    """

    def __init__(self, group: torch.Tensor, n_groups: int):
        self.group = group
        self.n_groups = int(n_groups)
        self.perm = torch.argsort(group, stable=True)
        counts = torch.bincount(group, minlength=self.n_groups)
        crow = torch.zeros(self.n_groups + 1, dtype=torch.int64, device=group.device)
        crow[1:] = counts.cumsum(0)
        self.crow = crow
        self.n_rows = int(group.shape[0])

    def matrix(self, row_values: torch.Tensor) -> torch.Tensor:
        """The ``(G, N)`` CSR matrix with entry ``row_values[i]`` at ``(group[i], i)``."""
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore", UserWarning)
            return torch.sparse_csr_tensor(self.crow, self.perm, row_values[self.perm].contiguous(),
                                           size=(self.n_groups, self.n_rows), check_invariants=False)

    def __call__(self, x: torch.Tensor, row_values: torch.Tensor) -> torch.Tensor:
        """``(G, K)`` sums of ``row_values[:, None] * x`` over the rows of each group (no autograd)."""
        return self.matrix(row_values) @ x


class NodePassData:
    r"""Constants of a node pass: response, weights, grouping, chunk size, family fast path."""

    def __init__(self, family, y: torch.Tensor, w1: torch.Tensor, group: torch.Tensor, n_groups: int,
                 chunk_elems: int):
        from ..families import Binomial, LogitLink

        self.family = family
        self.y, self.w1, self.group, self.n_groups = y, w1, group, int(n_groups)
        self.sums = GroupSum(group, n_groups)
        self.chunk_elems = int(chunk_elems)
        self.logit = isinstance(family, Binomial) and isinstance(family.link, LogitLink)
        if self.logit:
            self.sign = -(2.0 * y - 1.0)  # t = sign * eta, log f = -softplus(t)
            self.csr_lf = self.sums.matrix(-w1)
        else:
            self.csr_lf = self.sums.matrix(w1)

    def chunks(self, n_nodes: int):
        step = max(1, min(n_nodes, self.chunk_elems // max(self.y.shape[0], 1)))
        return [(m0, min(m0 + step, n_nodes)) for m0 in range(0, n_nodes, step)]


def _eta_chunk(data: NodePassData, base: torch.Tensor, zl: torch.Tensor, d_chunk: torch.Tensor):
    r"""``base[:, None] + sum_r zl[:, r, None] * d_chunk[g, :, r]`` as a fresh ``(N, mc)`` buffer; also
    returns the gathered offsets (list per r) for reuse."""
    gathered = []
    out = None
    for r in range(zl.shape[1]):
        dg = d_chunk[:, :, r].index_select(0, data.group)
        gathered.append(dg)
        if out is None:
            out = torch.addcmul(base[:, None], zl[:, r:r + 1], dg)
        else:
            out.addcmul_(zl[:, r:r + 1], dg)
    if out is None:  # q == 0
        out = base[:, None].expand(-1, d_chunk.shape[1]).clone()
    return out, gathered


class _NodePass(torch.autograd.Function):
    @staticmethod
    def forward(ctx, eta_star, zl, offsets, data: NodePassData, kappa):
        ctx.data, ctx.kappa = data, kappa
        ctx.save_for_backward(eta_star, zl, offsets)
        n_nodes = offsets.shape[1]
        out = torch.empty(data.n_groups, n_nodes, dtype=eta_star.dtype, device=eta_star.device)
        if data.logit:
            base, zs = data.sign * eta_star, data.sign[:, None] * zl
        else:
            base, zs = eta_star, zl
        for m0, m1 in data.chunks(n_nodes):
            t, _ = _eta_chunk(data, base, zs, offsets[:, m0:m1])
            if data.logit:
                torch.ops.aten.softplus.out(t, 1, 20, out=t)
                lf = t
            else:
                lf = data.family.logf(data.y[:, None], t, kappa)
            out[:, m0:m1] = data.csr_lf @ lf
        return out

    @staticmethod
    def backward(ctx, grad_out):
        eta_star, zl, offsets = ctx.saved_tensors
        data, kappa = ctx.data, ctx.kappa
        need_eta, need_zl, need_d = ctx.needs_input_grad[:3]
        q = zl.shape[1]
        g_eta = torch.zeros_like(eta_star)
        g_zl = torch.zeros_like(zl)
        g_d = torch.zeros_like(offsets)
        grad_out = grad_out.contiguous()
        if data.logit:
            base, zs = data.sign * eta_star, data.sign[:, None] * zl
            row = -data.w1 * data.sign  # d(log f)/d(eta) = -sign * sigmoid(t); times w1
        else:
            base, zs = eta_star, zl
            row = data.w1
        for m0, m1 in data.chunks(offsets.shape[1]):
            t, gathered = _eta_chunk(data, base, zs, offsets[:, m0:m1])
            if data.logit:
                torch.sigmoid(t, out=t)
                r = t
            else:
                r = data.family.d1(data.y[:, None], t, kappa)
            r.mul_(grad_out[:, m0:m1].index_select(0, data.group))  # r_im = d1 * dL/dS[g(i), m] (no w1 yet)
            if need_eta:
                g_eta += r.sum(1)
            for k in range(q):
                if need_zl:
                    g_zl[:, k] += torch.linalg.vecdot(r, gathered[k])
                if need_d:
                    g_d[:, m0:m1, k] = data.sums(r, row * zl[:, k])
        g_eta = g_eta * row
        g_zl = g_zl * row[:, None]
        return (g_eta if need_eta else None, g_zl if need_zl else None, g_d if need_d else None, None, None)


def node_pass(eta_star: torch.Tensor, zl: torch.Tensor, offsets: torch.Tensor, data: NodePassData,
              kappa=None) -> torch.Tensor:
    r""":math:`S_{jm}` ``(G, M)`` for ``eta_star (N,)``, ``zl (N, q)``, ``offsets (G, M, q)``.

    ``kappa`` (the gaussian dispersion) is treated as a constant here.
    """
    if torch.is_tensor(kappa):
        kappa = kappa.detach()
    return _NodePass.apply(eta_star, zl, offsets, data, kappa)
