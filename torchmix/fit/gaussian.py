r"""Fit a weighted gaussian mixed model: profiled ML over :math:`\theta`, then sandwich SEs.

MATH.md 4, 6.1-6.3, 6.5, 7.1-7.3. The profiled log-likelihood :math:`\ell_p(\theta)` is minimised
(negated, divided by :math:`N_w`) by L-BFGS with Newton polish; :math:`\hat\beta, \hat\sigma^2` follow
in closed form. Two-level models (at most :data:`~torchmix.likelihood.gaussian_profiled.MAX_Q` effects)
instead start from moment estimates (:mod:`~torchmix.fit.gaussian_start`) and take Newton steps with
the exact Hessian (:mod:`~torchmix.likelihood.gaussian_profiled`, :mod:`~torchmix.fit.newton`), L-BFGS
taking over only if Newton stalls; their column scales come from the crossproducts. Standard errors:

* fixed effects: :math:`V_\beta = \mathcal H_{\beta\beta}^{-1} J_{\beta\beta}\mathcal H_{\beta\beta}^{-1}`
  with :math:`\mathcal H_{\beta\beta} = -K_{\beta\beta}/\hat\sigma^2`;
* variance components, per level :math:`l`: sandwich over :math:`\psi_l = (\theta_l, \sigma)` with the
  other parameters fixed, then the delta method to :math:`\tau_l = \operatorname{free}(\sigma^2\Lambda_l
  \Lambda_l^\top)`; the residual variance from the level-2 block.

Scores are per top-level group, the Jacobian of the vector :math:`(\ell_k)_k` of (4.3); Jacobians
and Hessians by reverse-mode autodiff (:mod:`~torchmix.fit.jacobians`, safe in threads). Two-level
models use closed forms instead (:mod:`torchmix.likelihood.gaussian_grad`,
:mod:`torchmix.likelihood.gaussian_profiled`) for the gradient of :math:`\ell_p`, the scores and the
:math:`(\theta,\sigma)` Hessian; the delta method's Jacobian is in closed form for every model.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from ..covariance import (blank_zero_variances, diagonal_theta_mask, identity_theta, lambda_from_theta, n_theta,
                          normalise_theta_signs, tau_from_lambda, tau_index, theta_from_tau, theta_index)
from ..errors import BoundaryWarning, ConvergenceWarning, DataError, NumericalError
from ..inference import safe_inverse_negative_hessian, sandwich
from ..likelihood import gaussian_grad as closed_form
from ..likelihood import gaussian_profiled
from ..likelihood.gaussian import GaussianLikelihood
from ..progress import progress_bar
from ..report.boundary import boundary_warning_text
from ..tensors import FitOutput, ModelTensors
from ..threads import choose_threads, fit_threads, problem_work
from ..warn import warn
from .gaussian_start import moment_theta
from .jacobians import hessian, jacobian
from .newton import newton_minimize
from .optimize import minimize
from .standardize import Standardizer
from .start_check import start_passes, warn_start_passes

__all__ = ["fit_gaussian", "BOUNDARY_TOL"]

BOUNDARY_TOL = 1e-6


def _split(flat: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    return list(torch.split(flat, sizes))


def _start_theta(tensors: ModelTensors, start, p: int) -> torch.Tensor:
    term_sizes = [lv.term_sizes for lv in tensors.levels]
    kw = dict(dtype=tensors.X.dtype, device=tensors.X.device)
    if start is None:
        return torch.cat([identity_theta(ts, **kw) for ts in term_sizes])
    start = torch.as_tensor(start, **kw).reshape(-1)
    n_tau = sum(n_theta(ts) for ts in term_sizes) + 1
    if start.numel() != p + n_tau:
        raise DataError(f"start has length {start.numel()}, expecting {p + n_tau} "
                        f"({p} fixed effects, then {n_tau} variance components with the residual last)")
    if not bool(torch.isfinite(start).all()):
        bad = torch.nonzero(~torch.isfinite(start)).flatten().tolist()
        raise DataError(f"start has non-finite values at position(s) {bad} (0-based; {p} fixed effects, then "
                        "the variance components with the residual last)")
    sigma2 = start[-1]
    if not bool(sigma2 > 0):
        raise DataError("start: the residual variance (last entry) must be positive")
    out, pos = [], p
    for ts in term_sizes:
        k = n_theta(ts)
        out.append(theta_from_tau(start[pos:pos + k], ts, scale=sigma2))
        pos += k
    return torch.cat(out)


def _variance_components(psi, hess, scores, thetas, on_boundary, term_sizes, p, small_sample):
    r"""Variance components and their sandwich covariance, level by level (MATH.md 7.3).

    For level :math:`l`: :math:`V_{\psi_l} = \mathcal H_l^{-1}J_l\mathcal H_l^{-1}` over
    :math:`\psi_l = (\theta_l, \sigma)` (boundary entries of :math:`\theta_l` held at 0), then
    :math:`V_{\tau_l} = D_l V_{\psi_l} D_l^\top` with :math:`D_l = \partial\tau_l/\partial\psi_l`. The level-2
    block also carries :math:`\sigma^2`; blocks of different levels are uncorrelated.

    Returns
    -------
    tau : ``(n_tau,)`` (levels in order, residual last); tau_cov : ``(n_tau, n_tau)``.
    """
    n_psi = psi.numel()
    taus, covs = [], []
    offset = p
    for l, ts in enumerate(term_sizes):
        k = n_theta(ts)
        free = torch.nonzero(~on_boundary[l].cpu()).reshape(-1)
        idx = torch.cat([offset + free, torch.tensor([n_psi - 1])])
        v_psi = sandwich(hess[idx][:, idx], scores[:, idx], small_sample, f"variance terms of level {l + 2}")

        def tau_fn(sub, l=l, ts=ts, free=free):
            th = thetas[l].index_put((free.to(thetas[l].device),), sub[:-1])
            s2 = sub[-1] ** 2
            tau_l = tau_from_lambda(lambda_from_theta(th, ts), ts, s2)
            return torch.cat([tau_l, s2.reshape(1)]) if l == 0 else tau_l

        sub = psi[idx]
        d = _tau_jacobian(thetas[l], ts, free, sub[-1], residual=l == 0)
        taus.append(tau_fn(sub).detach())
        covs.append(d @ v_psi @ d.transpose(0, 1))
        offset += k
    # level 2 carries the residual as its last entry: move it to the end
    sizes = [t.numel() for t in taus]
    n_tau = sum(sizes)
    positions = [list(range(sizes[0] - 1)) + [n_tau - 1]]
    start = sizes[0] - 1
    for m in sizes[1:]:
        positions.append(list(range(start, start + m)))
        start += m
    tau = torch.empty(n_tau, dtype=psi.dtype, device=psi.device)
    tau_cov = torch.zeros(n_tau, n_tau, dtype=psi.dtype, device=psi.device)
    for pos, t, c in zip(positions, taus, covs):
        pos = torch.tensor(pos, device=psi.device)
        tau[pos] = t
        tau_cov[pos[:, None], pos[None, :]] = c
    return tau, blank_zero_variances(tau, tau_cov, term_sizes)


def _tau_jacobian(theta, term_sizes, free, sigma, residual: bool) -> torch.Tensor:
    r"""Jacobian of :math:`\tau_l = \operatorname{free}(\sigma^2\Lambda\Lambda^\top)` (then :math:`\sigma^2` when
    ``residual``) over :math:`(\theta_{\text{free}}, \sigma)`, in closed form: for the entry :math:`(a, b)` of
    :math:`\Lambda`, :math:`\partial(\Lambda\Lambda^\top)_{rc} = \delta_{ra}\Lambda_{cb} + \Lambda_{rb}\delta_{ca}`;
    :math:`\partial_\sigma\tau = 2\sigma\operatorname{free}(\Lambda\Lambda^\top)`,
    :math:`\partial_\sigma\sigma^2 = 2\sigma`.
    Shape ``(n_tau_l [+ 1], n_free + 1)``."""
    lam = lambda_from_theta(theta.detach(), term_sizes).tolist()
    q = len(lam)
    s = float(sigma)
    rows, cols = tau_index(term_sizes)
    t_rows, t_cols = (v.tolist() for v in theta_index(term_sizes))
    sig = [[sum(lam[r][k] * lam[c][k] for k in range(q)) for c in range(q)] for r in range(q)]
    out = []
    for r, c in zip(rows, cols):
        row = [s * s * ((lam[c][t_cols[t]] if r == t_rows[t] else 0.0) + (lam[r][t_cols[t]] if c == t_rows[t] else 0.0))
               for t in free.tolist()]
        out.append(row + [2.0 * s * sig[r][c]])
    if residual:
        out.append([0.0] * len(free) + [2.0 * s])
    return torch.tensor(out, dtype=theta.dtype).to(theta.device)


def fit_gaussian(tensors: ModelTensors, *, start=None, max_iter: int = 200, tol: float = 1e-8,
                 small_sample: str = "G/(G-1)", progress: bool = True) -> FitOutput:
    """Fit the weighted linear mixed model by profiled maximum likelihood.

    Parameters
    ----------
    tensors : the model (any number of levels).
    start : optional ``(p + n_tau,)`` vector (beta, variance components, residual last);
        only the variance components are used (beta and sigma are profiled).
    max_iter : iteration budget of the optimiser over :math:`\\theta`: L-BFGS iterations plus Newton
        polish steps (:func:`~torchmix.fit.optimize.minimize`); when it is used up before the
        gradient test passes, the fit is returned with ``converged=False`` and a
        ``ConvergenceWarning``.
    tol : gradient tolerance on the normalised objective :math:`-\\ell_p/N_w`.
    small_sample : ``"G/(G-1)"`` or ``"none"`` (factor of the sandwich meat).
    progress : show a progress bar.

    The fit is made on standardised columns (:mod:`torchmix.fit.standardize`) and carried back, so
    that it does not depend on the units of the predictors.

    Returns
    -------
    :class:`~torchmix.tensors.FitOutput`
    """
    lik = None
    if len(tensors.levels) == 1 and tensors.levels[0].q <= gaussian_profiled.MAX_Q:
        # two levels: the column scales from the crossproducts, which are then rescaled (no extra pass)
        raw = GaussianLikelihood(tensors)
        std = _standardizer_from_crossproducts(raw)
        std_tensors = std.tensors(tensors)
        lik = raw.rescaled(std_tensors, torch.cat(std.sz + [std.sx]))
    else:
        std = Standardizer.from_tensors(tensors)
        std_tensors = std.tensors(tensors)
    # after the crossproducts a two-level fit is small per-group work: threads chosen for its size
    # (:mod:`~torchmix.threads`; inside a fit that already chose, e.g. ``mix``, this changes nothing)
    n_threads = None if lik is None else choose_threads(
        problem_work(tensors.levels[0].n_groups, tensors.n_fixed, tensors.levels[0].q))
    with fit_threads(n_threads):
        out = _fit_standardized(std_tensors, std.start(start, residual=True), max_iter, tol, small_sample,
                                progress, lik)
    return std.output(out, gaussian=True)


def _standardizer_from_crossproducts(lik: GaussianLikelihood) -> Standardizer:
    r"""The :class:`~torchmix.fit.standardize.Standardizer` of a two-level model from its crossproducts:
    :math:`\sum_i w^{(1)}_i x_{ir}^2 = \sum_j w_j (C_j)_{rr}` (conditional weights inside :math:`C_j`, group
    weights outside), so :math:`s_r` is the root of that over :math:`N_w` (1 for an all-zero column), as
    :func:`~torchmix.fit.standardize.column_rms` computes it from the rows."""
    w = lik.tensors.levels[0].w_uncond
    p = lik.p

    def rms(sums):
        out = torch.sqrt(sums / lik.n_w)
        return torch.where(out > 0, out, torch.ones_like(out))

    sz = rms(w @ torch.diagonal(lik.c_oo, dim1=1, dim2=2))
    sx = rms(torch.diagonal(lik.rr_const)[:p])
    return Standardizer(sx=sx, sz=[sz], term_sizes=[tuple(lik.tensors.levels[0].term_sizes)])


def _fit_standardized(tensors: ModelTensors, start, max_iter: int, tol: float, small_sample: str,
                      progress: bool, lik: GaussianLikelihood | None = None) -> FitOutput:
    if lik is None:
        lik = GaussianLikelihood(tensors)
    p = tensors.n_fixed
    term_sizes = [lv.term_sizes for lv in tensors.levels]
    sizes = [n_theta(ts) for ts in term_sizes]
    n_w = lik.n_w

    if closed_form.supported(lik):  # two levels: gradient in closed form, no autograd graph
        def objective(flat):
            return -closed_form.profiled(lik, [flat]) / n_w
    else:
        def objective(flat):
            return -lik(_split(flat, sizes)) / n_w

    theta0 = _start_theta(tensors, start, p)
    newton = gaussian_profiled.applies(lik)
    if newton and start is None:  # two levels: moment estimates from the crossproducts
        moment = moment_theta(lik)
        theta0 = theta0 if moment is None else moment
    passes_at_start = start_passes(objective, theta0, tol)
    state = None
    desc = "fit (Newton steps)" if newton else "fit (L-BFGS rounds)"
    with progress_bar(desc=desc, unit="step" if newton else "round", disable=not progress) as bar:
        try:
            if newton:  # two levels: Newton with the exact Hessian first
                res, state, stalled = _newton_fit(lik, theta0, max_iter, tol, bar)
                if stalled and res.iterations < max_iter:  # hand over to L-BFGS from where Newton stopped
                    more = minimize(objective, res.x, max_iter=max_iter - res.iterations, tol=tol, progress=bar)
                    res = replace(more, iterations=more.iterations + res.iterations)
                    state = None
            else:
                res = minimize(objective, theta0, max_iter=max_iter, tol=tol, progress=bar,
                               newton_first=start is not None)
        except IndexError as exc:  # torch's strong-Wolfe line search on a non-finite objective
            raise line_search_error() from exc
    res = conclude(res, passes_at_start, tol, default_start=start is None)
    return _finish(lik, res.x, res, small_sample, state=state)


def line_search_error() -> NumericalError:
    """The error of a line search that met a non-finite log-likelihood."""
    return NumericalError("the line search failed on a non-finite log-likelihood; check the response for "
                          "a perfect fit or extreme values")


def conclude(res, passes_at_start: bool, tol: float, default_start: bool):
    """The optimiser's result after the checks every gaussian fit makes: a non-finite log-likelihood
    at the solution is a :class:`NumericalError`; a start that already passed the convergence test,
    and a fit that did not converge, are announced."""
    if not math.isfinite(float(res.fun)):
        raise NumericalError("the log-likelihood is not finite at the solution; check the response "
                             "for a perfect fit or extreme values")
    if passes_at_start:
        return warn_start_passes(res, tol, default_start=default_start)
    if not res.converged:
        warn(f"the optimiser did not converge: {res.message}", ConvergenceWarning)
    return res


def _newton_fit(lik: GaussianLikelihood, theta0: torch.Tensor, max_iter: int, tol: float, bar):
    r"""Newton's method on :math:`-\ell_p(\theta)/N_w` with the closed-form gradient and Hessian
    (:mod:`~torchmix.likelihood.gaussian_profiled`); returns :func:`~torchmix.fit.newton.newton_minimize`'s
    result, the evaluator and its state at the returned point, and whether it stalled."""
    ev = gaussian_profiled.ProfiledTwoLevel(lik)
    n_w = lik.n_w

    def fgh(theta):
        st = ev(theta)
        return -st.value / n_w, -st.grad / n_w, -st.hess / n_w, st

    ts = lik.term_sizes[0]
    res, st, stalled = newton_minimize(fgh, theta0, max_iter=max_iter, tol=tol, progress=bar,
                                       canonical=lambda t: normalise_theta_signs(t, ts))
    return res, (ev, st), stalled


def _standard_error_pieces(lik: GaussianLikelihood, beta, thetas, sigma, sizes):
    r"""Per-top-group scores ``(G_L, n_psi)`` over :math:`\psi = (\beta, \theta, \sigma)` and the
    Hessian blocks the sandwiches use (7.2, 7.3): :math:`\beta\beta` in closed form
    (:math:`-K_{\beta\beta}/\sigma^2`) and :math:`(\theta, \sigma)` by reverse-mode autodiff at fixed
    :math:`\beta`; the :math:`\beta`-:math:`(\theta,\sigma)` cross block is not used (left 0).
    Written without data-dependent branches so that it can be ``vmap``-ed over responses.
    """
    p = beta.shape[-1]
    psi = torch.cat([beta] + list(thetas) + [sigma.reshape(1)])
    if closed_form.supported(lik):  # two levels: scores and Hessian in closed form
        return (psi,) + closed_form.standard_error_pieces(lik, beta, thetas[0], sigma)

    def ell_k(vec):
        return lik.loglik_by_group(vec[:p], _split(vec[p:-1], sizes), vec[-1])

    scores = jacobian(ell_k, psi)
    k_bb = lik.k_top(lik.integrate(thetas))[:p, :p]
    hess_vc = hessian(lambda v: lik.loglik(beta, _split(v[:-1], sizes), v[-1]), psi[p:])
    return psi, scores, k_bb, hess_vc


def _finish(lik: GaussianLikelihood, theta_flat: torch.Tensor, res, small_sample: str, pieces=None,
            state=None) -> FitOutput:
    """Estimates, modes and sandwich covariances at the optimum ``theta_flat``.

    ``pieces`` (from :func:`_standard_error_pieces`, computed in a batch) is used when given and
    no variance is on the boundary. ``state`` (two levels: the evaluator of
    :mod:`~torchmix.likelihood.gaussian_profiled` and its evaluation at ``theta_flat``) gives the
    estimates, the modes and, off the boundary, the pieces without another pass.
    """
    tensors = lik.tensors
    term_sizes = [lv.term_sizes for lv in tensors.levels]
    sizes = [n_theta(ts) for ts in term_sizes]
    thetas = [normalise_theta_signs(t, ts) for t, ts in zip(_split(theta_flat, sizes), term_sizes)]
    if state is not None:
        ev, st = state
        if not torch.equal(st.theta, thetas[0]):
            st = ev(thetas[0])
        ell, beta, sigma2, us = st.value, st.beta, st.sigma2, [-st.m.transpose(0, 1)]
        if pieces is None:
            psi = torch.cat([beta, thetas[0], sigma2.sqrt().reshape(1)])
            pieces = (psi,) + ev.standard_error_pieces(st)
    else:
        with torch.no_grad():
            ell, beta, sigma2, kt, ps = lik.profile(thetas)
            us = lik.modes(thetas, beta, ps)
    sigma = sigma2.sqrt()
    bs = [u @ lambda_from_theta(t, ts).transpose(0, 1) for u, t, ts in zip(us, thetas, term_sizes)]

    thetas, on_boundary = boundary_thetas(thetas, term_sizes)

    # ---------------------------------------------------------------- standard errors
    if pieces is None or any(bool(m.any()) for m in on_boundary):
        pieces = _standard_error_pieces(lik, beta, thetas, sigma, sizes)
    return assemble_output(res, pieces, beta, sigma2, float(ell), thetas, on_boundary, term_sizes, us, bs,
                           small_sample)


def boundary_thetas(thetas: list, term_sizes: list) -> tuple[list, list]:
    """Diagonal :math:`\\theta` entries below ``BOUNDARY_TOL`` (a variance at zero): announced with a
    ``BoundaryWarning`` and set to zero. Returns ``(thetas, on_boundary masks)``."""
    on_boundary = [diagonal_theta_mask(ts).to(t.device) & (t.abs() < BOUNDARY_TOL) for t, ts in zip(thetas, term_sizes)]
    if any(bool(m.any()) for m in on_boundary):
        warn(boundary_warning_text(thetas, term_sizes, BOUNDARY_TOL), BoundaryWarning)
        thetas = [torch.where(m, torch.zeros_like(t), t) for t, m in zip(thetas, on_boundary)]
    return thetas, on_boundary


def assemble_output(res, pieces, beta, sigma2, lnl: float, thetas, on_boundary, term_sizes, us, bs,
                    small_sample) -> FitOutput:
    r"""The fit's :class:`~torchmix.tensors.FitOutput` from the standard-error pieces at the optimum.

    ``pieces = (psi, scores, K_bb, H_vc)``: :math:`\psi = (\beta, \theta, \sigma)` ``(k,)``, per-top-group
    scores ``(G_L, k)``, :math:`K_{\beta\beta}` ``(p, p)`` and the :math:`(\theta,\sigma)` Hessian. The
    Hessian is block-diagonal, :math:`H_{\beta\beta} = -K_{\beta\beta}/\sigma^2`; the fixed effects get
    the sandwich :math:`H^{-1} M H^{-1}` and the model-based :math:`(-H)^{-1}`; the variance components
    their delta-method covariances (:func:`_variance_components`).
    """
    psi, scores, k_bb, hess_vc = (t.detach() for t in pieces)
    p = beta.numel()
    hess = torch.zeros(psi.numel(), psi.numel(), dtype=psi.dtype, device=psi.device)
    hess[:p, :p] = -k_bb / sigma2
    hess[p:, p:] = hess_vc
    ib = slice(0, p)
    cov_beta = sandwich(hess[ib, ib], scores[:, ib], small_sample, "fixed effects")
    cov_beta_model = safe_inverse_negative_hessian(hess[ib, ib], "fixed effects")
    tau, tau_cov = _variance_components(psi, hess, scores, thetas, on_boundary, term_sizes, p, small_sample)
    return FitOutput(beta=beta.detach(), cov_beta=cov_beta, cov_beta_model=cov_beta_model,
                     theta=[t.detach() for t in thetas], sigma=float(sigma2.sqrt()), tau=tau.detach(),
                     tau_cov=tau_cov, lnl=lnl, u=[u.detach() for u in us], b=[b.detach() for b in bs],
                     converged=res.converged, iterations=res.iterations, message=res.message,
                     scores=scores, extra={"grad_max": res.grad_max, "hessian": hess, "psi": psi.detach()})
