r"""Per-value quasi-Newton steps for values stacked side by side (plausible values, replicates).

``prob`` evaluates some of the values at once: ``prob.k`` values; ``prob.value_grad(psi, rows)`` returns
the log-likelihoods ``(r,)``, gradients ``(r, m)`` and row-level pieces of the values ``rows`` (bool
``(k,)``) at ``psi[rows]``; ``prob.keep(rows, take, extra)`` records the accepted ones.
"""

from __future__ import annotations

import torch

__all__ = ["quasi_newton", "LINE_HALVINGS"]

LINE_HALVINGS = 10


def quasi_newton(prob, psi, val, g, neg_hess, active, target: float, max_steps: int, test_scale=None,
                 update: str = "bfgs"):
    r"""Per-value quasi-Newton steps :math:`\psi \leftarrow \psi + \alpha B^{-1}g` with backtracking on the
    log-likelihood, for the values in ``active`` until their max |gradient| (times ``test_scale``,
    ``(K', m)``, when given) is below ``target``; only the values still moving are evaluated.

    ``neg_hess`` is ``(K', m, m)``: positive definite approximations :math:`B` of the negated Hessians,
    which receive the BFGS update after every accepted step (superlinear convergence from the first
    value's Hessian); with ``update="sr1"`` the symmetric rank-one update
    :math:`B + rr^\top/(r^\top s)`, :math:`r = y - Bs`, wherever it is defined and keeps :math:`B` positive
    definite (in four or so dimensions it recovers the Hessian in fewer steps), BFGS elsewhere.
    Returns ``(psi, val, g, steps, stuck)``.
    """
    steps = torch.zeros(prob.k, dtype=torch.int64)
    stuck = torch.zeros(prob.k, dtype=torch.bool)
    b_mat = neg_hess.clone()
    eye = torch.eye(psi.shape[1], dtype=psi.dtype, device=psi.device)
    for _ in range(max_steps):
        todo = active & ~stuck & ((g if test_scale is None else g * test_scale).abs().amax(1) >= target)
        if not bool(todo.any()):
            break
        chol, info = torch.linalg.cholesky_ex(b_mat)
        stuck |= todo & (info != 0)
        todo &= info == 0
        chol = torch.where((info == 0)[:, None, None], chol, eye)
        step = torch.cholesky_solve(g[:, :, None], chol)[:, :, 0]
        alpha = torch.ones(prob.k, dtype=psi.dtype, device=psi.device)
        pending = todo.clone()
        old_psi, old_g = psi, g
        for _ in range(LINE_HALVINGS):
            if not bool(pending.any()):
                break
            trial = torch.where(pending[:, None], psi + alpha[:, None] * step, psi)
            tv, tg, extra = prob.value_grad(trial, pending)
            ok = torch.isfinite(tv) & (tv >= val[pending] - 1e-12 * val[pending].abs()) & torch.isfinite(tg).all(1)
            prob.keep(pending, ok, extra)
            take = torch.zeros_like(pending)
            take[pending] = ok
            psi = torch.where(take[:, None], trial, psi)
            val, g = val.clone(), g.clone()
            val[take], g[take] = tv[ok], tg[ok]
            steps += take.to(torch.int64)
            pending &= ~take
            alpha = torch.where(pending, alpha / 2, alpha)
        stuck |= pending
        # BFGS on B (Hessian of -l): s = step taken, y = -(change of the gradient of l)
        s_vec, y_vec = psi - old_psi, old_g - g
        bs = (b_mat @ s_vec[:, :, None])[:, :, 0]
        sbs, ys = (s_vec * bs).sum(1), (y_vec * s_vec).sum(1)
        good = (sbs > 0) & (ys > 1e-12 * sbs)
        safe_sbs = torch.where(good, sbs, torch.ones_like(sbs))
        safe_ys = torch.where(good, ys, torch.ones_like(ys))
        change = (y_vec[:, :, None] * y_vec[:, None, :] / safe_ys[:, None, None]
                  - bs[:, :, None] * bs[:, None, :] / safe_sbs[:, None, None])
        bfgs = b_mat + torch.where(good[:, None, None], change, torch.zeros_like(change))
        if update == "sr1":  # symmetric rank one where it stays positive definite, BFGS elsewhere
            r_vec = y_vec - bs
            rs = (r_vec * s_vec).sum(1)
            ok = rs.abs() > 1e-8 * r_vec.norm(dim=1) * s_vec.norm(dim=1)
            sr1 = r_vec[:, :, None] * r_vec[:, None, :] / torch.where(ok, rs, torch.ones_like(rs))[:, None, None]
            sr1 = b_mat + sr1
            ok &= torch.linalg.cholesky_ex(sr1)[1] == 0
            bfgs = torch.where(ok[:, None, None], sr1, bfgs)
        b_mat = bfgs
    return psi, val, g, steps, stuck
