r"""Many responses of one GLMM at once (plausible values), batched over responses.

The design, weights and groups are shared; only the response differs. The K' = K - 1 values after
the first are laid side by side as one model with K' copies of the data (groups of copy k offset by
k times the number of groups), so one evaluation of the quadrature likelihood evaluates all of them:
its top-group contributions split by copy, and because copies share no parameter the gradient of
their sum with respect to the stacked parameters :math:`(\psi_1,\dots,\psi_{K'})` is the stack of
the K' gradients (the Hessian is block diagonal).

Each value starts from the first value's solution and modes and takes Newton steps with a
per-value backtracking line search:

1. with the first value's Hessian (a fixed-matrix Newton iteration, linearly convergent) until the
   gradient is below the convergence tolerance;
2. the value's own Hessian there, by central differences of the exact gradient exactly as
   :func:`~torchmix.fit.glmm_se.fd_hessian` does it, the 2m difference evaluations batched over values;
3. Newton steps with that Hessian to the polish tolerance, then per-top-group scores of all values
   from one backward pass and the sandwich per value (:func:`~torchmix.fit.glmm_se.assemble`).

A value that does not converge this way, or whose variance is near the boundary, is refitted on its
own with :func:`~torchmix.fit.glmm.fit_glmm`, so the result always equals fitting each value
separately.
"""

from __future__ import annotations

import math

import torch

from ..covariance import lambda_from_theta, n_theta
from ..likelihood.agq import AGQLogLik
from ..tensors import FitOutput, LevelTensors, ModelTensors
from .glmm import BOUNDARY_TOL, POLISH_STEPS, fit_glmm
from .glmm_se import EPS_QUARTER, assemble, boundary_pattern

__all__ = ["fit_glmm_many", "stack_responses"]

FIXED_STEPS = 30     # quasi-Newton steps started from the first value's Hessian
LINE_HALVINGS = 10


def stack_responses(tensors: ModelTensors, responses: torch.Tensor) -> ModelTensors:
    r"""K copies of the model side by side, copy k with response ``responses[:, k]``.

    Rows, groups of every level, parents and top-level ancestors of copy k are offset by k times
    their count, so the copies are independent groups of one model with :math:`KN` rows.
    """
    n, k_all = responses.shape
    dev = responses.device
    copy_rows = torch.arange(k_all, device=dev).repeat_interleave(n)
    levels, n_top = [], tensors.levels[-1].n_groups
    for i, lv in enumerate(tensors.levels):
        copy_groups = torch.arange(k_all, device=dev).repeat_interleave(lv.n_groups)
        parent = None
        if lv.parent is not None:
            parent = lv.parent.repeat(k_all) + copy_groups * tensors.levels[i + 1].n_groups
        levels.append(LevelTensors(Z=lv.Z.repeat(k_all, 1), term_sizes=lv.term_sizes,
                                   group=lv.group.repeat(k_all) + copy_rows * lv.n_groups, parent=parent,
                                   n_groups=k_all * lv.n_groups, w_cond=lv.w_cond.repeat(k_all),
                                   w_uncond=lv.w_uncond.repeat(k_all), top=lv.top.repeat(k_all) + copy_groups * n_top))
    return ModelTensors(X=tensors.X.repeat(k_all, 1), y=responses.transpose(0, 1).reshape(-1),
                        w1_cond=tensors.w1_cond.repeat(k_all), w1_uncond=tensors.w1_uncond.repeat(k_all),
                        levels=tuple(levels))


class _Stacked:
    """The K' copies as one AGQ module; parameters are a ``(K', m)`` matrix, one row per value."""

    def __init__(self, tensors: ModelTensors, responses: torch.Tensor, family, n_quad: int, first: FitOutput):
        self.tensors, self.k = tensors, responses.shape[1]
        self.p = tensors.n_fixed
        self.term_sizes = [tuple(lv.term_sizes) for lv in tensors.levels]
        self.sizes = [n_theta(ts) for ts in self.term_sizes]
        self.n_top = tensors.levels[-1].n_groups
        self.w_total = float(tensors.levels[-1].w_cond.sum())
        self.module = AGQLogLik(stack_responses(tensors, responses), family, n_quad)
        self.module.set_modes([u.repeat(self.k, 1) for u in first.u])
        self.n_evals = 0

    def pieces(self, psi: torch.Tensor):
        r"""Stacked :math:`\eta^0` ``(K'N,)`` and per level :math:`Z\Lambda_k` ``(K'N, q)``."""
        eta0 = (self.tensors.X @ psi[:, :self.p].transpose(0, 1)).transpose(0, 1).reshape(-1)
        zls, pos = [], self.p
        for lv, ts, k in zip(self.tensors.levels, self.term_sizes, self.sizes):
            lams = torch.stack([lambda_from_theta(row, ts) for row in psi[:, pos:pos + k]])
            zls.append(torch.einsum("nq,kqr->knr", lv.Z, lams).reshape(-1, lv.q))
            pos += k
        return eta0, zls

    def value_grad(self, psi: torch.Tensor):
        """Per-value log-likelihood ``(K',)`` and gradient of the normalised one ``(K', m)``."""
        x = psi.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            per = self.module(*self.pieces(x)).reshape(self.k, self.n_top).sum(1)
            (g,) = torch.autograd.grad(per.sum() / self.w_total, x)
        self.n_evals += 1
        return per.detach(), g.detach()

    def top_scores(self, psi: torch.Tensor):
        """Per-value contributions ``(K', G_L)``, beta scores ``(K', G_L, p)`` and Lambda scores."""
        with torch.no_grad():
            eta0, zls = self.pieces(psi)
        eta0 = eta0.requires_grad_(True)
        zls = [z.requires_grad_(True) for z in zls]
        with torch.enable_grad():
            ell = self.module(eta0, zls)
            grads = torch.autograd.grad(ell.sum(), [eta0] + zls)
        self.n_evals += 1
        top = self.module._grouping("top")
        s_beta = top.sum(self.module.X * grads[0][:, None]).reshape(self.k, self.n_top, self.p)
        zs = [self.module.Z2] + ([self.module.Z3] if len(zls) == 2 else [])
        s_lam = [top.sum(z[:, :, None] * gz[:, None, :]).reshape(self.k, self.n_top, z.shape[1], z.shape[1])
                 for z, gz in zip(zs, grads[1:])]
        return ell.detach().reshape(self.k, self.n_top), s_beta, s_lam

    def modes(self, j: int) -> list:
        """Spherical modes of value ``j`` per level."""
        return [u.reshape(self.k, -1, u.shape[1])[j].clone() for u in self.module.modes]


def _regular(psi_row: torch.Tensor, p: int, term_sizes) -> bool:
    """Whether no variance parameter is near the boundary and every diagonal of Lambda is positive."""
    fixed, _, singular = boundary_pattern(psi_row[p:], term_sizes, BOUNDARY_TOL)
    if bool(fixed.any()) or singular:
        return False
    pos = p
    for ts in term_sizes:
        k = n_theta(ts)
        if not bool((torch.diagonal(lambda_from_theta(psi_row[pos:pos + k], ts)) > 0).all()):
            return False
        pos += k
    return True


def _newton(prob: _Stacked, psi, val, g, neg_hess, active, target: float, max_steps: int, update: bool = False):
    """Per-value Newton steps :math:`\psi \leftarrow \psi + \alpha B^{-1}g` with backtracking on the
    log-likelihood, for the values in ``active`` until their max |gradient| is below ``target``.

    ``neg_hess`` is ``(K', m, m)``: positive definite approximations :math:`B` of the negated Hessians;
    with ``update`` they receive the BFGS update after every accepted step (superlinear convergence
    from the first value's Hessian). Returns ``(psi, val, g, steps, stuck)``.
    """
    steps = torch.zeros(prob.k, dtype=torch.int64)
    stuck = torch.zeros(prob.k, dtype=torch.bool)
    b_mat = neg_hess.clone()
    for _ in range(max_steps):
        todo = active & ~stuck & (g.abs().amax(1) >= target)
        if not bool(todo.any()):
            break
        chol, info = torch.linalg.cholesky_ex(b_mat)
        stuck |= todo & (info != 0)
        todo &= info == 0
        eye = torch.eye(psi.shape[1], dtype=psi.dtype, device=psi.device)
        chol = torch.where((info == 0)[:, None, None], chol, eye)
        step = torch.cholesky_solve(g[:, :, None], chol)[:, :, 0]
        alpha = torch.ones(prob.k, dtype=psi.dtype, device=psi.device)
        pending = todo.clone()
        old_psi, old_g = psi, g
        for _ in range(LINE_HALVINGS):
            trial = torch.where(pending[:, None], psi + alpha[:, None] * step, psi)
            tv, tg = prob.value_grad(trial)
            ok = torch.isfinite(tv) & (tv >= val - 1e-12 * val.abs()) & torch.isfinite(tg).all(1)
            take = pending & ok
            psi = torch.where(take[:, None], trial, psi)
            val = torch.where(take, tv, val)
            g = torch.where(take[:, None], tg, g)
            steps += take.to(torch.int64)
            pending &= ~ok
            if not bool(pending.any()):
                break
            alpha = torch.where(pending, alpha / 2, alpha)
        stuck |= pending
        if update:  # BFGS on B (Hessian of -l): s = step taken, y = -(change of the gradient of l)
            s_vec, y_vec = psi - old_psi, old_g - g
            bs = (b_mat @ s_vec[:, :, None])[:, :, 0]
            sbs, ys = (s_vec * bs).sum(1), (y_vec * s_vec).sum(1)
            good = (sbs > 0) & (ys > 1e-12 * sbs)
            safe_sbs = torch.where(good, sbs, torch.ones_like(sbs))
            safe_ys = torch.where(good, ys, torch.ones_like(ys))
            change = (y_vec[:, :, None] * y_vec[:, None, :] / safe_ys[:, None, None]
                      - bs[:, :, None] * bs[:, None, :] / safe_sbs[:, None, None])
            b_mat = b_mat + torch.where(good[:, None, None], change, torch.zeros_like(change))
    return psi, val, g, steps, stuck


def _fd_hessians(prob: _Stacked, psi: torch.Tensor) -> torch.Tensor:
    """Per-value central-difference Hessians ``(K', m, m)`` of the normalised log-likelihood,
    the step and warm starts of :func:`~torchmix.fit.glmm_se.fd_hessian`."""
    base_modes = prob.module.modes
    cols = []
    for r in range(psi.shape[1]):
        h = (psi[:, r].abs() + 1.0) * EPS_QUARTER
        e = torch.zeros_like(psi)
        e[:, r] = h
        prob.module.set_modes(base_modes)
        g_plus = prob.value_grad(psi + e)[1]
        prob.module.set_modes(base_modes)
        g_minus = prob.value_grad(psi - e)[1]
        cols.append((g_plus - g_minus) / (2.0 * h[:, None]))
    prob.module.set_modes(base_modes)
    hess = torch.stack(cols, dim=2)
    return 0.5 * (hess + hess.transpose(1, 2))


def fit_glmm_many(tensors: ModelTensors, family, responses: torch.Tensor, *, n_quad: int = 13, max_iter: int = 100,
                  tol: float = 1e-8, small_sample: str = "G/(G-1)", progress: bool = True,
                  first: FitOutput | None = None) -> list:
    """Fit the same weighted GLMM to each column of ``responses``.

    Parameters
    ----------
    tensors : the model; its ``y`` is ignored.
    family : as in :func:`~torchmix.fit.glmm.fit_glmm`.
    responses : ``(N, K)`` one column per plausible value (validated by the family).
    n_quad, max_iter, tol, small_sample, progress : as in :func:`~torchmix.fit.glmm.fit_glmm`.
    first : the fit of the first column, when the caller has it already.

    Returns
    -------
    list of K :class:`~torchmix.tensors.FitOutput`, in column order; batched ones have
    ``extra["batched"] = True``.
    """
    k_all = responses.shape[1]

    def fit_alone(k, show_progress=False):
        return fit_glmm(tensors.with_response(responses[:, k]), family, n_quad=n_quad, max_iter=max_iter, tol=tol,
                        small_sample=small_sample, progress=show_progress)

    if first is None:
        first = fit_alone(0, progress)
    if k_all == 1:
        return [first]
    p = tensors.n_fixed
    term_sizes = [tuple(lv.term_sizes) for lv in tensors.levels]
    psi0, hess0 = first.extra.get("psi"), first.extra.get("hessian")
    usable = (psi0 is not None and hess0 is not None and first.converged and not first.extra.get("boundary")
              and hess0.shape[0] == psi0.numel() and _regular(psi0, p, term_sizes))
    chol0, info = torch.linalg.cholesky_ex(-hess0) if usable else (None, 1)
    if not usable or int(info) != 0:  # a boundary or indefinite start: fit one by one
        return [first] + [fit_alone(k) for k in range(1, k_all)]

    prob = _Stacked(tensors, responses[:, 1:], family, n_quad, first)
    psi = psi0.expand(prob.k, -1).clone()
    val, g = prob.value_grad(psi)
    everyone = torch.ones(prob.k, dtype=torch.bool)
    # 1. fixed Hessian (the first value's) to the convergence tolerance
    psi, val, g, steps, stuck = _newton(prob, psi, val, g, (-hess0).expand(prob.k, -1, -1), everyone, tol,
                                        FIXED_STEPS, update=True)
    ok = ~stuck & (g.abs().amax(1) < tol) & torch.isfinite(val)
    ok &= torch.tensor([_regular(row, p, term_sizes) for row in psi], dtype=torch.bool)
    # 2. each value's own Hessian there (as the separate fit computes it), 3. polish with it
    hess = _fd_hessians(prob, psi)
    ok &= torch.linalg.cholesky_ex(-hess)[1] == 0
    neg = torch.where(ok[:, None, None], -hess, torch.eye(psi.shape[1], dtype=psi.dtype, device=psi.device))
    psi, val, g, more, stuck = _newton(prob, psi, val, g, neg, ok, tol * 1e-3, POLISH_STEPS)
    steps += more
    grad_max = g.abs().amax(1)
    ok &= torch.isfinite(val) & (grad_max < tol)

    out = [first]
    if bool(ok.any()):
        ell, s_beta, s_lam = prob.top_scores(psi)
    for j in range(prob.k):
        if not bool(ok[j]):
            out.append(fit_alone(j + 1))
            continue
        fixed_theta, zero_tau, _ = boundary_pattern(psi[j, p:], term_sizes, BOUNDARY_TOL)
        free = torch.cat([torch.ones(p, dtype=torch.bool), ~fixed_theta]).to(psi.device)
        est = assemble(psi[j], hess[j], free, fixed_theta, zero_tau, ell[j], s_beta[j], [s[j] for s in s_lam],
                       prob.modes(j), term_sizes, p, prob.w_total, small_sample)
        lnl = est.pop("lnl")
        gm = float(grad_max[j])
        out.append(FitOutput(
            **est, sigma=None, lnl=lnl, converged=True, iterations=int(steps[j]),
            message=f"converged (max |gradient| {gm:.3g} < {tol:.3g})",
            extra={"n_quad": prob.module.n_quad, "grad_max": gm, "n_evals": prob.n_evals, "n_evals_laplace": 0,
                   "lnl_laplace": math.nan, "boundary": [], "adapt": "every_eval", "hessian": hess[j],
                   "psi": psi[j].clone(), "batched": True}))
    return out
