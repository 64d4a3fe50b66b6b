"""Replicate refits of GLMMs batched over replicates equal separate fits."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import torch

import torchmix as tm
import torchmix.fit.glmm_replicates as gr
from torchmix.api import _prepare
from torchmix.fit.glmm import fit_glmm
from torchmix.fit.glmm_se import fd_hessian
from torchmix.fit.replicates import estimate_vector, refit_replicates, scale_top_weights
from torchmix.likelihood.agq import AGQLogLik

from conftest import simulate_nested

RHS = "age + urban + (1 | district)"


def _quiet_mix(*args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tm.mix(*args, progress=False, **kw)


def _contraception():
    df = tm.load_dataset("contraception")
    df["w1"] = 1.0 + (np.arange(len(df)) % 3)
    df["w2"] = 1.0 + (df["district"].astype(int) % 4)
    return df


def _jk1(df, group, wcol):
    labels = sorted(df[group].unique(), key=str)
    g = len(labels)
    cols = [f"rw{r + 1}" for r in range(g)]
    reps = pd.DataFrame({c: df[wcol] * np.where(df[group] == s, 0.0, g / (g - 1)) for c, s in zip(cols, labels)},
                        index=df.index)
    return pd.concat([df, reps], axis=1), cols, labels


def _count_separate_fits(monkeypatch):
    """Count the replicates refitted one by one (not settled by the batch)."""
    calls = []
    original = gr._refit_alone

    def counting(*args, **kw):
        calls.append(1)
        return original(*args, **kw)
    monkeypatch.setattr(gr, "_refit_alone", counting)
    return calls


def test_jk1_logit_replicates_equal_separate_fits(monkeypatch):
    calls = _count_separate_fits(monkeypatch)
    df = _contraception()
    rdf, cols, labels = _jk1(df, "district", "w2")
    kw = dict(weights=["w1", "w2"], family="binomial")
    res = _quiet_mix(f"use ~ {RHS}", rdf, replicate_weights={"w2": cols}, replicate_method="JK1", **kw)
    assert not calls  # every replicate settled by the batched refit
    est = res.variance["replicate_estimates"].numpy()
    g = len(labels)
    for r in (0, 17, 41):
        d = df[df["district"] != labels[r]].copy()
        d["w1"] *= g / (g - 1)
        d["w2"] *= g / (g - 1)
        sep = _quiet_mix(f"use ~ {RHS}", d, **kw)
        np.testing.assert_allclose(est[r], np.concatenate([sep.coef, sep.varcomp]), rtol=1e-8)
    full = np.concatenate([res.coef, res.varcomp])
    v = (g - 1) / g * ((est - full) ** 2).sum(0)
    np.testing.assert_allclose(res.se.to_numpy(), np.sqrt(v[:3]), rtol=1e-12)


def _prepared_logit(levels=2):
    df = simulate_nested(n_top=10, levels=3, seed=4)
    df["hit"] = (df["y"] > 1.5).astype(float)
    if levels == 2:
        formula, weights = "hit ~ x + (1 | cls)", ["w1c", "w2c"]
    else:
        formula, weights = "hit ~ x + (1 | cls) + (1 | school)", ["w1c", "w2c", "w3c"]
    prep = _prepare(formula, df, weights, cweights=True, family="binomial", progress=False)
    return prep.design.tensors, prep.family


def _fay_problem(levels: int, n_rep: int, seed: int):
    """A prepared logit model, ``n_rep`` Fay factors (rho = 0.5), its full-sample fit, the start of every
    replicate and ``fit(tensors, start)``, the separate refit (n_quad = 5). Call with warnings silenced."""
    t, fam = _prepared_logit(levels)
    rng = np.random.default_rng(seed)
    factors = torch.as_tensor(1.0 + 0.5 * rng.choice([-1.0, 1.0], size=(n_rep, t.levels[-1].n_groups)),
                              dtype=torch.float64)
    full = fit_glmm(t, fam, n_quad=5, progress=False)

    def fit(tensors, s):
        return fit_glmm(tensors, fam, n_quad=5, start=s, progress=False)
    return t, fam, factors, full, estimate_vector(full), fit


@pytest.mark.parametrize("levels", [2, 3])
def test_fay_replicates_batched_equal_separate_fit_glmm(levels):
    """Fay replicates (rho = 0.5) of a 2- and a 3-level logit model: the batched estimates equal
    fit_glmm on each replicate's weights, started from the full-sample estimates."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t, fam, factors, full, start, fit = _fay_problem(levels, 4, seed=2)
        batch = gr.glmm_replicate_estimates(t, factors, fit, start, family=fam, full=full, n_quad=5)
        assert batch is not None
        est, n_failed = batch
        assert n_failed == 0
        for r in range(factors.shape[0]):
            sep = fit(scale_top_weights(t, factors[r]), start)
            np.testing.assert_allclose(est[r].numpy(), estimate_vector(sep).numpy(), rtol=1e-8)


def test_group_derivatives_sum_to_the_fit_gradient_and_hessian():
    t, fam = _prepared_logit(2)
    module = AGQLogLik(t, fam, 5)
    psi = torch.tensor([-0.4, 0.6, 0.8], dtype=torch.float64)
    ell, scores, hess, modes = gr.group_derivatives(module, psi, 2, [(1,)])

    def total(x):
        return module.loglik(x[:2], [x[2:].reshape(1, 1)])

    def grad(x):
        module.set_modes(modes)
        x = x.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(total(x).sum(), x)
        return g
    module.set_modes(modes)
    np.testing.assert_allclose(ell.numpy(), total(psi).detach().numpy(), rtol=1e-12)
    np.testing.assert_allclose(scores.sum(0).numpy(), grad(psi).numpy(), rtol=1e-10, atol=1e-12)
    ref = fd_hessian(grad, psi, torch.ones(3, dtype=torch.bool))
    np.testing.assert_allclose(hess.sum(0).numpy(), ref.numpy(), rtol=1e-9, atol=1e-12)


def test_unsettled_replicates_are_refitted_alone_and_counted(monkeypatch):
    """Without batched steps every replicate falls back to its own fit: same estimates; a replicate
    whose own fit does not converge is counted."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t, fam, factors, full, start, fit = _fay_problem(2, 3, seed=5)
        batched, _ = gr.glmm_replicate_estimates(t, factors, fit, start, family=fam, full=full, n_quad=5)
        calls = _count_separate_fits(monkeypatch)
        alone, n_failed = gr.glmm_replicate_estimates(t, factors, fit, start, family=fam, full=full, n_quad=5,
                                                      max_steps=0)
        assert len(calls) == 3 and n_failed == 0
        np.testing.assert_allclose(alone.numpy(), batched.numpy(), rtol=1e-8)

        def failing(tensors, s):
            return fit_glmm(tensors, fam, n_quad=5, start=s, max_iter=1, tol=1e-14, progress=False)
        _, n_failed = gr.glmm_replicate_estimates(t, factors, failing, start, family=fam, full=full, n_quad=5,
                                                  max_steps=0)
    assert n_failed == 3


def test_refit_replicates_falls_back_where_the_batch_does_not_apply():
    """A full-sample fit on the boundary (a variance of 0) is not batched: every replicate is refitted."""
    t, fam = _prepared_logit(2)
    factors = torch.ones(2, t.levels[-1].n_groups, dtype=torch.float64)
    seen = []

    def fit(tensors, s):
        seen.append(1)
        return torch.zeros(3, dtype=torch.float64), True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = fit_glmm(t, fam, n_quad=5, progress=False)
    full.extra["boundary"] = [0]
    refit = gr.GLMMReplicateFit(fit, fam, full, n_quad=5)
    assert refit.batched(t, factors, None) is None
    est, n_failed = refit_replicates(t, factors, refit, None)
    assert len(seen) == 2 and n_failed == 0 and est.shape == (2, 3)


def test_plausible_values_with_replicates_equal_separate_fits(monkeypatch):
    """Replicates of the second (batched) plausible value of a logit model equal a separate fit of
    that value with the replicate's weights."""
    calls = _count_separate_fits(monkeypatch)
    df = _contraception()
    rng = np.random.default_rng(8)
    flip = rng.uniform(size=len(df)) < 0.08
    df["use_a"] = df["use01"].astype(float)
    df["use_b"] = np.where(flip, 1 - df["use01"], df["use01"]).astype(float)
    labels = sorted(df["district"].unique(), key=str)
    df["JKZONE"] = df["district"].map({s: i // 2 for i, s in enumerate(labels)})
    df["JKREP"] = df["district"].map({s: i % 2 for i, s in enumerate(labels)})
    kw = dict(weights=["w1", "w2"], family="binomial", n_quad=5)
    res = _quiet_mix(f"y ~ {RHS}", df, plausible_values={"y": ["use_a", "use_b"]}, jk_zone="JKZONE", jk_rep="JKREP",
                     **kw)
    second = res.fits[1]
    assert second._out.extra.get("batched") and not calls
    est = second.variance["replicate_estimates"].numpy()
    # replicate 0 of zone 0: the first district of the zone dropped, its partner doubled
    d = df[df["district"] != labels[0]].copy()
    twice = d["district"] == labels[1]
    d.loc[twice, "w1"] *= 2.0
    d.loc[twice, "w2"] *= 2.0
    sep = _quiet_mix(f"use_b ~ {RHS}", d, **kw)
    np.testing.assert_allclose(est[0], np.concatenate([sep.coef, sep.varcomp]), rtol=1e-8)


def test_a_failed_stacked_evaluation_rejects_the_trial_points(monkeypatch):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t, fam, factors, full, start, fit = _fay_problem(2, 3, seed=7)
        n_top = t.levels[-1].n_groups
        ref, _ = gr.glmm_replicate_estimates(t, factors, fit, start, family=fam, full=full, n_quad=5)
        original = AGQLogLik.forward
        failed = []

        def flaky(self, eta0, zls, kappa=None):
            if self.n2 > n_top and not failed:  # the first evaluation of the stacked copies
                failed.append(1)
                raise torch.linalg.LinAlgError("a curvature block is not positive definite")
            return original(self, eta0, zls, kappa)
        monkeypatch.setattr(AGQLogLik, "forward", flaky)
        est, n_failed = gr.glmm_replicate_estimates(t, factors, fit, start, family=fam, full=full, n_quad=5)
    assert failed and n_failed == 0
    np.testing.assert_allclose(est.numpy(), ref.numpy(), rtol=1e-8)
