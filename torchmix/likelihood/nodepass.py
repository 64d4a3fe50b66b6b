r"""The node pass of two-level AGQ as one autograd function with a hand-written backward.

For level-2 groups :math:`j`, quadrature nodes :math:`m` and node offsets :math:`D_{jm}\in\mathbb R^q`,

.. math::
    S_{jm} = \sum_{i\in j} w_{i\mid j}\,\log f\big(y_i \mid \eta^\ast_i + \tilde z_i^\top D_{jm}\big),
    \qquad \frac{\partial S}{\partial\eta_{im}} = w_{i\mid j}\,\partial_\eta\log f(y_i\mid\eta_{im}).

This is the only :math:`N\times M` work of an evaluation, so it is written to touch memory as little
as possible: nodes are processed in column chunks small enough to stay in cache, buffers are
updated in place, and segment sums over groups are one CSR sparse-dense product. The derivative
needed by the backward pass is kept from the forward pass when :math:`N\times M` is at most
``save_elems``; above that it is recomputed chunk by chunk, so memory stays bounded. For the Bernoulli-logit family :math:`\log f = -\operatorname{softplus}(t)` with
:math:`t = -(2y-1)\eta`, so the forward needs one ``softplus`` and the backward one ``sigmoid`` per
element. Gradients flow to :math:`\eta^\ast` ``(N,)``, :math:`\tilde z` ``(N, q)`` and :math:`D` ``(G, M, q)``.
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
        step = max(1, min(n_nodes, self.chunk_elems // max(self.y.shape[0], 1)))
        return [(m0, min(m0 + step, n_nodes)) for m0 in range(0, n_nodes, step)]


def _eta_chunk(data: NodePassData, base: torch.Tensor, zl: torch.Tensor, d_chunk: torch.Tensor, out=None):
    r"""``base[:, None] + sum_r zl[:, r, None] * d_chunk[g, :, r]`` as an ``(N, mc)`` buffer (``out`` if given)."""
    n_rows, width = base.shape[0], d_chunk.shape[1]
    if out is None or out.shape != (n_rows, width):
        out = torch.empty(n_rows, width, dtype=base.dtype, device=base.device)
    q = zl.shape[1]
    if q == 0:
        out.copy_(base[:, None].expand(-1, width))
        return out
    torch.index_select(d_chunk[:, :, 0], 0, data.group, out=out)
    torch.addcmul(base[:, None], zl[:, 0:1], out, out=out)
    if q > 1:
        tmp = torch.empty_like(out)
        for r in range(1, q):
            torch.index_select(d_chunk[:, :, r], 0, data.group, out=tmp)
            out.addcmul_(zl[:, r:r + 1], tmp)
    return out


class _NodePass(torch.autograd.Function):
    @staticmethod
    def forward(ctx, eta_star, zl, offsets, data: NodePassData, kappa):
        ctx.data, ctx.kappa = data, kappa
        ctx.save_for_backward(eta_star, zl, offsets)
        n_nodes = offsets.shape[1]
        out = torch.empty(data.n_groups, n_nodes, dtype=eta_star.dtype, device=eta_star.device)
        base, zs = _signed(data, eta_star, zl)
        # keep d(log f)/d(eta) per chunk for the backward when that fits the memory budget
        keep = any(ctx.needs_input_grad[:3]) and eta_star.shape[0] * n_nodes <= data.save_elems
        ctx.kept = {}
        buf = None
        for m0, m1 in data.chunks(n_nodes):
            t = buf = _eta_chunk(data, base, zs, offsets[:, m0:m1], out=buf)
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
        eta_star, zl, offsets = ctx.saved_tensors
        data, kappa = ctx.data, ctx.kappa
        need_eta, need_zl, need_d = ctx.needs_input_grad[:3]
        q = zl.shape[1]
        g_eta = torch.zeros_like(eta_star)
        g_zl = torch.zeros_like(zl)
        g_d = torch.zeros_like(offsets)
        grad_out = grad_out.contiguous()
        base, zs = _signed(data, eta_star, zl)
        row = -data.w1 * data.sign if data.logit else data.w1  # d log f / d eta = row * r
        mats = [data.sums.matrix(row * zl[:, k]) for k in range(q)] if need_d else []
        buf = tmp = None
        for m0, m1 in data.chunks(offsets.shape[1]):
            r = ctx.kept.pop(m0, None)
            if r is None:
                t = buf = _eta_chunk(data, base, zs, offsets[:, m0:m1], out=buf)
                r = _derivative(data, t, kappa, out=t if data.logit else None)
            if tmp is None or tmp.shape != r.shape:
                tmp = torch.empty_like(r)
            ones = torch.ones(r.shape[1], dtype=r.dtype, device=r.device)
            torch.index_select(grad_out[:, m0:m1], 0, data.group, out=tmp)
            r.mul_(tmp)  # r_im * dL/dS[g(i), m]
            if need_eta:
                g_eta.add_(r @ ones)
            for k in range(q):
                if need_zl:
                    torch.index_select(offsets[:, m0:m1, k], 0, data.group, out=tmp)
                    g_zl[:, k].add_(tmp.mul_(r) @ ones)
                if need_d:
                    g_d[:, m0:m1, k] = mats[k] @ r
        ctx.kept = {}
        g_eta.mul_(row)
        g_zl.mul_(row[:, None])
        return (g_eta if need_eta else None, g_zl if need_zl else None, g_d if need_d else None, None, None)


def _signed(data: NodePassData, eta_star, zl):
    """Row pieces of the chunk predictor: ``t = sign * eta`` for the Bernoulli-logit path."""
    if data.logit:
        return data.sign * eta_star, data.sign[:, None] * zl
    return eta_star, zl


def _derivative(data: NodePassData, t, kappa, out=None):
    r"""Per element :math:`r` with :math:`\partial\log f/\partial\eta = \text{row}\cdot r`: ``sigmoid(t)``
    (Bernoulli-logit, up to the row factor) or :math:`\partial_\eta\log f`."""
    if data.logit:
        return torch.sigmoid(t, out=out) if out is not None else torch.sigmoid(t)
    return data.family.d1(data.y[:, None], t, kappa)


def node_pass(eta_star: torch.Tensor, zl: torch.Tensor, offsets: torch.Tensor, data: NodePassData,
              kappa=None) -> torch.Tensor:
    r""":math:`S_{jm}` ``(G, M)`` for ``eta_star (N,)``, ``zl (N, q)``, ``offsets (G, M, q)``.

    ``kappa`` (the gaussian dispersion) is treated as a constant here.
    """
    if torch.is_tensor(kappa):
        kappa = kappa.detach()
    return _NodePass.apply(eta_star, zl, offsets, data, kappa)
