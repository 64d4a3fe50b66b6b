r"""Fit a weighted gaussian mixed model: profiled ML over :math:`\theta`, then sandwich SEs.

MATH.md 4, 6.1-6.3, 6.5, 7.1-7.3. The profiled log-likelihood :math:`\ell_p(\theta)` is minimised
(negated, divided by :math:`N_w`) by L-BFGS with Newton polish; :math:`\hat\beta, \hat\sigma^2` follow
in closed form. Standard errors:

* fixed effects: :math:`V_\beta = \mathcal H_{\beta\beta}^{-1} J_{\beta\beta}\mathcal H_{\beta\beta}^{-1}`
  with :math:`\mathcal H_{\beta\beta} = -K_{\beta\beta}/\hat\sigma^2`;
* variance components, per level :math:`l`: sandwich over :math:`\psi_l = (\theta_l, \sigma)` with the
  other parameters fixed, then the delta method to :math:`\tau_l = \operatorname{free}(\sigma^2\Lambda_l
  \Lambda_l^\top)`; the residual variance from the level-2 block.

Scores are per top-level group, from ``torch.func.jacfwd`` of the vector :math:`(\ell_k)_k` of (4.3);
Hessians from ``torch.func.hessian``.
"""

from __future__ import annotations

import warnings

import torch
from torch.func import hessian, jacfwd
from tqdm.auto import tqdm

from ..covariance import (diagonal_theta_mask, identity_theta, lambda_from_theta, n_theta,
                          normalise_theta_signs, tau_from_lambda, theta_from_tau)
from ..errors import BoundaryWarning, ConvergenceWarning, DataError, NumericalError
from ..inference import safe_inverse_negative_hessian, sandwich
from ..likelihood.gaussian import GaussianLikelihood
from ..tensors import FitOutput, ModelTensors
from .optimize import minimize

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
    sigma2 = start[-1]
    if not bool(sigma2 > 0):
        raise DataError("start: the residual variance (last entry) must be positive")
    out, pos = [], p
    for ts in term_sizes:
        k = n_theta(ts)
        out.append(theta_from_tau(start[pos:pos + k], ts, scale=sigma2))
        pos += k
    return torch.cat(out)


def fit_gaussian(tensors: ModelTensors, *, start=None, max_iter: int = 200, tol: float = 1e-8,
                 small_sample: str = "G/(G-1)", progress: bool = True) -> FitOutput:
    """Fit the weighted linear mixed model by profiled maximum likelihood.

    Parameters
    ----------
    tensors : the model (any number of levels).
    start : optional ``(p + n_tau,)`` vector (beta, variance components, residual last);
        only the variance components are used (beta and sigma are profiled).
    max_iter : L-BFGS iteration budget.
    tol : gradient tolerance on the normalised objective :math:`-\\ell_p/N_w`.
    small_sample : ``"G/(G-1)"`` or ``"none"`` (factor of the sandwich meat).
    progress : show a progress bar.

    Returns
    -------
    :class:`~torchmix.tensors.FitOutput`
    """
    lik = GaussianLikelihood(tensors)
    p = tensors.n_fixed
    term_sizes = [lv.term_sizes for lv in tensors.levels]
    sizes = [n_theta(ts) for ts in term_sizes]
    n_w = lik.n_w

    def objective(flat):
        return -lik(_split(flat, sizes)) / n_w

    theta0 = _start_theta(tensors, start, p)
    with tqdm(total=None, desc="fit", unit="round", disable=not progress, leave=False) as bar:
        res = minimize(objective, theta0, max_iter=max_iter, tol=tol, progress=bar)
    if not bool(torch.isfinite(torch.tensor(res.fun))):
        raise NumericalError("the log-likelihood is not finite at the solution; check the response "
                             "for a perfect fit or extreme values")
    if not res.converged:
        warnings.warn(f"the optimiser did not converge: {res.message}", ConvergenceWarning, stacklevel=3)

    thetas = [normalise_theta_signs(t, ts) for t, ts in zip(_split(res.x, sizes), term_sizes)]
    with torch.no_grad():
        ell, beta, sigma2, kt, ps = lik.profile(thetas)
        us = lik.modes(thetas, beta, ps)
    sigma = sigma2.sqrt()
    bs = [u @ lambda_from_theta(t, ts).transpose(0, 1) for u, t, ts in zip(us, thetas, term_sizes)]

    # boundary: a diagonal theta at (numerically) zero
    on_boundary = [diagonal_theta_mask(ts).to(t.device) & (t.abs() < BOUNDARY_TOL) for t, ts in zip(thetas, term_sizes)]
    if any(bool(m.any()) for m in on_boundary):
        warnings.warn("a variance component is estimated at zero (on the boundary of the parameter space); "
                      "its standard error is reported as NaN", BoundaryWarning, stacklevel=3)
        thetas = [torch.where(m, torch.zeros_like(t), t) for t, m in zip(thetas, on_boundary)]

    # ---------------------------------------------------------------- standard errors
    psi = torch.cat([beta] + thetas + [sigma.reshape(1)])
    n_psi = psi.numel()

    def ell_k(vec):
        th = _split(vec[p:-1], sizes)
        return lik.loglik_by_group(vec[:p], th, vec[-1])

    scores = jacfwd(ell_k)(psi).detach()           # (G_L, n_psi)
    hess = hessian(lambda v: ell_k(v).sum())(psi).detach()
    ib = slice(0, p)
    cov_beta = sandwich(hess[ib, ib], scores[:, ib], small_sample, "fixed effects")
    cov_beta_model = safe_inverse_negative_hessian(hess[ib, ib], "fixed effects")

    taus, tau_covs = [], []
    offset = p
    for l, (ts, k) in enumerate(zip(term_sizes, sizes)):
        theta_idx = torch.arange(offset, offset + k)
        free = ~on_boundary[l].cpu()
        idx = torch.cat([theta_idx[free], torch.tensor([n_psi - 1])])
        v_psi = sandwich(hess[idx][:, idx], scores[:, idx], small_sample, f"variance terms of level {l + 2}")

        def tau_fn(sub, l=l, ts=ts, free=free, k=k, theta_idx=theta_idx):
            free_idx = torch.nonzero(free).reshape(-1).to(thetas[l].device)
            th = thetas[l].index_put((free_idx,), sub[:-1])
            s2 = sub[-1] ** 2
            tau_l = tau_from_lambda(lambda_from_theta(th, ts), ts, s2)
            return torch.cat([tau_l, s2.reshape(1)]) if l == 0 else tau_l

        sub = psi[idx]
        d = jacfwd(tau_fn)(sub).detach()
        v_tau = d @ v_psi @ d.transpose(0, 1)
        tau_val = tau_fn(sub).detach()
        taus.append(tau_val)
        tau_covs.append(v_tau)
        offset += k
    # put the residual (computed with level 2) last
    resid = taus[0][-1:]
    n0 = taus[0].numel() - 1
    order = list(range(n0)) + [sum(t.numel() for t in taus) - 1]
    tau = torch.cat([taus[0][:-1]] + taus[1:] + [resid])
    n_tau = tau.numel()
    tau_cov = torch.zeros(n_tau, n_tau, dtype=tau.dtype, device=tau.device)
    # level 2 block (with the residual)
    lvl0_pos = torch.tensor(order)
    tau_cov[lvl0_pos[:, None], lvl0_pos[None, :]] = tau_covs[0]
    pos = n0
    for tc in tau_covs[1:]:
        m = tc.shape[0]
        tau_cov[pos:pos + m, pos:pos + m] = tc
        pos += m
    # boundary variances: SE NaN
    tau_pos = 0
    for l, ts in enumerate(term_sizes):
        diag_of_term = []
        from ..covariance import tau_index
        rows, cols = tau_index(ts)
        lam = lambda_from_theta(thetas[l], ts)
        for j, (r, c) in enumerate(zip(rows, cols)):
            if r == c and float(lam[r].abs().max()) == 0.0:
                tau_cov[tau_pos + j, :] = float("nan")
                tau_cov[:, tau_pos + j] = float("nan")
        tau_pos += len(rows)

    return FitOutput(beta=beta.detach(), cov_beta=cov_beta, cov_beta_model=cov_beta_model,
                     theta=[t.detach() for t in thetas], sigma=float(sigma), tau=tau.detach(), tau_cov=tau_cov,
                     lnl=float(ell), u=[u.detach() for u in us], b=[b.detach() for b in bs],
                     converged=res.converged, iterations=res.iterations, message=res.message,
                     scores=scores, extra={"grad_max": res.grad_max, "hessian": hess, "psi": psi.detach()})
