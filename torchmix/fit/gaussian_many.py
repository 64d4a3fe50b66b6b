r"""Many responses of one gaussian model at once (plausible values), batched over responses.

Everything that does not depend on the outcome is shared: one crossproduct pass over
:math:`[Z | X | Y_1 \dots Y_K]`, the design and the weights. The first response is fitted as
usual; the others start from its solution and take damped Newton steps *together*: their
profiled objectives are evaluated in one ``torch.func.vmap`` call per step (values, exact
gradients, and a Hessian from central differences of the gradients), with a per-response
backtracking line search. Standard-error pieces (per-top-group scores, Hessian blocks) are also
computed in one vmapped call. A response that does not converge this way, or lands on the
boundary, is refitted on its own with :func:`~torchmix.fit.gaussian.fit_gaussian`, so the result
always equals fitting each value separately.

Two-level models (at most :data:`~torchmix.likelihood.gaussian_profiled.MAX_Q` effects) take the
other responses one after another instead, each by Newton's method with the exact Hessian of
:mod:`~torchmix.likelihood.gaussian_profiled` from the first solution (a few evaluations of a few
dozen vector operations over the groups each), with the estimates and standard-error pieces from
the last evaluation.
"""

from __future__ import annotations

import torch
from torch.func import grad_and_value, vmap

from ..covariance import n_theta, normalise_theta_signs
from ..likelihood import gaussian_grad as closed_form
from ..likelihood import gaussian_profiled
from ..likelihood.gaussian import GaussianLikelihood
from ..tensors import FitOutput, ModelTensors
from .gaussian import BOUNDARY_TOL, _finish, _split, _standard_error_pieces, fit_gaussian
from .newton import newton_minimize
from .optimize import MinimizeResult

__all__ = ["fit_gaussian_many"]


def fit_gaussian_many(tensors: ModelTensors, responses: torch.Tensor, *, max_iter: int = 200, tol: float = 1e-8,
                      small_sample: str = "G/(G-1)", progress: bool = True, newton_steps: int = 20,
                      first: FitOutput | None = None) -> list:
    """Fit the same weighted linear mixed model to each column of ``responses``.

    Parameters
    ----------
    tensors : the model; its ``y`` is ignored.
    responses : ``(N, K)`` one column per plausible value.
    max_iter, tol, small_sample, progress : as in :func:`~torchmix.fit.gaussian.fit_gaussian`.
    first : the fit of the first column, when the caller has it already.

    Returns
    -------
    list of K :class:`~torchmix.tensors.FitOutput`, in column order.
    """
    k_all = responses.shape[1]

    def fit_alone(k, show_progress=False):
        return fit_gaussian(tensors.with_response(responses[:, k]), max_iter=max_iter, tol=tol,
                            small_sample=small_sample, progress=show_progress)

    if first is None:
        first = fit_alone(0, progress)
    if k_all == 1:
        return [first]
    sizes = [n_theta(lv.term_sizes) for lv in tensors.levels]
    theta0 = torch.cat(first.theta)
    if bool((theta0.abs() < BOUNDARY_TOL).any()):  # a boundary start can stay stuck: fit one by one
        return [first] + [fit_alone(k) for k in range(1, k_all)]
    lik = GaussianLikelihood(tensors, responses)
    blocks = lik.response_blocks(range(1, k_all))
    n_w = lik.n_w
    if len(tensors.levels) == 1 and tensors.levels[0].q <= gaussian_profiled.MAX_Q:
        out = [first]
        for j in range(k_all - 1):
            fit = _newton_one(lik, tuple(b[j] for b in blocks), theta0, max_iter, tol, small_sample)
            out.append(fit if fit is not None else fit_alone(j + 1))
        return out

    def objective(theta_flat, c_or, c_rr, rr_const):
        with lik.using(c_or, c_rr, rr_const):
            return -lik(_split(theta_flat, sizes)) / n_w

    if closed_form.supported(lik):  # two levels: value and gradient in closed form, no autograd
        def closed(theta_flat, c_or, c_rr, rr_const):
            with lik.using(c_or, c_rr, rr_const):
                ell, grad = closed_form.profiled_loglik(lik, theta_flat)
            return -grad / n_w, -ell / n_w

        value_grad = vmap(closed)
    else:
        value_grad = vmap(grad_and_value(objective))

    def evaluate(theta):
        g, v = value_grad(theta, *blocks)
        return v.detach(), g.detach()

    theta = theta0.expand(k_all - 1, -1).clone()
    val, g = evaluate(theta)
    steps = torch.zeros(k_all - 1, dtype=torch.int64)
    stuck = torch.zeros(k_all - 1, dtype=torch.bool)
    eps = torch.finfo(theta.dtype).eps
    for _ in range(newton_steps):
        active = (g.abs().amax(1) >= tol * 1e-4) & ~stuck
        if not bool(active.any()):
            break
        h = eps ** (1 / 3) * (1 + theta.abs())
        cols = []
        for r in range(theta.shape[1]):
            e = torch.zeros_like(theta)
            e[:, r] = h[:, r]
            cols.append((evaluate(theta + e)[1] - evaluate(theta - e)[1]) / (2 * h[:, r, None]))
        hess = torch.stack(cols, dim=2)
        hess = 0.5 * (hess + hess.transpose(1, 2))
        chol, info = torch.linalg.cholesky_ex(hess)
        pending = active & (info == 0)
        stuck |= active & (info != 0)
        chol = torch.where((info == 0)[:, None, None], chol, torch.eye(theta.shape[1], dtype=theta.dtype))
        step = -torch.cholesky_solve(g[:, :, None], chol).squeeze(2)
        noise = 1024 * eps * (1 + val.abs())
        alpha = torch.ones(k_all - 1, dtype=theta.dtype)
        new_theta, new_val, new_g = theta.clone(), val.clone(), g.clone()
        for _ in range(30):
            trial = theta + alpha[:, None] * step
            tv, tg = evaluate(trial)
            ok = torch.isfinite(tv) & ((tv <= val + 1e-4 * alpha * (g * step).sum(1))
                                       | ((tv <= val + noise) & (tg.abs().amax(1) < g.abs().amax(1))))
            take = pending & ok
            new_theta[take], new_val[take], new_g[take] = trial[take], tv[take], tg[take]
            steps += take.to(torch.int64)
            pending &= ~ok
            if not bool(pending.any()):
                break
            alpha = torch.where(pending, alpha / 2, alpha)
        stuck |= pending
        theta, val, g = new_theta, new_val, new_g

    grad_max = g.abs().amax(1)
    ok = (grad_max < tol) & torch.isfinite(val) & (theta.abs() >= BOUNDARY_TOL).all(1)
    # standard-error pieces of every converged response in one batched call
    pieces = None
    if bool(ok.any()):
        def profiled(theta_flat, c_or, c_rr, rr_const):
            with lik.using(c_or, c_rr, rr_const):
                _, beta, sigma2, _, _ = lik.profile(_split(theta_flat, sizes))
                return beta, sigma2

        def se_pieces(theta_flat, beta, sigma2, c_or, c_rr, rr_const):
            with lik.using(c_or, c_rr, rr_const):
                return _standard_error_pieces(lik, beta, _split(theta_flat, sizes), sigma2.sqrt(), sizes)

        signed = torch.stack([torch.cat([normalise_theta_signs(t, lv.term_sizes) for t, lv in
                                         zip(_split(row, sizes), tensors.levels)]) for row in theta])
        beta, sigma2 = vmap(profiled)(signed, *blocks)
        pieces = vmap(se_pieces)(signed, beta, sigma2, *blocks)
    out = [first]
    for j in range(k_all - 1):
        k = j + 1
        if not bool(ok[j]):
            out.append(fit_alone(k))
            continue
        res = MinimizeResult(x=theta[j], fun=float(val[j]), grad_max=float(grad_max[j]), converged=True,
                             iterations=int(steps[j]), message="converged")
        with lik.using(blocks[0][j], blocks[1][j], blocks[2][j]):
            fit = _finish(lik, theta[j], res, small_sample, pieces=tuple(t[j] for t in pieces))
        fit.extra["batched"] = True
        out.append(fit)
    return out


def _newton_one(lik: GaussianLikelihood, block: tuple, theta0: torch.Tensor, max_iter: int, tol: float,
                small_sample: str):
    """Two levels: one more response (its blocks ``block``) by Newton's method with the exact Hessian
    (:mod:`~torchmix.likelihood.gaussian_profiled`) from ``theta0``; None when it does not converge
    off the boundary (the caller then fits it on its own)."""
    ts = lik.term_sizes[0]
    with lik.using(*block):
        ev = gaussian_profiled.ProfiledTwoLevel(lik)
        n_w = lik.n_w

        def fgh(theta):
            st = ev(theta)
            return -st.value / n_w, -st.grad / n_w, -st.hess / n_w, st

        res, st, _ = newton_minimize(fgh, theta0, max_iter=max_iter, tol=tol,
                                     canonical=lambda t: normalise_theta_signs(t, ts))
        if not res.converged or bool((res.x.abs() < BOUNDARY_TOL).any()):
            return None
        fit = _finish(lik, res.x, res, small_sample, state=(ev, st))
    fit.extra["batched"] = True
    return fit
