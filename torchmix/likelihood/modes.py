r"""Batched Newton iterations for the posterior modes of the random effects (MATH.md 5.2, 5.4).

Everything is written in terms of the *row-level linear pieces*: the fixed part
:math:`\eta^0_i = x_i^\top\beta` and, per level, :math:`\tilde z_i = \Lambda^\top z_i` (``zl``,
shape ``(N, q)``), so that :math:`\eta_i = \eta^0_i + \sum_l \tilde z^{(l)\top}_i u^{(l)}_{g_l(i)}`.
All groups are updated at once with segment sums (:class:`~torchmix.likelihood.segments.Grouping`)
and batched small-matrix Cholesky solves; a
per-group (2 levels) or per-top-group (3 levels) step length is halved where the objective did not
increase. No Python loop runs over groups.

Two levels, per group :math:`j`:
:math:`g_j(u)=\sum_{i\in j}w_{i\mid j}\log f(y_i\mid\eta_i)-\tfrac12\|u\|^2`.
Three levels, per top group :math:`k` (joint over its children :math:`u_j` and its own :math:`v`):
:math:`F_k=\sum_{j\in k}w_{j\mid k}\big[\sum_{i\in j}w_{i\mid j}\log f-\tfrac12\|u_j\|^2\big]-\tfrac12\|v\|^2`,
whose negative Hessian is the "arrow" matrix solved through its Schur complement
(:func:`arrow_solve`). Curvature weights in the iterations are the observed
:math:`\max(-\partial^2_\eta\log f, 0)` (exact Newton for log-concave families).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConvergenceWarning
from ..warn import warn
from .segments import Grouping
from .smallmat import MAX_UNROLLED, cholesky_lower, solve_lower

__all__ = ["Grouping", "weighted_outer", "arrow_solve", "ArrowFactors", "newton_modes_2", "newton_modes_3",
           "linear_predictor", "chol", "chol_solve", "solve_upper_t", "lower_solve"]

MAX_HALVINGS = 30
TRUST_STEP = 1e-2


def weighted_outer(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, g: Grouping) -> torch.Tensor:
    r"""Per-group :math:`\sum_{i\in g} w_i a_i b_i^\top`: ``w (N,)``, ``a (N, qa)``, ``b (N, qb)`` -> ``(n, qa, qb)``."""
    if a.shape[1] == 1 and b.shape[1] == 1:
        return g.sum((w * a[:, 0] * b[:, 0])[:, None, None])
    return g.sum(w[:, None, None] * a[:, :, None] * b[:, None, :])


def linear_predictor(eta0: torch.Tensor, parts) -> torch.Tensor:
    r""":math:`\eta = \eta^0 + \sum_l \tilde z^{(l)}_i\cdot u^{(l)}_{g_l(i)}` for ``parts = [(zl, u, grouping), ...]``."""
    eta = eta0
    for zl, u, g in parts:
        if zl.shape[1] == 1:
            eta = torch.addcmul(eta, zl[:, 0], u[:, 0].index_select(0, g.index))
        else:
            eta = eta + (zl * g.gather(u)).sum(-1)
    return eta


def chol(h: torch.Tensor) -> torch.Tensor:
    """Batched lower Cholesky factor ``(G, q, q)`` of symmetric positive definite blocks.

    Raises ``torch.linalg.LinAlgError`` when a block is not positive definite.
    """
    out = h.sqrt() if h.shape[-1] == 1 else cholesky_lower(h)
    if not bool(torch.isfinite(torch.diagonal(out, dim1=-2, dim2=-1)).all()):
        raise torch.linalg.LinAlgError("a curvature block is not positive definite")
    return out


def solve_upper_t(l: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    r"""Back substitution :math:`X = L^{-\top}B` for lower ``l (G, q, q)`` and ``b (G, q, r)``."""
    q = l.shape[-1]
    if q == 1:
        return b / l
    if q > MAX_UNROLLED:
        return torch.linalg.solve_triangular(l.transpose(-1, -2), b, upper=True)
    rows = [None] * q
    for i in range(q - 1, -1, -1):
        acc = b[:, i, :]
        for k in range(i + 1, q):
            acc = acc - l[:, k, i, None] * rows[k]
        rows[i] = acc / l[:, i, i, None]
    return torch.stack(rows, dim=1)


def chol_solve(l: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    r""":math:`(LL^\top)^{-1}B` for lower ``l (G, q, q)`` and ``b (G, q, r)``."""
    if l.shape[-1] == 1:
        return b / (l * l)
    return solve_upper_t(l, lower_solve(l, b))


def lower_solve(l: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    r"""Forward substitution :math:`L^{-1}B` for lower ``l (G, q, q)`` and ``b (G, q, r)``."""
    return b / l if l.shape[-1] == 1 else solve_lower(l, b)


def _eye_like(q: int, ref: torch.Tensor) -> torch.Tensor:
    return torch.eye(q, dtype=ref.dtype, device=ref.device)


# ---------------------------------------------------------------------------------------------
# two levels
# ---------------------------------------------------------------------------------------------

def _objective_2(family, y, w1, g, eta, u, kappa):
    lf = g.sum(w1 * family.logf(y, eta, kappa))
    return lf - 0.5 * (u * u).sum(-1)


def newton_modes_2(family, y: torch.Tensor, w1: torch.Tensor, g: Grouping, eta0: torch.Tensor, zl: torch.Tensor,
                   u0: torch.Tensor, kappa=None, tol: float = 1e-10, max_iter: int = 100, last=None):
    r"""Modes :math:`\hat u_j=\arg\max g_j` for every level-2 group (2-level model), no graph.

    Parameters
    ----------
    y, w1 : ``(N,)`` response and conditional level-1 weights :math:`w_{i\mid j}`.
    g : rows to level-2 groups (``g.n`` groups).
    eta0 : ``(N,)`` fixed part; ``zl`` : ``(N, q)`` rows of :math:`Z\Lambda`.
    u0 : ``(G, q)`` warm start.
    last : optional dict; when the iterations stop on the step size it receives ``grad`` ``(G, q)``
        :math:`\nabla g_j(\hat u_j)` and ``chol`` ``(G, q, q)``, the Cholesky factor of the curvature there.

    Returns
    -------
    u : ``(G, q)`` modes; iterations : int; converged : bool;
    at_mode : ``(eta, d1, curvature)`` evaluated at the returned ``u`` (None if not available).

    Notes
    -----
    A group stops when its Newton step is below ``tol`` (max-norm; the step is then not taken) or
    when the relative change of :math:`g_j` falls below :math:`10^{-12}`. Full Newton steps no longer
    than ``TRUST_STEP`` with exact (non-negative) curvature are taken without checking the objective
    (the quadratic model is exact to far below rounding there); longer steps are halved per group
    (at most 30 halvings) while :math:`g_j` does not increase. A warm start near the mode therefore
    costs a few derivative passes and no objective evaluation.
    """
    with torch.no_grad():
        eta0, zl = eta0.detach(), zl.detach()
        q, n = zl.shape[1], g.n
        eye = _eye_like(q, zl)
        concave = bool(getattr(family, "log_concave", False))
        u = u0.detach().clone()
        eta = linear_predictor(eta0, [(zl, u, g)])
        obj = None
        active = torch.ones(n, dtype=torch.bool, device=u.device)
        wz = w1[:, None] * zl  # row pieces of the gradient and curvature sums, once
        wzz = (wz[:, 0] * zl[:, 0])[:, None, None] if q == 1 else wz[:, :, None] * zl[:, None, :]
        for it in range(1, max_iter + 1):
            d1, _, curv = family.derivs(y, eta, kappa)
            exact = concave or bool((curv >= 0).all())
            grad = g.sum(d1[:, None] * wz) - u
            hess = g.sum((curv if exact else curv.clamp_min(0.0))[:, None, None] * wzz) + eye
            factor = chol(hess)
            step = chol_solve(factor, grad[:, :, None])[:, :, 0]
            size = step.abs().amax(-1) if q > 0 else torch.zeros(n, dtype=u.dtype, device=u.device)
            active = active & ~(size < tol)
            if not bool(active.any()):
                if last is not None and exact:
                    last.update(grad=grad, chol=factor)
                return u, it, True, (eta, d1, curv)
            step = torch.where(active[:, None], step, torch.zeros_like(step))
            if exact and bool(torch.where(active, size, 0.0).max() <= TRUST_STEP):
                u = u + step
                eta = linear_predictor(eta0, [(zl, u, g)])
                obj = None
                continue
            if obj is None:
                obj = _objective_2(family, y, w1, g, eta, u, kappa)
            alpha = torch.ones(n, dtype=u.dtype, device=u.device)
            tol_obj = 1e-13 * (1.0 + obj.abs())
            for _ in range(MAX_HALVINGS + 1):
                u_new = u + alpha[:, None] * step
                eta_new = linear_predictor(eta0, [(zl, u_new, g)])
                obj_new = _objective_2(family, y, w1, g, eta_new, u_new, kappa)
                bad = ~(obj_new >= obj - tol_obj)  # also catches NaN
                if not bool(bad.any()):
                    break
                alpha = torch.where(bad, alpha * 0.5, alpha)
            if bool(bad.any()):  # no acceptable step for these groups: keep them where they are
                alpha = torch.where(bad, torch.zeros_like(alpha), alpha)
                u_new = u + alpha[:, None] * step
                eta_new = linear_predictor(eta0, [(zl, u_new, g)])
                obj_new = _objective_2(family, y, w1, g, eta_new, u_new, kappa)
            done = ((obj_new - obj).abs() <= 1e-12 * (1.0 + obj_new.abs())) | bad
            u, eta, obj = u_new, eta_new, obj_new
            active = active & ~done
            if not bool(active.any()):
                return u, it, True, None
        return u, max_iter, False, None


# ---------------------------------------------------------------------------------------------
# three levels: arrow Hessian
# ---------------------------------------------------------------------------------------------

@dataclass
class ArrowFactors:
    r"""Factors of the arrow matrix at a point (MATH.md 5.4).

    Attributes
    ----------
    chol_a : ``(G2, q2, q2)`` lower Cholesky factor of :math:`A_j`.
    a_inv_b : ``(G2, q2, q3)`` :math:`C_j = A_j^{-1}B_j`.
    chol_s : ``(G3, q3, q3)`` lower Cholesky factor of :math:`S_k = I+\sum_j w_{j\mid k}(D_j-B_j^\top A_j^{-1}B_j)`.
    """

    chol_a: torch.Tensor
    a_inv_b: torch.Tensor
    chol_s: torch.Tensor


def arrow_blocks(w1: torch.Tensor, curv: torch.Tensor, zl2: torch.Tensor, zl3: torch.Tensor, g2: Grouping):
    r"""Per level-2 group :math:`A_j-I`, :math:`B_j`, :math:`D_j` with curvature weights ``w1 * curv``."""
    wc = w1 * curv
    a = weighted_outer(wc, zl2, zl2, g2)
    b = weighted_outer(wc, zl2, zl3, g2)
    d = weighted_outer(wc, zl3, zl3, g2)
    return a, b, d


def arrow_factor(a_minus_i, b, d, w2, parent: Grouping) -> ArrowFactors:
    r"""Factor the arrow matrix: Cholesky of :math:`A_j`, :math:`C_j`, Cholesky of :math:`S_k`."""
    q2, q3 = b.shape[1], b.shape[2]
    chol_a = chol(a_minus_i + _eye_like(q2, b))
    a_inv_b = chol_solve(chol_a, b)
    schur = d - b.transpose(-1, -2) @ a_inv_b
    s = parent.sum(w2[:, None, None] * schur) + _eye_like(q3, b)
    return ArrowFactors(chol_a=chol_a, a_inv_b=a_inv_b, chol_s=chol(s))


def arrow_solve(f: ArrowFactors, gamma_u: torch.Tensor, gamma_v: torch.Tensor, b: torch.Tensor, w2: torch.Tensor,
                parent: Grouping):
    r"""Newton step of the arrow system.

    .. math::
        S_k\Delta v=\gamma_v-\sum_j w_{j\mid k}B_j^\top A_j^{-1}\gamma_j,\qquad
        \Delta u_j=A_j^{-1}(\gamma_j-B_j\Delta v_{k(j)}).

    Shapes: ``gamma_u (G2, q2)``, ``gamma_v (G3, q3)``; returns ``(du (G2, q2), dv (G3, q3))``.
    """
    a_inv_g = chol_solve(f.chol_a, gamma_u[:, :, None])  # (G2, q2, 1)
    corr = (b.transpose(-1, -2) @ a_inv_g)[:, :, 0]  # (G2, q3)
    rhs = gamma_v - parent.sum(w2[:, None] * corr)
    dv = chol_solve(f.chol_s, rhs[:, :, None])[:, :, 0]
    du = a_inv_g[:, :, 0] - (f.a_inv_b @ parent.gather(dv)[:, :, None])[:, :, 0]
    return du, dv


def arrow_gradients(family, y, w1, eta, zl2, zl3, g2: Grouping, parent: Grouping, w2, u, v, kappa):
    r"""Gradient pieces :math:`\gamma_j=\sum_{i\in j} w_{i\mid j}s_i\tilde z^{(2)}_i-u_j` and
    :math:`\gamma_v=\sum_j w_{j\mid k}\sum_{i\in j}w_{i\mid j}s_i\tilde z^{(3)}_i - v_k`."""
    s = w1 * family.d1(y, eta, kappa)
    gamma_u = g2.sum(s[:, None] * zl2) - u
    c = g2.sum(s[:, None] * zl3)
    gamma_v = parent.sum(w2[:, None] * c) - v
    return gamma_u, gamma_v


def _objective_3(family, y, w1, g2, parent, w2, eta, u, v, kappa):
    inner = g2.sum(w1 * family.logf(y, eta, kappa)) - 0.5 * (u * u).sum(-1)
    return parent.sum(w2 * inner) - 0.5 * (v * v).sum(-1)


def newton_modes_3(family, y, w1, g2: Grouping, g3: Grouping, parent: Grouping, w2, eta0, zl2, zl3, u0, v0,
                   kappa=None, tol: float = 1e-10, max_iter: int = 100):
    r"""Joint modes :math:`(\hat u_j, \hat v_k)=\arg\max F_k` for every top group (3-level model), no graph.

    Parameters
    ----------
    g2, g3 : rows to level-2 and level-3 groups; ``parent`` level-2 groups to level-3 groups;
        ``w2`` ``(G2,)`` conditional weights :math:`w_{j\mid k}`.
    zl2, zl3 : ``(N, q2)``, ``(N, q3)``; ``u0 (G2, q2)``, ``v0 (G3, q3)`` warm starts.

    Returns
    -------
    u, v, iterations, converged. Same stopping and halving rules as :func:`newton_modes_2`,
    per top group.
    """
    with torch.no_grad():
        eta0, zl2, zl3 = eta0.detach(), zl2.detach(), zl3.detach()
        u, v = u0.detach().clone(), v0.detach().clone()
        n3 = parent.n
        eta = linear_predictor(eta0, [(zl2, u, g2), (zl3, v, g3)])
        obj = None
        active = torch.ones(n3, dtype=torch.bool, device=u.device)
        for it in range(1, max_iter + 1):
            d1, _, curv = family.derivs(y, eta, kappa)
            a, b, d = arrow_blocks(w1, curv.clamp_min(0.0), zl2, zl3, g2)
            fac = arrow_factor(a, b, d, w2, parent)
            s = w1 * d1
            gamma_u = g2.sum(s[:, None] * zl2) - u
            gamma_v = parent.sum(w2[:, None] * g2.sum(s[:, None] * zl3)) - v
            du, dv = arrow_solve(fac, gamma_u, gamma_v, b, w2, parent)
            moved = torch.zeros(n3, dtype=u.dtype, device=u.device).scatter_reduce(
                0, parent.index, du.abs().amax(-1), reduce="amax", include_self=True)
            moved = torch.maximum(moved, dv.abs().amax(-1))
            active = active & ~(moved < tol)
            if not bool(active.any()):
                return u, v, it, True
            du = torch.where(parent.gather(active)[:, None], du, torch.zeros_like(du))
            dv = torch.where(active[:, None], dv, torch.zeros_like(dv))
            if obj is None:
                obj = _objective_3(family, y, w1, g2, parent, w2, eta, u, v, kappa)
            alpha = torch.ones(n3, dtype=u.dtype, device=u.device)
            tol_obj = 1e-13 * (1.0 + obj.abs())
            for _ in range(MAX_HALVINGS + 1):
                u_new = u + parent.gather(alpha)[:, None] * du
                v_new = v + alpha[:, None] * dv
                eta_new = linear_predictor(eta0, [(zl2, u_new, g2), (zl3, v_new, g3)])
                obj_new = _objective_3(family, y, w1, g2, parent, w2, eta_new, u_new, v_new, kappa)
                bad = ~(obj_new >= obj - tol_obj)
                if not bool(bad.any()):
                    break
                alpha = torch.where(bad, alpha * 0.5, alpha)
            if bool(bad.any()):
                alpha = torch.where(bad, torch.zeros_like(alpha), alpha)
                u_new = u + parent.gather(alpha)[:, None] * du
                v_new = v + alpha[:, None] * dv
                eta_new = linear_predictor(eta0, [(zl2, u_new, g2), (zl3, v_new, g3)])
                obj_new = _objective_3(family, y, w1, g2, parent, w2, eta_new, u_new, v_new, kappa)
            done = ((obj_new - obj).abs() <= 1e-12 * (1.0 + obj_new.abs())) | bad
            u, v, eta, obj = u_new, v_new, eta_new, obj_new
            active = active & ~done
            if not bool(active.any()):
                return u, v, it, True
        return u, v, max_iter, False


def warn_modes(converged: bool, iterations: int, what: str = "random-effect modes") -> None:
    """Warn when the batched Newton iterations hit their cap."""
    if not converged:
        warn(f"the {what} did not converge in {iterations} Newton iterations; the likelihood "
             "value may be inaccurate", ConvergenceWarning)
