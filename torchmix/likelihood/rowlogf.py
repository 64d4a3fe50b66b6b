r"""Weighted :math:`w_i\log f(y_i\mid\eta)` over node tensors for canonical links, with a kept derivative.

The three-level node pass evaluates :math:`w_i\log f(y_i\mid\eta_{i\cdot})` over tensors of shape
``(N, ...)`` (outer nodes by inner nodes). Through autograd, the logit's ``softplus`` is followed in the
backward pass by a ``sigmoid`` and several products; here one pass computes the value and the
per-element quantity from which the derivative follows:

* Bernoulli, logit: :math:`t = s\eta` with :math:`s = 2y-1`, :math:`p = \sigma(t)`,
  :math:`\log f = \log p` (:math:`-\operatorname{softplus}(-t)` where :math:`|t| > 700`),
  :math:`\partial_\eta\log f = s(1-p)`;
* Poisson, log: :math:`\log f = y\eta_c - e^{\eta_c} - \log\Gamma(y+1)` with :math:`\eta_c` clamped to
  :math:`[-700, 700]`, :math:`\partial_\eta\log f = (y - e^{\eta_c})\,\mathbb 1[|\eta|\le 700]` (as autograd
  of :meth:`~torchmix.families.Poisson.logf`).

:func:`row_logf_fn` returns None for other families, which keep :meth:`Family.logf` and autograd.
"""

from __future__ import annotations

import torch

from .kernels import LogitKernel, PoissonLogKernel, canonical_kernel, exp_into, log_into

__all__ = ["row_logf_fn"]

_ETA_CLAMP = 700.0


class _LogitRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, eta, y, w1):
        n = eta.shape[0]
        shape = (n,) + (1,) * (eta.dim() - 1)
        sign = (2.0 * y - 1.0).reshape(shape)
        t = sign * eta
        p = torch.sigmoid(t)
        if t.numel() == 0 or float(t.abs().max()) <= _ETA_CLAMP:
            lf = log_into(p, t)
        else:
            lf = torch.nn.functional.softplus(t.neg_()).neg_()
        ctx.save_for_backward(p, sign, w1.reshape(shape))
        return lf.mul_(w1.reshape(shape))

    @staticmethod
    def backward(ctx, grad):
        p, sign, w = ctx.saved_tensors
        return grad * (w * sign) * (1.0 - p), None, None


class _PoissonRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, eta, y, w1):
        n = eta.shape[0]
        shape = (n,) + (1,) * (eta.dim() - 1)
        yr, wr = y.reshape(shape), w1.reshape(shape)
        inside = (eta >= -_ETA_CLAMP) & (eta <= _ETA_CLAMP)
        ec = eta.clamp(-_ETA_CLAMP, _ETA_CLAMP)
        mu = exp_into(ec, torch.empty_like(ec))
        ctx.save_for_backward(mu, inside, yr, wr)
        return (ec * yr - mu - torch.lgamma(yr + 1.0)) * wr

    @staticmethod
    def backward(ctx, grad):
        mu, inside, yr, wr = ctx.saved_tensors
        return grad * wr * torch.where(inside, yr - mu, torch.zeros_like(mu)), None, None


def row_logf_fn(family):
    """``fn(eta, y, w1) -> w1 * log f(y, eta)`` (rows on the first axis) for a built-in canonical family, else None."""
    kernel = canonical_kernel(family)
    if kernel is LogitKernel:
        return _LogitRows.apply
    if kernel is PoissonLogKernel:
        return _PoissonRows.apply
    return None
