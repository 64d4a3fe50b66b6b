r"""Exact Hessians of stacked GLMM values where they have a closed form (two levels, one random effect,
canonical link): :class:`~torchmix.likelihood.agq_hessian.AGQHessian` at the values' optima, from the
modes their last evaluation left, in place of the :math:`2m` central-difference evaluations.
"""

from __future__ import annotations

import torch

from ..likelihood.agq_hessian import AGQHessian, supports
from ..likelihood.segments import Grouping
from ..quadrature import product_grid

__all__ = ["hessian_builder", "closed_form_hessians"]


def hessian_builder(tensors, family, n_quad: int):
    """The :class:`AGQHessian` of the model (built once for all values), or None where it does not apply."""
    lv = tensors.levels[0]
    kind = supports(family, tensors.n_levels, lv.q)
    if kind is None:
        return None
    grid = product_grid(n_quad, 1, dtype=tensors.X.dtype, device=tensors.X.device)
    return AGQHessian(kind, tensors.X, tensors.offset, lv.Z[:, 0], tensors.w1_cond, lv.w_cond,
                      Grouping(lv.group, lv.n_groups), grid.nodes[:, 0], grid.log_weights_plus_norm)


def closed_form_hessians(builder, prob, psi: torch.Tensor, rows: torch.Tensor):
    r"""Hessians ``(K', m, m)`` of the normalised log-likelihoods :math:`\ell/\sum_kw^{(2)}_k` of the values
    ``rows`` at ``psi`` (other rows 0), or None when the model has no closed form or the kept modes are not
    those at ``psi``.

    ``builder`` is :func:`hessian_builder`'s; ``prob`` the :class:`~torchmix.fit.glmm_many._Stacked`
    problem: its modes ``u`` and the points ``at`` where they were found, ``responses`` ``(N, K')`` and
    ``w_total``.
    """
    if builder is None or not bool(rows.any()):
        return None
    idx = torch.nonzero(rows).flatten()
    if not torch.equal(prob.at[idx], psi[idx]):
        return None
    hess = torch.zeros(prob.k, psi.shape[1], psi.shape[1], dtype=psi.dtype, device=psi.device)
    sub = builder(prob.responses[:, idx], psi[idx], prob.u[0][idx, :, 0]) / prob.w_total
    hess[idx] = 0.5 * (sub + sub.transpose(1, 2))
    return hess
