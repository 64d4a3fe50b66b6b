r"""Minimisers shared by the fitters: L-BFGS with a strong-Wolfe line search, then Newton polish.

The L-BFGS here (:mod:`~torchmix.fit.lbfgs`) is the algorithm of ``torch.optim.LBFGS`` written
over a flat tensor (``torch.optim`` imports ``torch._dynamo`` when an optimiser is created, seconds
at a cold start). It has only absolute tolerances, so callers pass a *normalised* objective
(divided by the total weight) and the convergence test here is made on its gradient explicitly. A
few damped Newton steps (Hessian from central differences of the exact gradient) then take the
optimum to machine precision when the Hessian is positive definite; warm starts (plausible values)
try Newton first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .lbfgs import LBFGSState, lbfgs_rounds

__all__ = ["MinimizeResult", "minimize"]


@dataclass
class MinimizeResult:
    """Outcome of :func:`minimize`."""

    x: torch.Tensor
    fun: float
    grad_max: float
    converged: bool
    iterations: int
    message: str


def _value_and_grad(f: Callable, x: torch.Tensor):
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        val = f(x)
        (g,) = torch.autograd.grad(val, x)
    return val.detach(), g.detach()


class _Cached:
    """``f`` with its value and gradient remembered at the last few points (L-BFGS evaluates the
    accepted point inside its line search; the convergence test here reuses it)."""

    def __init__(self, f: Callable, size: int = 4):
        self.f, self.size, self.memo = f, size, []

    def __call__(self, x: torch.Tensor):
        for xm, val, g in self.memo:
            if torch.equal(xm, x):
                return val, g
        val, g = _value_and_grad(self.f, x)
        self.memo = ([(x.detach().clone(), val, g)] + self.memo)[: self.size]
        return val, g


def minimize(f: Callable[[torch.Tensor], torch.Tensor], x0: torch.Tensor, *, max_iter: int = 200,
             tol: float = 1e-8, newton_steps: int = 20, progress=None,
             newton_first: bool = False) -> MinimizeResult:
    r"""Minimise a smooth scalar function of a flat parameter vector.

    Parameters
    ----------
    f : callable ``(k,) -> ()``, differentiable with autograd.
    x0 : ``(k,)`` starting point.
    max_iter : iteration budget: L-BFGS iterations plus Newton polish steps together never exceed
        it (``iterations`` of the result counts both); a run that has used it up without passing
        the gradient test returns ``converged=False``.
    tol : convergence when :math:`\max_r |\partial f/\partial x_r| <` ``tol``.
    newton_steps : at most this many Newton polish steps after L-BFGS.
    progress : optional tqdm bar, updated once per L-BFGS round.
    newton_first : try the Newton steps from ``x0`` first and skip L-BFGS when they converge
        (for warm starts near the optimum, where L-BFGS's first step, minus the gradient, is
        tiny and its line search needs many evaluations).

    Returns
    -------
    :class:`MinimizeResult`
    """
    iterations, message = 0, f"iteration budget reached (max_iter={max_iter})"
    x = x0.detach().clone()
    if newton_first:
        x, val, g, iterations = _newton(f, x, tol, min(newton_steps, max_iter))
        if float(g.abs().max()) < tol:
            return MinimizeResult(x=x, fun=float(val), grad_max=float(g.abs().max()),
                                  converged=bool(torch.isfinite(val)), iterations=iterations,
                                  message="converged")
    fg = _Cached(f)
    state = LBFGSState(history_size=20)
    last = float("inf")
    while iterations < max_iter:
        before = state.n_iter
        x, start_val = lbfgs_rounds(fg, x, state, max_iter=min(25, max_iter - iterations), max_eval=31,
                                    tolerance_grad=tol * 1e-3, tolerance_change=1e-16)
        after = state.n_iter
        iterations += max(after - before, 1)
        if progress is not None:
            progress.update(1)
        val, g = fg(x)
        if not bool(torch.isfinite(g).all()):
            message = "non-finite gradient"
            break
        now = float(val)
        if float(g.abs().max()) < tol or after == before or abs(start_val - now) <= 1e-15 * (1 + abs(now)) \
                or now == last:
            message = "L-BFGS converged"
            break
        last = now
    x, val, g, n_polish = _newton(f, x.detach(), tol, min(newton_steps, max_iter - iterations))
    iterations += n_polish
    grad_max = float(g.abs().max())
    converged = bool(torch.isfinite(val)) and grad_max < tol
    if converged:
        message = "converged"
    elif message == "L-BFGS converged":
        message = f"gradient test failed (max |gradient| {grad_max:.3g} >= {tol:.3g})"
    return MinimizeResult(x=x, fun=float(val), grad_max=grad_max, converged=converged, iterations=iterations,
                          message=message)


def _gradient_difference_hessian(f, x: torch.Tensor) -> torch.Tensor:
    r"""Hessian by central differences of the exact (autograd) gradient, symmetrised.

    Step :math:`h_r = \epsilon^{1/3}(1 + |x_r|)`. For the small parameter vectors of the
    optimiser, :math:`2k` gradient evaluations are much cheaper than a forward-over-reverse
    ``torch.func.hessian``, and a Newton direction does not need more accuracy than this.
    """
    k = x.numel()
    h = torch.finfo(x.dtype).eps ** (1 / 3) * (1 + x.abs())
    cols = []
    for r in range(k):
        e = torch.zeros_like(x)
        e[r] = h[r]
        cols.append((_value_and_grad(f, x + e)[1] - _value_and_grad(f, x - e)[1]) / (2 * h[r]))
    hess = torch.stack(cols, dim=1)
    return 0.5 * (hess + hess.transpose(0, 1))


def _newton(f, x, tol, newton_steps):
    """Damped Newton steps while the Hessian is positive definite.

    The Hessian is central differences of the exact gradient
    (:func:`_gradient_difference_hessian`); the step is accepted only if the exact objective does
    not increase beyond its rounding noise, so the accuracy of the optimum is that of the gradient.

    Returns ``(x, value, gradient, steps taken)``.
    """
    steps = 0
    val, g = _value_and_grad(f, x)
    for _ in range(newton_steps):
        if float(g.abs().max()) < tol * 1e-4:
            break
        h = _gradient_difference_hessian(f, x)
        chol, info = torch.linalg.cholesky_ex(h)
        if int(info) != 0:
            break
        step = -torch.cholesky_solve(g[:, None], chol).squeeze(1)
        alpha, accepted = 1.0, False
        noise = 1024 * torch.finfo(x.dtype).eps * (1 + abs(float(val)))
        for _ in range(30):
            cand = x + alpha * step
            cval, cg = _value_and_grad(f, cand)
            if bool(torch.isfinite(cval)) and (
                    float(cval) <= float(val) + 1e-4 * alpha * float(g @ step)
                    or (float(cval) <= float(val) + noise and float(cg.abs().max()) < float(g.abs().max()))):
                accepted = True
                break
            alpha *= 0.5
        if not accepted:
            break
        x, val, g = cand, cval, cg
        steps += 1
    return x, val, g, steps
