r"""Detect a convergence tolerance so loose that the starting values already pass the test.

With ``tol`` above the default :data:`DEFAULT_TOL`, the gradient of the normalised objective is
evaluated once at the starting point; if :math:`\max_r|\partial f/\partial\psi_r| <` ``tol`` there,
the fit would stop where it began. A :class:`~torchmix.errors.ConvergenceWarning` says so, and with the
default starting values (never an optimum) the fit is not reported as converged.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import torch

from ..errors import ConvergenceWarning
from ..warn import warn

__all__ = ["DEFAULT_TOL", "start_passes", "start_passes_message", "warn_start_passes"]

DEFAULT_TOL = 1e-8


def start_passes(f: Callable[[torch.Tensor], torch.Tensor], x0: torch.Tensor, tol: float) -> bool:
    """Whether ``tol > DEFAULT_TOL`` and the gradient of ``f`` at ``x0`` is already below ``tol``."""
    if not tol > DEFAULT_TOL:
        return False
    x = x0.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(f(x), x)
    return bool(torch.isfinite(g).all()) and float(g.abs().max()) < tol


def start_passes_message(tol: float) -> str:
    return (f"tol={tol:g} is so large that the starting values already pass the convergence test; the "
            "estimates are (close to) the starting values, not an optimum. Use a smaller tol (default 1e-8)")


def warn_start_passes(res, tol: float, default_start: bool):
    """Warn, and with the default starting values mark the result of :func:`~torchmix.fit.optimize.minimize`
    as not converged."""
    warn(start_passes_message(tol), ConvergenceWarning)
    if default_start:
        return replace(res, converged=False,
                       message="not optimised: the starting values already passed the convergence test "
                               "(tol too large)")
    return res
