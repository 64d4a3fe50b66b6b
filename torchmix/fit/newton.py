r"""Newton's method with an exact Hessian for small parameter vectors (the :math:`\theta` of a profiled fit).

Minimises :math:`f` given a callable that returns the value, the gradient and the Hessian at once.
Each step solves :math:`H s = -g` through the eigendecomposition of the (tiny) Hessian; where
:math:`H` is not positive definite, its eigenvalues are replaced by their absolute values, floored
at :math:`10^{-8}\max_i|\lambda_i|` (a descent direction that still follows the curvature), and the
step is cut to a trust radius. A backtracking line search (Armijo, or a decrease within rounding
noise together with a smaller gradient, as in :mod:`~torchmix.fit.optimize`) accepts the step.

Convergence: :math:`\max_r|g_r| <` ``tol`` is the test of a converged fit (the same test as
:func:`~torchmix.fit.optimize.minimize`); the iterations go on until
:math:`\max_r|g_r| < 10^{-4}` ``tol`` or a step no longer decreases :math:`f`, which takes the
optimum to machine precision (Newton converges quadratically near it), or until
:data:`MAX_FLAT_STEPS` steps in a row decrease :math:`f` by no more than its rounding noise (the
precision of the arithmetic is exhausted: a stall). The normalised objective
of a fit on standardised columns does not depend on the units of the response, the predictors or
the weights, and neither does this test.
"""

from __future__ import annotations

from typing import Callable

import torch

from .optimize import MinimizeResult

__all__ = ["newton_minimize"]

TRUST_RADIUS = 1.0
#: consecutive steps accepted without a decrease beyond rounding noise after which Newton stops
MAX_FLAT_STEPS = 3


def _direction(g: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Newton direction, and whether the Hessian was positive definite."""
    evals, evecs = torch.linalg.eigh(h)
    big = float(evals.abs().max())
    if not big > 0 or not bool(torch.isfinite(evals).all()):
        return -g, False
    pd = bool(evals.min() > 1e-10 * big)
    lam = evals if pd else torch.clamp(evals.abs(), min=1e-8 * big)
    step = -(evecs @ ((evecs.transpose(0, 1) @ g) / lam))
    if not pd:
        norm = float(step.norm())
        if norm > TRUST_RADIUS:
            step = step * (TRUST_RADIUS / norm)
    return step, pd


def newton_minimize(fgh: Callable, x0: torch.Tensor, *, max_iter: int = 200, tol: float = 1e-8,
                    max_backtracks: int = 30, progress=None, canonical: Callable | None = None):
    r"""Minimise ``f`` by damped Newton steps with the exact Hessian.

    Parameters
    ----------
    fgh : callable ``x (k,) -> (value 0-d, gradient (k,), Hessian (k, k), state)``; ``state`` is
        anything the caller wants back for the returned point.
    x0 : ``(k,)`` start.
    max_iter : at most this many Newton steps.
    tol : gradient tolerance (see the module docstring).
    progress : optional tqdm bar, updated once per step.
    canonical : optional map of a point to an equivalent one (same value of ``f``, e.g. signs of
        columns of a Cholesky factor), applied to every point before it is evaluated.

    Returns
    -------
    (:class:`~torchmix.fit.optimize.MinimizeResult`, state at the returned point, whether the
    iterations stopped because no step decreased ``f`` any more while the gradient test failed).
    """
    canon = canonical if canonical is not None else (lambda v: v)
    x = canon(x0.detach().clone())
    val, g, h, state = fgh(x)
    steps, stalled, flat = 0, False, 0
    eps = torch.finfo(x.dtype).eps
    while True:
        gmax = float(g.abs().max())
        if not (bool(torch.isfinite(val)) and bool(torch.isfinite(g).all()) and bool(torch.isfinite(h).all())):
            stalled = True
            break
        if gmax < tol * 1e-4 or steps >= max_iter:
            break
        step, _ = _direction(g, h)
        slope = float(g @ step)
        noise = 1024 * eps * (1 + abs(float(val)))
        alpha, accepted = 1.0, False
        for _ in range(max_backtracks):
            cand = canon(x + alpha * step)
            cval, cg, ch, cstate = fgh(cand)
            if bool(torch.isfinite(cval)) and (
                    float(cval) <= float(val) + 1e-4 * alpha * slope
                    or (float(cval) <= float(val) + noise and float(cg.abs().max()) < gmax)):
                accepted = True
                break
            alpha *= 0.5
        if not accepted:
            stalled = True
            break
        flat = flat + 1 if float(cval) > float(val) - noise else 0   # accepted within rounding noise only
        x, val, g, h, state = cand, cval, cg, ch, cstate
        steps += 1
        if flat >= MAX_FLAT_STEPS:  # the objective no longer decreases: the precision is exhausted
            stalled = True
            break
        if progress is not None:
            progress.update(1)
    grad_max = float(g.abs().max())
    converged = bool(torch.isfinite(val)) and grad_max < tol
    if converged:
        message = "converged"
    elif steps >= max_iter:
        message = f"iteration budget reached (max_iter={max_iter})"
    else:
        message = f"gradient test failed (max |gradient| {grad_max:.3g} >= {tol:.3g})"
    res = MinimizeResult(x=x, fun=float(val), grad_max=grad_max, converged=converged, iterations=steps,
                         message=message)
    return res, state, stalled and not converged
