r"""The node pass of two-level AGQ as one autograd function with a hand-written backward.

For level-2 groups :math:`j`, quadrature nodes :math:`m` and node offsets :math:`D_{jm}\in\mathbb R^q`,

.. math::
    S_{jm} = \sum_{i\in j} w_{i\mid j}\,\log f\big(y_i \mid \eta^\ast_i + \tilde z_i^\top D_{jm}\big),
    \qquad D_{jm} = R_j^{-1} z_m,

    \tilde z_i^\top D_{jm} = a_i^\top z_m,\qquad a_i = R_{g(i)}^{-\top}\tilde z_i .

so the :math:`N\times M` matrix of linear predictors is the rank-:math:`q` update
:math:`t = b\mathbf 1^\top + AZ^\top` (one ``addmm`` per chunk of nodes; :math:`b=\eta^\ast`). This
is the only :math:`N\times M` work of an evaluation, so it is written to touch memory as little as
possible: nodes are processed in column chunks small enough to stay in cache, buffers are updated
in place, and segment sums over groups are one CSR sparse-dense product. The derivative needed by
the backward pass is kept from the forward pass when :math:`N\times M` is at most ``save_elems``;
above that it is recomputed chunk by chunk, so memory stays bounded. For the Bernoulli-logit
family :math:`\log f = -\operatorname{softplus}(t)` with :math:`t = -(2y-1)\eta`: one ``softplus`` and
one ``sigmoid`` per element. Gradients flow to :math:`b` ``(N,)`` and :math:`A` ``(N, q)``.
"""

from __future__ import annotations

import torch

from .segments import Grouping

__all__ = ["node_pass", "NodePassData"]


class NodePassData:
    r"""Constants of a node pass: response, weights, grouping, chunk size, family fast path."""

    def __init__(self, family, y: torch.Tensor, w1: torch.Tensor, grouping: Grouping, chunk_elems: int,
                 save_elems: int = 0):
        from ..families import Binomial, LogitLink

        self.family = family
        self.y, self.w1, self.group, self.n_groups = y, w1, grouping.index, grouping.n
        self.sums = grouping
        self.chunk_elems = int(chunk_elems)
        self.save_elems = int(save_elems)
        self.logit = isinstance(family, Binomial) and isinstance(family.link, LogitLink)
        if self.logit:
            self.sign = -(2.0 * y - 1.0)  # t = sign * eta, log f = -softplus(t)
            self.csr_lf = self.sums.matrix(-w1)
        else:
            self.csr_lf = self.sums.matrix(w1)

    def chunks(self, n_nodes: int):
        n_rows = max(self.y.shape[0], 1)
        # cache-sized chunks, but at least a few nodes while the memory budget allows
        step = max(self.chunk_elems // n_rows, min(4, max(1, self.save_elems // n_rows)))
        step = max(1, min(n_nodes, step))
        return [(m0, min(m0 + step, n_nodes)) for m0 in range(0, n_nodes, step)]


def _eta_chunk(base: torch.Tensor, a: torch.Tensor, nodes_t: torch.Tensor, out=None):
    r""":math:`t_{im} = b_i + a_i^\top z_m` for a chunk of nodes: one ``addmm`` into ``out`` ``(N, mc)``."""
    n_rows, width = base.shape[0], nodes_t.shape[1]
    if out is None or out.shape != (n_rows, width):
        out = torch.empty(n_rows, width, dtype=base.dtype, device=base.device)
    if a.shape[1] == 0:
        return out.copy_(base[:, None].expand(-1, width))
    if a.shape[1] == 1:
        return torch.addcmul(base[:, None], a, nodes_t, out=out)
    return torch.addmm(base[:, None], a, nodes_t, out=out)


class _NodePass(torch.autograd.Function):
    @staticmethod
    def forward(ctx, base, a, nodes, data: NodePassData, kappa):
        ctx.data, ctx.kappa = data, kappa
        ctx.save_for_backward(base, a, nodes)
        n_nodes = nodes.shape[0]
        out = torch.empty(data.n_groups, n_nodes, dtype=base.dtype, device=base.device)
        bs, as_ = _signed(data, base, a)
        # keep d(log f)/dt per chunk for the backward when that fits the memory budget
        keep = any(ctx.needs_input_grad[:2]) and base.shape[0] * n_nodes <= data.save_elems
        ctx.kept = {}
        buf = None
        for m0, m1 in data.chunks(n_nodes):
            t = buf = _eta_chunk(bs, as_, nodes[m0:m1].transpose(0, 1), out=buf)
            if keep:
                ctx.kept[m0] = _derivative(data, t, kappa)
            if data.logit:
                torch.ops.aten.softplus.out(t, 1, 20, out=t)
                lf = t
            else:
                lf = data.family.logf(data.y[:, None], t, kappa)
            out[:, m0:m1] = data.csr_lf @ lf
        return out

    @staticmethod
    def backward(ctx, grad_out):
        base, a, nodes = ctx.saved_tensors
        data, kappa = ctx.data, ctx.kappa
        g_base = torch.zeros_like(base)
        g_a = torch.zeros_like(a)
        bs, as_ = _signed(data, base, a)
        row = -data.w1 * data.sign if data.logit else data.w1  # d log f / d(b, a z) = row * r
        buf = tmp = None
        for m0, m1 in data.chunks(nodes.shape[0]):
            r = ctx.kept.pop(m0, None)
            if r is None:
                t = buf = _eta_chunk(bs, as_, nodes[m0:m1].transpose(0, 1), out=buf)
                r = _derivative(data, t, kappa, out=t if data.logit else None)
            if tmp is None or tmp.shape != r.shape:
                tmp = torch.empty_like(r)
            torch.index_select(grad_out[:, m0:m1].contiguous(), 0, data.group, out=tmp)
            r.mul_(tmp)  # r_im * dL/dS[g(i), m]
            g_base.add_(r @ torch.ones(r.shape[1], dtype=r.dtype, device=r.device))
            if a.shape[1]:
                g_a.add_(r @ nodes[m0:m1])
        ctx.kept = {}
        g_base.mul_(row)
        g_a.mul_(row[:, None])
        return g_base, g_a, None, None, None


def _signed(data: NodePassData, base, a):
    """Row pieces of the chunk predictor: ``t = sign * eta`` for the Bernoulli-logit path."""
    if data.logit:
        return data.sign * base, data.sign[:, None] * a
    return base, a


def _derivative(data: NodePassData, t, kappa, out=None):
    r"""Per element :math:`r` with :math:`\partial\log f/\partial t = \text{row}\cdot r`: ``sigmoid(t)``
    (Bernoulli-logit, up to the row factor) or :math:`\partial_\eta\log f`."""
    if data.logit:
        return torch.sigmoid(t, out=out) if out is not None else torch.sigmoid(t)
    return data.family.d1(data.y[:, None], t, kappa)


def node_pass(base: torch.Tensor, a: torch.Tensor, nodes: torch.Tensor, data: NodePassData,
              kappa=None) -> torch.Tensor:
    r""":math:`S_{jm}=\sum_{i\in j}w_{i\mid j}\log f(y_i\mid b_i + a_i^\top z_m)`, ``(G, M)``.

    Parameters
    ----------
    base : ``(N,)`` :math:`b_i = \eta^\ast_i`; a : ``(N, q)`` :math:`a_i = C_{g(i)}^\top\tilde z_i` with
        :math:`C_j = R_j^{-1}` (so that :math:`\tilde z_i^\top R_j^{-1}z_m = a_i^\top z_m`);
    nodes : ``(M, q)`` quadrature nodes (constant).
    kappa : the gaussian dispersion, treated as a constant here.
    """
    if torch.is_tensor(kappa):
        kappa = kappa.detach()
    return _NodePass.apply(base, a, nodes, data, kappa)
