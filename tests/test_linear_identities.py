"""Exact identities of MATH.md section 12 for the linear (gaussian, closed-form) model."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import torchmix as tm
from conftest import assert_same_fit

F2 = "Reaction ~ Days + (1 + Days|Subject)"
F3 = "Reaction ~ Days + (1|Subject) + (1|Group)"


def fit(formula, df, weights, **kw):
    return tm.mix(formula, df, weights=weights, progress=False, **kw)


def replicate_rows(df, counts):
    return df.loc[df.index.repeat(counts)].reset_index(drop=True)


def replicate_subjects(df, counts):
    """``counts[s]`` copies of each Subject's rows under new ids, with a unit weight column ``one``."""
    copies = []
    for s, k in counts.items():
        for r in range(k):
            part = df[df["Subject"] == s].copy()
            part["Subject"] = f"{s}_{r}"
            copies.append(part)
    return pd.concat(copies).assign(one=1.0)


@pytest.fixture
def int_weights(sleep_w):
    rng = np.random.default_rng(1)
    df = sleep_w.copy()
    df["k1"] = rng.integers(1, 4, len(df)).astype(float)
    return df


def test_v1_level1_replication_two_levels(int_weights):
    df = int_weights
    a = fit(F2, df, ["k1", "c2"], cweights=True)
    rep = replicate_rows(df, df["k1"].astype(int))
    rep["one"] = 1.0
    b = fit(F2, rep, ["one", "c2"], cweights=True)
    assert_same_fit(a, b)


def test_v1_level1_replication_three_levels(sleep3):
    rng = np.random.default_rng(2)
    df = sleep3.copy()
    df["k1"] = rng.integers(1, 4, len(df)).astype(float)
    a = fit(F3, df, ["k1", "c2", "c3"], cweights=True)
    rep = replicate_rows(df, df["k1"].astype(int))
    rep["one"] = 1.0
    b = fit(F3, rep, ["one", "c2", "c3"], cweights=True)
    assert_same_fit(a, b)


def test_v2_fractional_split(sleep_w):
    df = sleep_w.copy()
    a = fit(F2, df, ["c1", "c2"], cweights=True)
    split = df.index[::7]
    halves = df.loc[split].copy()
    halves["c1"] = halves["c1"] / 2
    df2 = df.copy()
    df2.loc[split, "c1"] = df2.loc[split, "c1"] / 2
    b = fit(F2, pd.concat([df2, halves]), ["c1", "c2"], cweights=True)
    assert_same_fit(a, b)


def test_v3_level2_replication_two_levels_point_estimates(sleep_w):
    df = sleep_w.copy()
    counts = {s: 1 + (int(s) % 3) for s in df["Subject"].unique()}
    df["k2"] = df["Subject"].map(counts).astype(float)
    a = fit(F2, df, ["c1", "k2"], cweights=True)
    rep = replicate_subjects(df, counts)
    b = fit(F2, rep, ["c1", "one"], cweights=True)
    np.testing.assert_allclose(a.lnl, b.lnl, rtol=1e-8)
    np.testing.assert_allclose(a.coef, b.coef, rtol=1e-6)
    np.testing.assert_allclose(a.varcomp, b.varcomp, rtol=1e-6)


def test_v3_level2_replication_three_levels_everything(sleep3):
    df = sleep3.copy()
    counts = {s: 1 + (int(s) % 3) for s in df["Subject"].unique()}
    df["k2"] = df["Subject"].map(counts).astype(float)
    a = fit(F3, df, ["c1", "k2", "c3"], cweights=True)
    rep = replicate_subjects(df, counts)
    b = fit(F3, rep, ["c1", "one", "c3"], cweights=True)
    assert_same_fit(a, b, ranef=False)
    np.testing.assert_allclose(a.ranef["Group"].to_numpy(), b.ranef["Group"].to_numpy(), rtol=1e-5)


def test_v4_level3_replication(sleep3):
    df = sleep3.copy()
    counts = {"1": 2, "2": 1, "3": 3, "4": 2}
    df["k3"] = df["Group"].map(counts).astype(float)
    a = fit(F3, df, ["c1", "c2", "k3"], cweights=True)
    copies = []
    for g, k in counts.items():
        for r in range(k):
            part = df[df["Group"] == g].copy()
            part["Group"] = f"{g}_{r}"
            part["Subject"] = part["Subject"] + f"_{r}"
            copies.append(part)
    rep = pd.concat(copies)
    rep["one"] = 1.0
    b = fit(F3, rep, ["c1", "c2", "one"], cweights=True)
    np.testing.assert_allclose(a.lnl, b.lnl, rtol=1e-8)
    np.testing.assert_allclose(a.coef, b.coef, rtol=1e-6)
    np.testing.assert_allclose(a.varcomp, b.varcomp, rtol=1e-6)


def test_v7_conditional_equals_unconditional_three_levels(sleep3):
    df = sleep3.copy()
    df["u1"] = df["c1"] * df["c2"] * df["c3"]
    df["u2"] = df["c2"] * df["c3"]
    df["u3"] = df["c3"]
    a = fit(F3, df, ["c1", "c2", "c3"], cweights=True)
    b = fit(F3, df, ["u1", "u2", "u3"], cweights=False)
    assert_same_fit(a, b, rtol=1e-10)


def test_v8_row_order(sleep_w):
    a = fit(F2, sleep_w, ["w1", "w2"])
    shuffled = sleep_w.sample(frac=1.0, random_state=3)
    b = fit(F2, shuffled, ["w1", "w2"])
    assert_same_fit(a, b, rtol=1e-10)
    # fitted values come back aligned to the caller's rows
    np.testing.assert_allclose(a.predict().sort_index().to_numpy(), b.predict().sort_index().to_numpy(), rtol=1e-7)


def test_v8_relabelled_ids(sleep_w):
    a = fit(F2, sleep_w, ["w1", "w2"])
    df = sleep_w.copy()
    mapping = {s: f"id{999 - int(s)}" for s in df["Subject"].unique()}  # reverses the sort order
    df["Subject"] = df["Subject"].map(mapping)
    b = fit(F2, df, ["w1", "w2"])
    assert_same_fit(a, b, rtol=1e-10, ranef=False)
    ra = a.ranef["Subject"].rename(index=mapping).sort_index()
    np.testing.assert_allclose(ra.to_numpy(), b.ranef["Subject"].sort_index().to_numpy(), rtol=1e-6)


def test_v8_top_weights_times_a(sleep3):
    a = fit(F3, sleep3, ["c1", "c2", "c3"], cweights=True)
    df = sleep3.copy()
    df["c3"] = df["c3"] * 7.5
    b = fit(F3, df, ["c1", "c2", "c3"], cweights=True)
    np.testing.assert_allclose(b.lnl, 7.5 * a.lnl, rtol=1e-10)
    np.testing.assert_allclose(a.coef, b.coef, rtol=1e-7)
    np.testing.assert_allclose(a.se, b.se, rtol=1e-6)
    np.testing.assert_allclose(a.varcomp, b.varcomp, rtol=1e-6)
    np.testing.assert_allclose(a.varcomp_se, b.varcomp_se, rtol=1e-5)


def test_v9_zero_weight_equals_deletion(sleep_w):
    df = sleep_w.copy()
    drop = df.index[[3, 50, 51, 120]]
    df.loc[drop, "w1"] = 0.0
    with pytest.warns(tm.DataWarning, match="4 row"):
        a = fit(F2, df, ["w1", "w2"])
    b = fit(F2, sleep_w.drop(index=drop), ["w1", "w2"])
    assert_same_fit(a, b, rtol=1e-10)
    assert a.nobs == len(sleep_w) - 4


def test_v10_scores_sum_to_zero_and_match_finite_differences(sleep_w):
    from torchmix.likelihood.gaussian import GaussianLikelihood

    res = fit(F2, sleep_w, ["w1", "w2"])
    scores = res._out.scores
    total = scores.sum(0)
    p = 2
    # beta block exactly (up to rounding), all blocks to optimiser tolerance
    assert float(total[:p].abs().max()) < 1e-8 * float(scores[:, :p].abs().max())
    assert float(total.abs().max()) < 1e-5 * float(scores.abs().max())
    lik = GaussianLikelihood(res.design.tensors)
    psi = res._out.extra["psi"]

    def ell_k(vec):
        return lik.loglik_by_group(vec[:p], [vec[p:-1]], vec[-1])

    h = 1e-6
    for r in range(psi.numel()):
        e = torch.zeros_like(psi)
        e[r] = h * (1 + abs(float(psi[r])))
        fd = (ell_k(psi + e) - ell_k(psi - e)) / (2 * e[r])
        np.testing.assert_allclose(scores[:, r].numpy(), fd.numpy(), rtol=1e-5, atol=1e-6)


def test_v12_profiling(sleep_w):
    from torchmix.likelihood.gaussian import GaussianLikelihood

    res = fit(F2, sleep_w, ["w1", "w2"])
    lik = GaussianLikelihood(res.design.tensors)
    for theta in (torch.tensor([0.3, 0.1, 0.2], dtype=torch.float64), torch.tensor([1.5, -0.4, 0.05], dtype=torch.float64)):
        ell, beta, sigma2, kt, _ = lik.profile([theta])
        p = beta.numel()
        resid2 = kt[p, p] - kt[:p, p] @ beta
        np.testing.assert_allclose(float(sigma2), float(resid2) / sleep_w["w1"].sum(), rtol=1e-12)
        b = beta.clone().requires_grad_(True)
        total = lik.loglik_by_group(b, [theta], sigma2.sqrt()).sum()
        (g,) = torch.autograd.grad(total, b)
        assert float(g.abs().max()) < 1e-9 * float(kt[:p, :p].abs().max())
        # the profiled value equals the unprofiled one at (beta_hat, sigma_hat)
        np.testing.assert_allclose(float(total.detach()), float(ell), rtol=1e-12)
