r"""Fit a weighted 2- or 3-level GLMM by adaptive Gauss-Hermite quadrature (MATH.md 5, 6.2, 6.4, 6.5, 7.4).

Stages:

1. starting values: weighted GLM for :math:`\beta` (:func:`~torchmix.fit.glm_start.weighted_glm`)
   and :math:`T_t = I` for every term, or a user ``start`` :math:`(\beta,\tau)`;
2. a Laplace fit (``n_quad = 1``) by L-BFGS (skipped when ``start`` is given or ``n_quad == 1``);
   diagonal :math:`|\theta|<10^{-3}` are then moved to :math:`\pm10^{-3}` (WeMix) so that a
   variance at zero can leave the symmetric point;
3. the AGQ fit by L-BFGS (strong-Wolfe line search) over :math:`(\beta s,\theta)`, :math:`s` the
   root mean square of each column of :math:`X`, minimising :math:`-\ell/\sum_k w^{(L)}_k`; the modes
   are re-adapted at every evaluation (``every_eval``) and gradients are exact (see
   :mod:`torchmix.likelihood.agq`);
4. signs of :math:`\theta` normalised, boundary rule (MATH.md 6.5), finite-difference Hessian of the
   exact gradient, a few Newton steps with it (polish), the sandwich (7.1) from per-top-group
   scores, and the delta method to :math:`\tau` (:mod:`torchmix.fit.glmm_se`).

Convergence: ``max_r |d(l / (sum w_top * I)) / d psi_r| < tol`` after the polish, with :math:`\psi` on
standardised columns (:mod:`torchmix.fit.standardize`) and :math:`I` the information scale
(:func:`information_scale`, 1 for binary responses); otherwise a
:class:`~torchmix.errors.ConvergenceWarning` and ``converged=False``.
"""

from __future__ import annotations

import math

import torch

from ..covariance import identity_theta, lambda_from_theta, n_theta, normalise_theta_signs, theta_index
from ..errors import BoundaryWarning, ConfigError, ConvergenceWarning, NumericalError
from ..likelihood.agq import AGQLogLik
from ..progress import progress_bar
from ..quadrature import check_grid_size, check_n_quad
from ..report.boundary import boundary_warning_text
from ..tensors import FitOutput, ModelTensors
from ..warn import warn
from .glm_start import parse_start, weighted_glm
from .glmm_se import assemble, boundary_pattern, fd_hessian
from .lbfgs import LBFGSState, lbfgs_rounds
from .separation import separated_rows
from .standardize import Standardizer
from .start_check import DEFAULT_TOL, start_passes_message

__all__ = ["fit_glmm", "BOUNDARY_TOL"]

BOUNDARY_TOL = 1e-6
NUDGE = 1e-3
POLISH_STEPS = 8


class _Problem:
    """Parameter bookkeeping around one AGQ module: psi = (beta, theta levels...)."""

    def __init__(self, module: AGQLogLik, p: int, term_sizes, w_total: float, bar):
        self.module, self.p, self.term_sizes, self.w_total, self.bar = module, p, term_sizes, w_total, bar
        self.sizes = [n_theta(ts) for ts in term_sizes]
        self.n_evals = 0

    def lambdas(self, psi):
        thetas = torch.split(psi[self.p:], self.sizes)
        return [lambda_from_theta(t, ts) for t, ts in zip(thetas, self.term_sizes)]

    def loglik(self, psi):
        """``(G_L,)`` contributions; counts the evaluation and updates the progress bar."""
        ell = self.module.loglik(psi[:self.p], self.lambdas(psi))
        self.n_evals += 1
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(lnl=f"{float(ell.detach().sum()):.6f}", refresh=False)
        return ell

    def grad(self, psi):
        """Gradient of the normalised log-likelihood :math:`\\ell/\\sum w_{top}`."""
        x = psi.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            val = self.loglik(x).sum() / self.w_total
            (g,) = torch.autograd.grad(val, x)
        return g.detach()

    def value(self, psi) -> float:
        with torch.no_grad():
            return float(self.loglik(psi).sum())


def _lbfgs(prob: _Problem, psi0: torch.Tensor, scale: torch.Tensor, max_iter: int, tol: float):
    """Minimise -l/sum(w_top) over phi = psi * scale by L-BFGS; returns (psi, iterations, finite)."""
    phi = (psi0 * scale).detach().clone()
    state = {"finite": True}

    def value_and_grad(phi):
        # a non-finite value gets a zero gradient, so that the line search backs off
        x = phi.detach().requires_grad_(True)
        with torch.enable_grad():
            val = -prob.loglik(x / scale).sum() / prob.w_total
            if not bool(torch.isfinite(val)):
                state["finite"] = False
                return val.detach(), torch.zeros_like(x)
            (g,) = torch.autograd.grad(val, x)
        last["eval"] = (phi.detach().clone(), val.detach(), g)
        return val.detach(), g

    last = {}
    memory = LBFGSState(history_size=20)
    phi, _ = lbfgs_rounds(value_and_grad, phi, memory, max_iter=max_iter, max_eval=max(2 * max_iter, 25),
                          tolerance_grad=tol, tolerance_change=1e-14)
    hit = last.get("eval")
    # value and gradient of l / w_total at the end point, when the last evaluation was there
    prob.end = None
    if hit is not None and torch.equal(hit[0], phi):
        prob.end = (phi / scale, -float(hit[1]) * prob.w_total, -hit[2] * scale)
    return phi / scale, memory.n_iter, state["finite"]


def _column_scale(X: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    rms = torch.sqrt((w[:, None] * X * X).sum(0) / w.sum())
    return torch.where(rms > 0, rms, torch.ones_like(rms))


def _nudge(psi: torch.Tensor, p: int, term_sizes) -> torch.Tensor:
    """Move diagonal theta entries with |theta| < 1e-3 to +-1e-3 (sign kept, 0 -> +)."""
    out = psi.clone()
    pos = p
    for ts in term_sizes:
        rows, cols = theta_index(ts)
        for k in torch.nonzero(rows == cols).flatten().tolist():
            v = float(out[pos + k])
            if abs(v) < NUDGE:
                out[pos + k] = math.copysign(NUDGE, v if v != 0 else 1.0)
        pos += len(rows)
    return out


def _normalise(psi: torch.Tensor, p: int, term_sizes, modes: list):
    """Sign-normalise theta per level and flip the matching columns of the spherical modes."""
    out, new_modes, pos = psi.clone(), [], p
    for ts, u in zip(term_sizes, modes):
        k = n_theta(ts)
        th = psi[pos:pos + k]
        th_n = normalise_theta_signs(th, ts)
        lam = lambda_from_theta(th, ts)
        signs = torch.where(torch.diagonal(lam) < 0, -1.0, 1.0).to(psi.dtype)
        out[pos:pos + k] = th_n
        new_modes.append(u * signs)
        pos += k
    return out, new_modes


def _polish(prob: _Problem, psi: torch.Tensor, free: torch.Tensor, hess: torch.Tensor, tol: float, known=None):
    """Newton steps with a fixed (finite-difference) Hessian; returns (psi, gradient, steps).

    ``known``: ``(value, gradient)`` at ``psi`` from the last evaluation there, with the modes it left."""
    g = prob.grad(psi) if known is None else known[1]
    neg = -hess
    chol, info = torch.linalg.cholesky_ex(0.5 * (neg + neg.transpose(0, 1)))
    if int(info) != 0:
        return psi, g, 0
    val = prob.value(psi) if known is None else known[0]
    steps = 0
    for _ in range(POLISH_STEPS):
        if float(g[free].abs().max()) < tol * 1e-3:
            break
        step = torch.zeros_like(psi)
        step[free] = torch.cholesky_solve(g[free][:, None], chol)[:, 0]
        modes = prob.module.modes
        accepted = False
        alpha = 1.0
        for _ in range(10):
            cand = psi + alpha * step
            cval = prob.value(cand)
            if math.isfinite(cval) and cval >= val - 1e-12 * abs(val):
                accepted = True
                break
            prob.module.set_modes(modes)
            alpha *= 0.5
        if not accepted:
            prob.module.set_modes(modes)
            break
        psi, val = cand, cval
        g = prob.grad(psi)
        steps += 1
    return psi, g, steps


def fit_glmm(tensors: ModelTensors, family, *, n_quad: int = 13, start=None, max_iter: int = 100,
             tol: float = 1e-8, small_sample: str = "G/(G-1)", progress: bool = True,
             likelihood=AGQLogLik) -> FitOutput:
    r"""Fit a weighted GLMM by adaptive Gauss-Hermite quadrature with sandwich standard errors.

    Parameters
    ----------
    tensors : the model (2 or 3 levels), response validated by ``family.validate``.
    family : a :class:`~torchmix.families.Family` without a dispersion parameter.
    n_quad : Gauss-Hermite points per random effect (1 = Laplace); rounded; ``<= 0`` is an error.
    start : optional ``(p + n_tau,)`` vector :math:`(\beta,\tau)` in reporting order.
    max_iter : L-BFGS iteration budget per stage.
    tol : gradient tolerance on :math:`\ell/\sum_k w^{(L)}_k` (convergence test).
    small_sample : ``"G/(G-1)"`` (default) or ``"none"``: factor of the sandwich meat.
    progress : show a progress bar (one tick per likelihood evaluation).
    likelihood : constructor ``(tensors, family, n_quad)`` of the likelihood module
        (:class:`~torchmix.likelihood.agq.AGQLogLik`, or one summing over processes,
        :mod:`torchmix.distributed.agq`).

    Returns
    -------
    :class:`~torchmix.tensors.FitOutput` with ``sigma=None``; ``tau`` and ``tau_cov`` hold the
    variance components (no residual) and their sandwich covariance; ``scores`` are per top group
    over :math:`(\beta,\tau)`; ``extra`` has ``n_quad``, ``grad_max``, ``n_evals``, ``lnl_laplace``
    and ``boundary``.

    Raises
    ------
    ConfigError
        ``n_quad <= 0``, a family with a dispersion parameter, or a model with more than 3 levels.
    DataError
        ``start`` of the wrong length.
    """
    n_quad = check_n_quad(n_quad)
    check_grid_size(n_quad, sum(lv.q for lv in tensors.levels), tensors.n_obs)
    if getattr(family, "has_dispersion", False):
        raise ConfigError(f"family {family!r} has a dispersion parameter; quadrature fits support the binomial "
                          "and poisson families (and user families without dispersion)")
    if tensors.n_levels not in (2, 3):
        raise ConfigError(f"non-gaussian families support 2 or 3 levels; the model has {tensors.n_levels}")
    dt, dev = tensors.X.dtype, tensors.X.device
    p = tensors.n_fixed
    term_sizes = [tuple(lv.term_sizes) for lv in tensors.levels]
    top = tensors.levels[-1]
    w_total = float(top.w_cond.sum())
    bar = progress_bar(desc=f"GLMM fit (n_quad={n_quad})", unit=" eval", disable=not progress)
    try:
        std = Standardizer.from_tensors(tensors)
        try:
            out = _fit(std.tensors(tensors), family, n_quad, std.start(start, residual=False), max_iter, tol,
                       small_sample, bar, p, term_sizes, w_total, dt, dev, likelihood)
        except torch.linalg.LinAlgError as exc:
            raise NumericalError(_curvature_message(family)) from exc
        return std.output(out, gaussian=False)
    finally:
        bar.close()


def information_scale(family, eta: torch.Tensor, w: torch.Tensor) -> float:
    r"""Scale of the Fisher information per unit weight, :math:`\max(1, \sum_i w_i W_i/\sum_i w_i)`.

    :math:`W_i` is the family's Fisher weight at the starting linear predictor :math:`\eta_i`
    (:math:`\mu_i` for poisson with the log link). The objective is divided by
    :math:`\sum_k w^{(L)}_k` times this scale, so the gradient tolerance follows the scale of the
    problem: counts multiplied by :math:`10^6` give the same normalised problem. Families whose
    information per unit weight is at most 1 (binary responses) keep the plain normalisation.
    """
    with torch.no_grad():
        fw = family.fisher_w(eta)
        ok = torch.isfinite(fw)
        if not bool(ok.any()):
            return 1.0
        value = float((w[ok] * fw[ok]).sum() / w[ok].sum())
    return max(1.0, value) if math.isfinite(value) else 1.0


def _curvature_message(family) -> str:
    link = getattr(getattr(family, "link", None), "name", "?")
    text = ("the curvature of the log-likelihood in the random effects is not positive definite, so the "
            f"quadrature is undefined ({getattr(family, 'name', family)!r} family, link {link!r})")
    if getattr(family, "name", "") == "binomial" and link == "log":
        text += ("; with the log link a linear predictor above 0 is a probability above 1. Use the logit "
                 "(default), probit or cloglog link")
    return text + "; try other starting values or a simpler model"


def _fit(tensors, family, n_quad, start, max_iter, tol, small_sample, bar, p, term_sizes, w_total, dt, dev,
         likelihood=AGQLogLik):
    X = tensors.X
    scale = torch.cat([_column_scale(X, tensors.w1_uncond), torch.ones(sum(n_theta(ts) for ts in term_sizes),
                                                                        dtype=dt, device=dev)])
    if start is not None:
        beta0, thetas0 = parse_start(start, p, term_sizes, dtype=dt, device=dev)
        psi = _nudge(torch.cat([beta0] + thetas0), p, term_sizes)
    else:
        beta0 = weighted_glm(X, tensors.y, tensors.w1_uncond, family, offset=tensors.offset)
        psi = torch.cat([beta0] + [identity_theta(ts, dtype=dt, device=dev) for ts in term_sizes])
    w_total = w_total * information_scale(family, X @ psi[:p], tensors.w1_uncond)
    iterations, lnl_laplace, evals_laplace = 0, None, 0
    first = _Problem(likelihood(tensors, family, 1 if start is None else n_quad), p, term_sizes, w_total, bar)
    passes_at_start = tol > DEFAULT_TOL and float(first.grad(psi).abs().max()) < tol
    if start is None and n_quad > 1:
        lap = first
        psi_lap, it, finite = _lbfgs(lap, psi, scale, max_iter, tol * 1e-2)
        iterations += it
        lnl_laplace = lap.value(psi_lap)
        evals_laplace = lap.n_evals
        if finite and math.isfinite(lnl_laplace):
            psi = _nudge(psi_lap, p, term_sizes)
        prior_modes = lap.module.modes
    else:
        prior_modes = None
    module = first.module if first.module.n_quad == n_quad else likelihood(tensors, family, n_quad)
    if prior_modes is not None:
        module.set_modes(prior_modes)
    prob = _Problem(module, p, term_sizes, w_total, bar)
    prob.n_evals = first.n_evals if module is first.module else 0
    psi, it, finite = _lbfgs(prob, psi, scale, max_iter, tol * 1e-2)
    iterations += it
    if not finite or not math.isfinite(prob.value(psi)):
        raise NumericalError("the quadrature log-likelihood is not finite at the estimates; try other "
                             "starting values or check the data for complete separation")
    if n_quad == 1:
        lnl_laplace = prob.value(psi)

    # ---- signs, boundary, Hessian, polish
    psi, modes = _normalise(psi, p, term_sizes, module.modes)
    module.set_modes(modes)
    theta_all = psi[p:]
    fixed_theta, zero_tau, singular = boundary_pattern(theta_all, term_sizes, BOUNDARY_TOL)
    psi[p:] = torch.where(fixed_theta.to(dev), torch.zeros_like(theta_all), theta_all)
    free = torch.cat([torch.ones(p, dtype=torch.bool), ~fixed_theta]).to(dev)
    if bool(fixed_theta.any()):
        prob.value(psi)  # refresh the modes at the boundary point
    base_modes = module.modes

    def grad_fn(x):
        module.set_modes(base_modes)
        return prob.grad(x)

    end = getattr(prob, "end", None)  # the optimiser's last evaluation was at psi (no sign or boundary change)
    known = end[1:] if end is not None and torch.equal(end[0], psi) else None
    hess = fd_hessian(grad_fn, psi, free)  # Hessian of l / w_total over the free entries
    module.set_modes(base_modes)
    psi, g, steps = _polish(prob, psi, free, hess, tol, known)
    iterations += steps
    grad_max = float(g[free].abs().max()) if bool(free.any()) else 0.0
    converged = math.isfinite(grad_max) and grad_max < tol

    # ---- final quantities at psi
    ell, s_beta, s_lam = module.top_scores(psi[:p], prob.lambdas(psi))
    prob.n_evals += 1
    est = assemble(psi, hess, free, fixed_theta, zero_tau, ell, s_beta, s_lam, module.modes, term_sizes,
                   p, w_total, small_sample)
    lnl = est.pop("lnl")
    tau_cov_model = est.pop("tau_cov_model")
    boundary = [int(i) for i in torch.nonzero(zero_tau).flatten().tolist()]
    if boundary or singular:
        warn(boundary_warning_text(est["theta"], term_sizes, BOUNDARY_TOL), BoundaryWarning)
    n_sep = separated_rows(family, tensors, psi[:p], est["b"])
    if n_sep:
        warn(f"complete or quasi-complete separation: {n_sep} of {tensors.n_obs} rows have fitted "
             "probabilities numerically equal to their 0/1 response, so the likelihood has no finite "
             "maximum (some coefficients diverge); the estimates and standard errors are not valid. "
             "Remove or combine the predictors that separate the response", ConvergenceWarning)
        converged = False
    if passes_at_start:
        warn(start_passes_message(tol), ConvergenceWarning)
        converged = converged and start is not None
    if converged:
        message = f"converged (max |gradient| {grad_max:.3g} < {tol:.3g})"
    elif n_sep:
        message = f"no finite maximum: separation ({n_sep} rows fitted exactly)"
    elif passes_at_start and start is None:
        message = "not optimised: the starting values already passed the convergence test (tol too large)"
    else:
        message = f"gradient test failed: max |gradient| {grad_max:.3g} >= {tol:.3g} (normalised log-likelihood)"
        warn(f"the GLMM fit did not converge: {message}", ConvergenceWarning)
    return FitOutput(
        **est, sigma=None, lnl=lnl, converged=converged, iterations=iterations, message=message,
        extra={"n_quad": module.n_quad, "grad_max": grad_max, "n_evals": prob.n_evals, "n_evals_laplace": evals_laplace,
               "lnl_laplace": lnl_laplace,
               "boundary": boundary, "adapt": "every_eval", "tau_cov_model": tau_cov_model, "hessian": hess,
               "psi": psi.clone()},
    )
