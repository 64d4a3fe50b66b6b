"""Newton's method on the two-level profiled log-likelihood: exact Hessian, moment start, same fits."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch.func import hessian

import torchmix as tm
from torchmix.api import _prepare
from torchmix.covariance import n_theta
from torchmix.fit import gaussian as fit_module
from torchmix.fit.gaussian import _standardizer_from_crossproducts, fit_gaussian
from torchmix.fit.gaussian_start import moment_theta
from torchmix.fit.newton import newton_minimize
from torchmix.fit.standardize import Standardizer
from torchmix.likelihood import gaussian_grad as closed_form
from torchmix.likelihood import gaussian_profiled
from torchmix.likelihood.gaussian import GaussianLikelihood


def _data(n_groups=60, seed=4, sizes=(3, 9)):
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(n_groups), rng.integers(sizes[0], sizes[1], n_groups))
    n = len(g)
    x = rng.normal(size=(n, 3))
    y = 1 + x @ np.array([0.5, -0.3, 0.2]) + rng.normal(size=n_groups)[g] + 0.4 * rng.normal(size=n_groups)[g] * x[:, 0]
    y += rng.normal(0, 1.5, n)
    w2 = rng.uniform(1, 3, n_groups)
    return pd.DataFrame({"y": 100 * y, "x1": x[:, 0], "x2": 10 * x[:, 1], "x3": x[:, 2], "g": g,
                         "w1": w2[g] * rng.uniform(1, 2, n), "w2": w2[g]})


RES = ["(1 | g)", "(1 + x1 | g)", "(1 | g) + (0 + x1 | g)", "(1 + x1 + x2 | g)", "(1 + x1 + x2 + x3 | g)"]


@pytest.mark.parametrize("re", RES)
def test_profiled_value_gradient_hessian_equal_autograd(re):
    t = _prepare(f"y ~ x1 + x2 + x3 + {re}", _data(), ["w1", "w2"], progress=False).design.tensors
    lik = GaussianLikelihood(t)
    assert gaussian_profiled.applies(lik)
    ev = gaussian_profiled.ProfiledTwoLevel(lik)
    k = n_theta(t.levels[0].term_sizes)
    theta = torch.linspace(0.4, 1.2, k, dtype=torch.float64) * torch.tensor([(-1) ** i for i in range(k)],
                                                                               dtype=torch.float64)
    st = ev(theta)
    x = theta.clone().requires_grad_(True)
    (grad_ad,) = torch.autograd.grad(lik([x]), x)
    hess_ad = hessian(lambda v: lik([v]))(theta)
    np.testing.assert_allclose(float(st.value), float(lik([theta])), rtol=1e-13)
    np.testing.assert_allclose(st.grad.numpy(), grad_ad.numpy(), rtol=1e-10, atol=1e-11 * float(grad_ad.abs().max()))
    np.testing.assert_allclose(st.hess.numpy(), hess_ad.numpy(), rtol=1e-9, atol=1e-10 * float(hess_ad.abs().max()))
    # the value-and-gradient evaluation gives the same numbers
    light = ev(theta, hessian=False)
    assert light.hess is None and torch.equal(light.grad, st.grad)
    # estimates, modes and standard-error pieces equal the general closed forms at (beta-hat, sigma-hat)
    ell, beta, sigma2, _, ps = lik.profile([theta])
    torch.testing.assert_close(st.beta, beta, rtol=1e-11, atol=1e-11 * float(beta.abs().max()))
    torch.testing.assert_close(st.sigma2, sigma2, rtol=1e-12, atol=0.0)
    modes = lik.modes([theta], beta, ps)[0]
    torch.testing.assert_close(-st.m.transpose(0, 1), modes, rtol=1e-10, atol=1e-12 * float(modes.abs().max()))
    new = ev.standard_error_pieces(st)
    old = closed_form.standard_error_pieces(lik, st.beta, theta, st.sigma2.sqrt())
    for a, b in zip(new, old):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-11 * float(b.abs().max()))


def test_crossproduct_scales_and_rescaled_blocks_equal_the_standardised_model():
    t = _prepare("y ~ x1 + x2 + x3 + (1 + x1 | g)", _data(), ["w1", "w2"], progress=False).design.tensors
    raw = GaussianLikelihood(t)
    std = _standardizer_from_crossproducts(raw)
    ref = Standardizer.from_tensors(t)
    torch.testing.assert_close(std.sx, ref.sx, rtol=1e-13, atol=0.0)
    torch.testing.assert_close(std.sz[0], ref.sz[0], rtol=1e-13, atol=0.0)
    st = std.tensors(t)
    lik = raw.rescaled(st, torch.cat(std.sz + [std.sx]))
    direct = GaussianLikelihood(st)
    for name in ("c_oo", "c_or", "c_rr", "rr_const", "n_w_top", "n_w2"):
        a, b = getattr(lik, name), getattr(direct, name)
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13 * float(b.abs().max()))
    assert lik.n_w == direct.n_w and torch.equal(lik.counts2, direct.counts2)


def _old_path(monkeypatch):
    monkeypatch.setattr(gaussian_profiled, "MAX_Q", 0)


@pytest.mark.parametrize("re", ["(1 | g)", "(1 + x1 | g)", pytest.param("(1 + x1 + x2 | g)", marks=pytest.mark.slow)])
def test_newton_fit_equals_the_lbfgs_fit(re, monkeypatch):
    t = _prepare(f"y ~ x1 + x2 + x3 + {re}", _data(), ["w1", "w2"], progress=False).design.tensors
    new = fit_gaussian(t, progress=False)
    assert new.converged and new.extra["grad_max"] < 1e-12
    with monkeypatch.context() as mp:
        _old_path(mp)
        old = fit_gaussian(t, progress=False)
    assert old.converged
    np.testing.assert_allclose(new.lnl, old.lnl, rtol=1e-13)
    for a, b in [(new.beta, old.beta), (new.tau, old.tau), (new.cov_beta, old.cov_beta), (new.tau_cov, old.tau_cov),
                 (new.u[0], old.u[0]), (new.scores, old.scores)]:
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=2e-6, atol=2e-7 * float(b.abs().max()))


def test_moment_start_of_a_balanced_unweighted_design_is_the_optimum():
    # balanced, unweighted, the same Z in every group: the moment estimates are the ML estimates
    sleep = tm.load_dataset("sleepstudy")
    res = tm.mix("Reaction ~ Days + (1 + Days | Subject)", sleep, progress=False)
    assert res.converged and res.iterations == 0
    np.testing.assert_allclose(res.lnl, -875.9697, atol=5e-4)  # lme4 logLik(REML = FALSE)


def test_moment_start_is_close_on_weighted_unbalanced_data():
    t = _prepare("y ~ x1 + x2 + x3 + (1 + x1 | g)", _data(n_groups=400, sizes=(5, 30)), ["w1", "w2"],
                 progress=False).design.tensors
    std = Standardizer.from_tensors(t)
    lik = GaussianLikelihood(std.tensors(t))
    start = moment_theta(lik)
    fit = fit_gaussian(t, progress=False)
    optimum = torch.cat(fit.theta) * std.theta_factor()
    assert fit.converged and fit.iterations <= 5
    assert float((start - optimum).abs().max()) < 0.2 * float(optimum.abs().max())


def test_newton_minimize_leaves_indefinite_regions_and_reports_budget():
    def rosen(x):
        a, b = x[0], x[1]
        val = (1 - a) ** 2 + 100 * (b - a * a) ** 2
        g = torch.stack([-2 * (1 - a) - 400 * a * (b - a * a), 200 * (b - a * a)])
        h = torch.stack([torch.stack([2 - 400 * (b - 3 * a * a), -400 * a]), torch.stack([-400 * a, torch.tensor(200.0,
                        dtype=x.dtype)])])
        return val, g, h, None

    x0 = torch.tensor([-1.2, 1.0], dtype=torch.float64)
    res, _, stalled = newton_minimize(rosen, x0, tol=1e-8)
    assert res.converged and not stalled
    np.testing.assert_allclose(res.x.numpy(), [1.0, 1.0], atol=1e-10)
    short, _, _ = newton_minimize(rosen, x0, tol=1e-8, max_iter=2)
    assert not short.converged and short.iterations == 2 and "max_iter=2" in short.message


@pytest.mark.slow
def test_fallback_to_lbfgs_when_newton_stalls(monkeypatch):
    t = _prepare("y ~ x1 + x2 + x3 + (1 + x1 | g)", _data(), ["w1", "w2"], progress=False).design.tensors
    ref = fit_gaussian(t, progress=False)

    def stalled_newton(lik, theta0, max_iter, tol, bar):  # no step accepted at all
        from torchmix.fit.optimize import MinimizeResult
        res = MinimizeResult(x=theta0, fun=float("nan"), grad_max=float("nan"), converged=False, iterations=0,
                             message="stalled")
        return res, None, True

    monkeypatch.setattr(fit_module, "_newton_fit", stalled_newton)
    out = fit_gaussian(t, progress=False)
    assert out.converged
    np.testing.assert_allclose(out.beta.numpy(), ref.beta.numpy(), rtol=1e-7)
    np.testing.assert_allclose(out.tau.numpy(), ref.tau.numpy(), rtol=1e-6)


def test_single_precision_stops_when_the_precision_is_exhausted():
    # tol=1e-8 is out of float32's reach: the fit ends with a warning instead of using up max_iter
    sleep = tm.load_dataset("sleepstudy")
    with pytest.warns(tm.ConvergenceWarning, match="gradient test failed"):
        res = tm.mix("Reaction ~ Days + (1 + Days | Subject)", sleep, dtype="float32", progress=False)
    assert not res.converged and res.iterations < 100
    np.testing.assert_allclose(res.lnl, -875.9697, rtol=1e-5)
