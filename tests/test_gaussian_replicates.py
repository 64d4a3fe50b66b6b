"""Batched replicate refits of two-level gaussian models equal one-by-one refits."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import torch

import torchmix as tm
from torchmix.fit.gaussian_replicates import GaussianReplicateFit, ReplicateLikelihood
from torchmix.fit.replicates import gaussian_estimates, refit_replicates, scale_top_weights
from torchmix.likelihood.gaussian import GaussianLikelihood
from torchmix.threads import fit_threads

from conftest import sleepstudy_weighted

F1 = "Reaction ~ Days + (1 | Subject)"
F2 = "Reaction ~ Days + (1 + Days | Subject)"


@pytest.fixture(autouse=True)
def _one_thread():
    """Small problems: one intra-op thread, as ``mix`` chooses for them."""
    with fit_threads(1):
        yield


def _fit(formula, df, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tm.mix(formula, df, weights=["w1", "w2"], progress=False, **kw)


def _one_by_one(tensors, factors, start, **kw):
    def fit(t, s):
        return gaussian_estimates(t, s, **kw)

    return refit_replicates(tensors, factors, fit, start)


def _factors(n_groups, seed=1):
    """Random factors, one replicate with all factors 1, JK1 delete-one replicates and a Fay-like one."""
    rng = np.random.default_rng(seed)
    jk1 = np.full((3, n_groups), n_groups / (n_groups - 1))
    for r, g in enumerate((0, 5, n_groups - 1)):
        jk1[r, g] = 0.0
    fay = 1.0 + 0.5 * rng.choice([-1.0, 1.0], size=(1, n_groups))
    rows = [np.ones((1, n_groups)), rng.uniform(0.3, 1.8, (4, n_groups)), jk1, fay]
    return torch.as_tensor(np.concatenate(rows))


class _Counter:
    n = 0

    def update(self, k):
        self.n += k


@pytest.mark.parametrize("formula", [F1, F2])
def test_batched_equals_one_by_one(formula):
    res = _fit(formula, sleepstudy_weighted())
    t = res.design.tensors
    fac = _factors(t.levels[0].n_groups)
    start = torch.cat(res._out.theta)
    bar = _Counter()
    est, n_failed = refit_replicates(t, fac, GaussianReplicateFit(), start, progress=bar)
    ref, ref_failed = _one_by_one(t, fac, start)
    assert n_failed == ref_failed == 0 and bar.n == fac.shape[0]
    np.testing.assert_allclose(est.numpy(), ref.numpy(), rtol=1e-8, atol=0)
    # the all-ones replicate is the full-sample fit
    full = np.concatenate([res.coef, res.varcomp])
    np.testing.assert_allclose(est[0].numpy(), full, rtol=1e-8)


@pytest.mark.parametrize("formula", [F1, F2])
def test_objective_and_derivatives_equal_the_likelihood_with_scaled_weights(formula):
    res = _fit(formula, sleepstudy_weighted())
    t = res.design.tensors
    fac = _factors(t.levels[0].n_groups, seed=4)
    lik = ReplicateLikelihood(t, fac)
    theta = torch.cat(res._out.theta).expand(fac.shape[0], -1) * torch.linspace(0.7, 1.3, fac.shape[0])[:, None]
    val, grad, hess = lik.value_and_grad(theta, torch.arange(fac.shape[0]), order=2)
    assert (hess is None) == (formula == F2)
    for r in range(fac.shape[0]):
        one = GaussianLikelihood(scale_top_weights(t, fac[r]))

        def f(x):
            return -one([x]) / one.n_w

        x = theta[r].clone().requires_grad_(True)
        (g,) = torch.autograd.grad(f(x), x)
        assert float(val[r]) == pytest.approx(float(f(theta[r])), rel=1e-12)
        np.testing.assert_allclose(grad[r].numpy(), g.numpy(), rtol=1e-8, atol=1e-12)
        if hess is not None:
            h = torch.autograd.functional.hessian(f, theta[r].clone())
            np.testing.assert_allclose(hess[r].numpy(), h.numpy(), rtol=1e-7)


def test_offset_and_three_replicates_of_a_jk1_through_mix():
    """JK1 through ``mix``: each replicate equals a separate fit without that group, the others x G/(G-1)."""
    df = sleepstudy_weighted()
    df["off"] = 0.1 * df["Days"] ** 2
    subj = sorted(df["Subject"].unique(), key=str)
    g = len(subj)
    cols = [f"rw{r}" for r in range(g)]
    for c, s in zip(cols, subj):
        df[c] = df["w2"] * np.where(df["Subject"] == s, 0.0, g / (g - 1))
    res = _fit(F1, df, offset="off", replicate_weights={"w2": cols}, replicate_method="JK1")
    est = res.variance["replicate_estimates"].numpy()
    for r in (0, 9):
        d = df[df["Subject"] != subj[r]].copy()
        d["w1"] *= g / (g - 1)
        d["w2"] *= g / (g - 1)
        sep = _fit(F1, d, offset="off")
        np.testing.assert_allclose(est[r], np.concatenate([sep.coef, sep.varcomp]), rtol=1e-8)


def _weak_groups(seed=1, n_groups=30, n_per=6, sd=0.1):
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(n_groups), n_per)
    x = rng.normal(size=g.size)
    y = 1 + 0.5 * x + rng.normal(scale=sd, size=n_groups)[g] + rng.normal(size=g.size)
    w2 = rng.uniform(1, 3, n_groups)[g]
    return pd.DataFrame({"y": y, "x": x, "g": [f"s{i:02d}" for i in g], "w1": w2 * rng.uniform(1, 2, g.size),
                         "w2": w2}), rng


@pytest.mark.parametrize("sd", [0.1, 0.02])
def test_replicates_on_the_boundary(sd):
    """A small group variance: some replicates end at theta = 0 (variance exactly 0), as one by one;
    a still smaller one puts the full sample on the boundary, and every replicate with it."""
    df, rng = _weak_groups(sd=sd)
    res = _fit("y ~ x + (1 | g)", df)
    assert (float(res._out.theta[0]) > 0.05) == (sd == 0.1)
    t = res.design.tensors
    fac = torch.as_tensor(rng.choice([0.5, 1.5], size=(40, 30)))
    start = torch.cat(res._out.theta)
    est, n_failed = refit_replicates(t, fac, GaussianReplicateFit(), start)
    ref, _ = _one_by_one(t, fac, start)
    zero = est[:, 2] == 0
    assert n_failed == 0 and (0 < int(zero.sum()) < 40 if sd == 0.1 else bool(zero.all()))
    assert bool((ref[zero, 2] == 0).all())
    np.testing.assert_allclose(est.numpy(), ref.numpy(), rtol=1e-8, atol=1e-14)


def test_replicates_that_do_not_converge_are_counted_and_announced():
    res = _fit(F2, sleepstudy_weighted())
    t = res.design.tensors
    fac = torch.as_tensor(np.random.default_rng(0).choice([0.0, 2.0], size=(6, 18)))
    start = torch.cat(res._out.theta)
    bar = _Counter()
    est, n_failed = refit_replicates(t, fac, GaussianReplicateFit(max_iter=2), start, progress=bar)
    ref, ref_failed = _one_by_one(t, fac, start, max_iter=2)
    assert n_failed == ref_failed == 6 and bar.n == 6
    np.testing.assert_allclose(est.numpy(), ref.numpy(), rtol=1e-12)
    df = sleepstudy_weighted()
    cols = []
    for r in range(4):
        df[f"r{r}"] = df["w1"] * np.where(df["Subject"].astype(int) % 4 == r, 2.0, 0.0)
        cols.append(f"r{r}")
    with pytest.warns(tm.ConvergenceWarning, match="4 of 4 replicate fits did not converge"):
        tm.mix(F2, df, weights=["w1", "w2"], replicate_weights=cols, replicate_method="BRR", max_iter=2,
               progress=False)


def test_three_levels_keep_the_one_by_one_path():
    from conftest import sleepstudy_three_level
    df = sleepstudy_three_level()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = tm.mix("Reaction ~ Days + (1|Subject) + (1|Group)", df, weights=["c1", "c2", "c3"], cweights=True,
                     progress=False)
    assert GaussianReplicateFit().batched(res.design.tensors, torch.ones(2, 4), torch.cat(res._out.theta)) is None
