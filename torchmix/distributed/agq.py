r"""The AGQ log-likelihood of a GLMM summed over processes, with the interface of
:class:`~torchmix.likelihood.agq.AGQLogLik`, for :func:`~torchmix.fit.glmm.fit_glmm`.

Each process evaluates :class:`~torchmix.likelihood.agq.AGQLogLik` on its shard of whole top-level
groups (:mod:`~torchmix.distributed.shard`): the log-likelihood is a sum over top-level groups,

.. math:: \ell(\psi) = \sum_r \ell^{(r)}(\psi),\qquad \nabla\ell = \sum_r \nabla\ell^{(r)},

so one evaluation sums :math:`1 + p + \sum_l q_l^2` numbers over processes (value and gradient
together). :meth:`DataParallelAGQ.loglik` returns the total as a 1-element tensor whose backward is
the summed gradient, so the fitter's L-BFGS, finite-difference Hessian and Newton polish run on every
process with the same numbers. Per-group quantities (modes, contributions, scores) are gathered in
group order, so the fitter's sandwich, boundary rule and random effects are those of one process.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..likelihood.agq import AGQLogLik
from ..quadrature import check_n_quad
from ..tensors import ModelTensors
from .collectives import Collectives
from .shard import Shard, shard_tensors

__all__ = ["DataParallelAGQ", "agq_factory"]


class _Summed(torch.autograd.Function):
    """Total log-likelihood ``(1,)`` over processes; backward: the summed gradient."""

    @staticmethod
    def forward(ctx, owner, beta, *lambdas):
        want = any(ctx.needs_input_grad[1:])
        local, grads = owner._local_value_and_grad(beta, lambdas, want)
        parts = [local.reshape(1)] + ([g.reshape(-1) for g in grads] if want else [])
        tot = owner.coll.allsum(torch.cat(parts))
        if want:
            out, pos = [], 1
            for t in (beta,) + tuple(lambdas):
                out.append(tot[pos:pos + t.numel()].reshape(t.shape))
                pos += t.numel()
            ctx.save_for_backward(*out)
        return tot[:1]

    @staticmethod
    def backward(ctx, grad_out):
        grads = ctx.saved_tensors
        return (None,) + tuple(grad_out[0] * g for g in grads)


class DataParallelAGQ:
    """:class:`~torchmix.likelihood.agq.AGQLogLik` over the shards of all processes.

    Parameters
    ----------
    full : the full model (every process holds it); family, n_quad : as for ``AGQLogLik``.
    coll : the collectives of the fit.
    shard : this process's shard of ``full`` (computed when omitted).
    """

    def __init__(self, full: ModelTensors, family, n_quad: int, coll: Collectives, shard: Shard | None = None):
        self.coll = coll
        self.shard = shard if shard is not None else shard_tensors(full, coll.rank, coll.size)
        self.full_levels = [(lv.n_groups, lv.q) for lv in full.levels]
        self.p = full.n_fixed
        self.kw = dict(dtype=full.X.dtype, device=full.X.device)
        self.local = None if self.shard.empty else AGQLogLik(self.shard.tensors, family, n_quad)
        self.n_quad = self.local.n_quad if self.local is not None else check_n_quad(n_quad)

    # ------------------------------------------------------------------ sums
    def _local_value_and_grad(self, beta, lambdas, want: bool):
        if self.local is None:
            zero = torch.zeros((), **self.kw)
            return zero, [torch.zeros_like(t) for t in (beta,) + tuple(lambdas)]
        if not want:
            with torch.no_grad():
                return self.local.loglik(beta.detach(), [lam.detach() for lam in lambdas]).sum(), None
        b = beta.detach().requires_grad_(True)
        lams = [lam.detach().requires_grad_(True) for lam in lambdas]
        with torch.enable_grad():
            val = self.local.loglik(b, lams).sum()
            grads = torch.autograd.grad(val, [b] + lams, allow_unused=True)
        grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, [b] + lams)]
        return val.detach(), grads

    def loglik(self, beta: torch.Tensor, lambdas: Sequence[torch.Tensor], kappa=None) -> torch.Tensor:
        """The total :math:`\\ell` as a ``(1,)`` tensor (its ``sum()`` is the log-likelihood)."""
        return _Summed.apply(self, beta, *lambdas)

    # ------------------------------------------------------------------ per group
    def _ids(self, level: int) -> list:
        return [ids[level] for ids in self.shard.all_group_ids]

    @property
    def modes(self) -> list:
        """Spherical modes per level of all groups (gathered), detached."""
        out = []
        for l, (n, q) in enumerate(self.full_levels):
            local = self.local.modes[l] if self.local is not None else torch.zeros(0, q, **self.kw)
            out.append(self.coll.put_rows(local, self._ids(l), n))
        return out

    def set_modes(self, modes: Sequence[torch.Tensor]) -> None:
        """Warm start from the modes of all groups (this process keeps its own)."""
        if self.local is not None:
            self.local.set_modes([m[ids.to(m.device)] for m, ids in zip(modes, self.shard.group_ids)])

    def reset_modes(self) -> None:
        if self.local is not None:
            self.local.reset_modes()

    def top_scores(self, beta: torch.Tensor, lambdas: Sequence[torch.Tensor], kappa=None):
        """As :meth:`AGQLogLik.top_scores`, gathered over processes in top-group order."""
        counts = self.shard.top_counts
        if self.local is not None:
            ell, s_beta, s_lam = self.local.top_scores(beta, lambdas)
        else:
            ell = torch.zeros(0, **self.kw)
            s_beta = torch.zeros(0, self.p, **self.kw)
            s_lam = [torch.zeros(0, q, q, **self.kw) for _, q in self.full_levels]
        flat = torch.cat([ell[:, None], s_beta] + [s.reshape(s.shape[0], -1) for s in s_lam], dim=1)
        every = self.coll.cat_rows(flat, counts)
        ell, s_beta, pos, s_out = every[:, 0], every[:, 1:1 + self.p], 1 + self.p, []
        for _, q in self.full_levels:
            s_out.append(every[:, pos:pos + q * q].reshape(-1, q, q))
            pos += q * q
        return ell, s_beta, s_out


def agq_factory(coll: Collectives):
    """A ``likelihood(tensors, family, n_quad)`` constructor for :func:`~torchmix.fit.glmm.fit_glmm` that
    builds :class:`DataParallelAGQ` (the shard of each model is cut once and reused)."""
    cache: dict = {}

    def make(tensors: ModelTensors, family, n_quad: int) -> DataParallelAGQ:
        hit = cache.get("shard")
        if hit is None or hit[0] is not tensors:
            hit = cache["shard"] = (tensors, shard_tensors(tensors, coll.rank, coll.size))
        return DataParallelAGQ(tensors, family, n_quad, coll, shard=hit[1])

    return make
