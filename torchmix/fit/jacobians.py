r"""Jacobians and Hessians by reverse-mode automatic differentiation only.

``torch.func.jacfwd`` (and ``torch.func.hessian``, forward-over-reverse) use forward-mode AD,
whose *dual levels* are process-wide state in torch: two threads differentiating at once enter and
leave each other's levels and fail ("Trying to access a forward AD level with an invalid index"),
or silently mix tangents. Reverse mode keeps its state per thread, so fits running concurrently
in threads stay independent.

Outside ``torch.func`` transforms the helpers use plain ``torch.autograd.grad`` (double backward):
``torch.func``'s reverse transforms import ``torch._dynamo`` on first use, which costs seconds at a
cold start. Inside a transform (e.g. ``vmap`` over responses) they use ``torch.func``. Both are
exact (no finite differences).
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["jacobian", "hessian"]


def _inside_transform() -> bool:
    return torch._C._functorch.maybe_current_level() is not None


def jacobian(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    r"""Jacobian :math:`J = \partial f/\partial x` of ``fn: (k,) -> (m,)``, shape ``(m, k)``.

    Reverse over reverse: the vector-Jacobian product :math:`u \mapsto J^\top u` is linear in
    :math:`u`, and its own gradient along :math:`e_j` is column :math:`j` of :math:`J`. This costs
    ``k`` backward passes however large ``m`` is (the per-group scores have ``m`` = number of
    groups), like forward mode, without forward-mode state.
    """
    if _inside_transform():
        from torch.func import jacrev, vjp
        out, vjp_fn = vjp(fn, x)
        return jacrev(lambda u: vjp_fn(u)[0])(torch.zeros_like(out)).transpose(0, 1)
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        out = fn(x)
        u = torch.zeros_like(out, requires_grad=True)
        # a scalar output, not ``grad_outputs=u`` (whose shape check imports sympy, seconds cold)
        (jt_u,) = torch.autograd.grad((out * u).sum(), x, create_graph=True, allow_unused=True)
        cols = []
        for j in range(x.numel()):
            if jt_u is None or not jt_u.requires_grad:
                cols.append(torch.zeros_like(out))
                continue
            (c,) = torch.autograd.grad(jt_u[j], u, retain_graph=True, allow_unused=True)
            cols.append(torch.zeros_like(out) if c is None else c)
    return torch.stack(cols, dim=1).detach()


def hessian(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    r"""Hessian of the scalar ``fn: (k,) -> ()``, shape ``(k, k)`` (reverse over reverse)."""
    if _inside_transform():
        from torch.func import jacrev
        return jacrev(jacrev(fn))(x)
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(fn(x), x, create_graph=True)
        rows = []
        for j in range(x.numel()):
            if not g.requires_grad:
                rows.append(torch.zeros_like(x))
                continue
            (r,) = torch.autograd.grad(g[j], x, retain_graph=True, allow_unused=True)
            rows.append(torch.zeros_like(x) if r is None else r)
    return torch.stack(rows, dim=0).detach()
