r"""L-BFGS with a strong-Wolfe line search over a flat tensor.

The algorithm and its constants are those of ``torch.optim.LBFGS`` (itself a port of minFunc):
two-loop recursion over the last ``history_size`` curvature pairs :math:`(s_i, y_i)` kept when
:math:`y_i^\top s_i > 10^{-10}`, initial inverse Hessian :math:`\gamma I` with
:math:`\gamma = y^\top s / y^\top y`, first step :math:`\min(1, 1/\lVert g\rVert_1)`, then 1; a
line search satisfying the strong Wolfe conditions (:math:`c_1 = 10^{-4}`, :math:`c_2 = 0.9`) by
bracketing and zooming with safeguarded cubic interpolation. Written here, without
``torch.optim``, because creating a ``torch.optim`` optimiser imports ``torch._dynamo`` (seconds
at a cold start), and so that the state is plain data owned by one fit (safe in threads).

``fg(x)`` returns the value (0-dim tensor) and gradient ``(k,)`` of the objective at ``x``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

__all__ = ["LBFGSState", "lbfgs_rounds", "strong_wolfe"]


def _cubic_interpolate(x1, f1, g1, x2, f2, g2, bounds=None):
    """Minimiser of the cubic through two points with values and slopes, clipped to ``bounds``."""
    if bounds is not None:
        xmin_bound, xmax_bound = bounds
    else:
        xmin_bound, xmax_bound = (x1, x2) if x1 <= x2 else (x2, x1)
    d1 = g1 + g2 - 3 * (f1 - f2) / (x1 - x2)
    d2_square = d1 ** 2 - g1 * g2
    if d2_square >= 0:
        d2 = d2_square.sqrt()
        if x1 <= x2:
            min_pos = x2 - (x2 - x1) * ((g2 + d2 - d1) / (g2 - g1 + 2 * d2))
        else:
            min_pos = x1 - (x1 - x2) * ((g1 + d2 - d1) / (g1 - g2 + 2 * d2))
        return min(max(min_pos, xmin_bound), xmax_bound)
    return (xmin_bound + xmax_bound) / 2.0


def strong_wolfe(obj_func, x, t, d, f, g, gtd, c1=1e-4, c2=0.9, tolerance_change=1e-9, max_ls=25):
    r"""Step length along ``d`` from ``x`` satisfying the strong Wolfe conditions.

    ``obj_func(x, t, d)`` returns ``(f(x + t d) as float, gradient)``. Returns
    ``(f_new, g_new, t, evaluations)``.
    """
    d_norm = d.abs().max()
    g = g.clone()
    f_new, g_new = obj_func(x, t, d)
    ls_func_evals = 1
    gtd_new = g_new.dot(d)

    # bracket an interval containing a point satisfying the Wolfe criteria
    t_prev, f_prev, g_prev, gtd_prev = 0, f, g, gtd
    done = False
    ls_iter = 0
    while ls_iter < max_ls:
        if f_new > (f + c1 * t * gtd) or (ls_iter > 1 and f_new >= f_prev):
            bracket, bracket_f = [t_prev, t], [f_prev, f_new]
            bracket_g, bracket_gtd = [g_prev, g_new.clone()], [gtd_prev, gtd_new]
            break
        if abs(gtd_new) <= -c2 * gtd:
            bracket, bracket_f, bracket_g = [t], [f_new], [g_new]
            done = True
            break
        if gtd_new >= 0:
            bracket, bracket_f = [t_prev, t], [f_prev, f_new]
            bracket_g, bracket_gtd = [g_prev, g_new.clone()], [gtd_prev, gtd_new]
            break
        # extrapolate by cubic interpolation within [t + 0.01 (t - t_prev), 10 t]
        min_step = t + 0.01 * (t - t_prev)
        max_step = t * 10
        tmp = t
        t = _cubic_interpolate(t_prev, f_prev, gtd_prev, t, f_new, gtd_new, bounds=(min_step, max_step))
        t_prev, f_prev, g_prev, gtd_prev = tmp, f_new, g_new.clone(), gtd_new
        f_new, g_new = obj_func(x, t, d)
        ls_func_evals += 1
        gtd_new = g_new.dot(d)
        ls_iter += 1

    if ls_iter == max_ls:
        bracket, bracket_f, bracket_g = [0, t], [f, f_new], [g, g_new]

    # zoom: refine the bracket until a point satisfies the conditions
    insuf_progress = False
    low_pos, high_pos = (0, 1) if bracket_f[0] <= bracket_f[-1] else (1, 0)
    while not done and ls_iter < max_ls:
        if abs(bracket[1] - bracket[0]) * d_norm < tolerance_change:
            break
        t = _cubic_interpolate(bracket[0], bracket_f[0], bracket_gtd[0], bracket[1], bracket_f[1], bracket_gtd[1])
        # keep away from the ends of the bracket when progress is insufficient
        eps = 0.1 * (max(bracket) - min(bracket))
        if min(max(bracket) - t, t - min(bracket)) < eps:
            if insuf_progress or t >= max(bracket) or t <= min(bracket):
                if abs(t - max(bracket)) < abs(t - min(bracket)):
                    t = max(bracket) - eps
                else:
                    t = min(bracket) + eps
                insuf_progress = False
            else:
                insuf_progress = True
        else:
            insuf_progress = False

        f_new, g_new = obj_func(x, t, d)
        ls_func_evals += 1
        gtd_new = g_new.dot(d)
        ls_iter += 1

        if f_new > (f + c1 * t * gtd) or f_new >= bracket_f[low_pos]:
            # Armijo condition not satisfied or not lower than the lowest point
            bracket[high_pos], bracket_f[high_pos] = t, f_new
            bracket_g[high_pos], bracket_gtd[high_pos] = g_new.clone(), gtd_new
            low_pos, high_pos = (0, 1) if bracket_f[0] <= bracket_f[1] else (1, 0)
        else:
            if abs(gtd_new) <= -c2 * gtd:
                done = True
            elif gtd_new * (bracket[high_pos] - bracket[low_pos]) >= 0:
                # the old high becomes the new low
                bracket[high_pos], bracket_f[high_pos] = bracket[low_pos], bracket_f[low_pos]
                bracket_g[high_pos], bracket_gtd[high_pos] = bracket_g[low_pos], bracket_gtd[low_pos]
            bracket[low_pos], bracket_f[low_pos] = t, f_new
            bracket_g[low_pos], bracket_gtd[low_pos] = g_new.clone(), gtd_new

    return bracket_f[low_pos], bracket_g[low_pos], bracket[low_pos], ls_func_evals


@dataclass
class LBFGSState:
    """Memory carried from one call of :func:`lbfgs_rounds` to the next (one optimisation)."""

    history_size: int = 20
    n_iter: int = 0
    func_evals: int = 0
    d: Optional[torch.Tensor] = None
    t: object = None
    old_dirs: list = field(default_factory=list)
    old_stps: list = field(default_factory=list)
    ro: list = field(default_factory=list)
    H_diag: object = 1
    prev_flat_grad: Optional[torch.Tensor] = None
    prev_loss: Optional[float] = None


def _direction(state: LBFGSState, flat_grad: torch.Tensor) -> torch.Tensor:
    """Update the curvature memory and return the two-loop direction :math:`-H g`."""
    y = flat_grad.sub(state.prev_flat_grad)
    s = state.d.mul(state.t)
    ys = y.dot(s)
    if ys > 1e-10:
        if len(state.old_dirs) == state.history_size:
            state.old_dirs.pop(0)
            state.old_stps.pop(0)
            state.ro.pop(0)
        state.old_dirs.append(y)
        state.old_stps.append(s)
        state.ro.append(1.0 / ys)
        state.H_diag = ys / y.dot(y)
    num_old = len(state.old_dirs)
    al = [None] * num_old
    q = flat_grad.neg()
    for i in range(num_old - 1, -1, -1):
        al[i] = state.old_stps[i].dot(q) * state.ro[i]
        q.add_(state.old_dirs[i], alpha=-al[i])
    r = torch.mul(q, state.H_diag)
    for i in range(num_old):
        be_i = state.old_dirs[i].dot(r) * state.ro[i]
        r.add_(state.old_stps[i], alpha=al[i] - be_i)
    return r


def lbfgs_rounds(fg: Callable[[torch.Tensor], tuple], x: torch.Tensor, state: LBFGSState, *, max_iter: int = 20,
                 max_eval: Optional[int] = None, tolerance_grad: float = 1e-7, tolerance_change: float = 1e-9,
                 lr: float = 1.0):
    r"""Up to ``max_iter`` L-BFGS iterations from ``x`` (one ``torch.optim.LBFGS.step``).

    Stops early when :math:`\max|g| \le` ``tolerance_grad``, when the directional derivative,
    the step or the change of the value falls below ``tolerance_change``, or after ``max_eval``
    evaluations (default ``max_iter * 5 // 4``).

    Returns
    -------
    ``(x, value at the input x as float)``; ``state`` is updated in place.
    """
    if max_eval is None:
        max_eval = max_iter * 5 // 4
    x = x.detach().clone()
    orig_loss, flat_grad = fg(x)
    loss = float(orig_loss)
    current_evals = 1
    state.func_evals += 1
    if flat_grad.abs().max() <= tolerance_grad:
        return x, loss

    def obj_func(x0, t, d):
        f_new, g_new = fg(x0.add(d, alpha=t))
        return float(f_new), g_new

    n_iter = 0
    d, t = state.d, state.t
    while n_iter < max_iter:
        n_iter += 1
        state.n_iter += 1
        if state.n_iter == 1:
            d = flat_grad.neg()
            state.old_dirs, state.old_stps, state.ro, state.H_diag = [], [], [], 1
        else:
            state.d, state.t = d, t
            d = _direction(state, flat_grad)
        state.prev_flat_grad = flat_grad.clone()
        state.prev_loss = loss
        prev_loss = loss

        t = min(1.0, 1.0 / flat_grad.abs().sum()) * lr if state.n_iter == 1 else lr
        gtd = flat_grad.dot(d)
        if gtd > -tolerance_change:
            break
        loss, flat_grad, t, ls_func_evals = strong_wolfe(obj_func, x, t, d, loss, flat_grad, gtd,
                                                         max_ls=max_eval - current_evals)
        x = x.add(d, alpha=t)
        opt_cond = flat_grad.abs().max() <= tolerance_grad
        current_evals += ls_func_evals
        state.func_evals += ls_func_evals

        if n_iter == max_iter or current_evals >= max_eval or opt_cond:
            break
        if d.mul(t).abs().max() <= tolerance_change:
            break
        if abs(loss - prev_loss) < tolerance_change:
            break
    state.d, state.t = d, t
    return x, float(orig_loss)
