"""R² (Nakagawa-Schielzeth / Nakagawa-Johnson-Schielzeth) and the Rights-Sterba decomposition."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

import torchmix as tm

from conftest import sleepstudy_weighted


def no_group_data(seed=3, groups=25, size=8):
    """x centred within groups and noise with zero group means: the ML group variance is exactly 0."""
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(groups), size)
    x = rng.normal(size=g.size)
    x -= pd.Series(x).groupby(g).transform("mean").to_numpy()
    e = rng.normal(size=g.size)
    e -= pd.Series(e).groupby(g).transform("mean").to_numpy()
    return pd.DataFrame({"g": [f"g{k}" for k in g], "x": x, "y": 1.0 + 0.8 * x + e})


def test_no_random_effects_gives_the_ols_r2():
    df = no_group_data()
    with pytest.warns(tm.BoundaryWarning):
        res = tm.mix("y ~ x + (1 | g)", df, progress=False)
    assert res.varcomp.iloc[0] == 0.0
    x = np.column_stack([np.ones(len(df)), df["x"]])
    beta, *_ = np.linalg.lstsq(x, df["y"], rcond=None)
    resid = df["y"] - x @ beta
    ols = 1 - (resid ** 2).sum() / ((df["y"] - df["y"].mean()) ** 2).sum()
    r2 = res.r2()
    np.testing.assert_allclose(r2["marginal"], ols, rtol=1e-9)
    np.testing.assert_allclose(r2["conditional"], ols, rtol=1e-9)


def test_null_model_marginal_r2_is_zero():
    res = tm.mix("Reaction ~ 1 + (1 | Subject)", tm.load_dataset("sleepstudy"), progress=False)
    r2 = res.r2()
    assert abs(r2["marginal"]) < 1e-15
    np.testing.assert_allclose(r2["conditional"], res.icc, rtol=1e-12)


def test_weights_equal_replicated_rows():
    df = sleepstudy_weighted()
    df["k"] = (1 + df["Days"] % 3).astype(int)
    rep = df.loc[df.index.repeat(df["k"])].reset_index(drop=True)
    df["one"], rep["one"] = 1.0, 1.0
    a = tm.mix("Reaction ~ Days + (1 + Days | Subject)", df, weights=["k", "one"], progress=False)
    b = tm.mix("Reaction ~ Days + (1 + Days | Subject)", rep, weights=["one", "one"], progress=False)
    np.testing.assert_allclose(a.r2().to_numpy(), b.r2().to_numpy(), rtol=1e-6)
    np.testing.assert_allclose(a.r2_decomposition().to_numpy(), b.r2_decomposition().to_numpy(), rtol=1e-6,
                               atol=1e-12)
    # and the weights matter
    c = tm.mix("Reaction ~ Days + (1 + Days | Subject)", df, progress=False)
    assert abs(c.r2()["marginal"] - a.r2()["marginal"]) > 1e-3


def test_rights_sterba_on_group_centred_predictor():
    df = sleepstudy_weighted()
    w = df["w1"].to_numpy()
    gm = df.groupby("Subject")["Days"].transform(lambda s: np.average(s, weights=w[s.index]))
    df["dw"] = df["Days"] - gm
    df["sub_mean"] = (df["Subject"].astype(int) % 3).astype(float)  # a level-2 predictor
    res = tm.mix("Reaction ~ dw + sub_mean + (1 + dw | Subject)", df, weights=["w1", "w2"], progress=False)
    tab = res.r2_decomposition()
    vw = np.average(df["dw"] ** 2, weights=w)  # weighted within variance (mean 0)
    sig = res.varcomp
    np.testing.assert_allclose(tab.loc["f1", "variance"], res.coef["dw"] ** 2 * vw, rtol=1e-10)
    sm = df["sub_mean"].to_numpy()
    np.testing.assert_allclose(tab.loc["f2", "variance"],
                               res.coef["sub_mean"] ** 2 * np.average((sm - np.average(sm, weights=w)) ** 2, weights=w),
                               rtol=1e-10)
    np.testing.assert_allclose(tab.loc["v", "variance"], sig["Subject:dw"] * vw, rtol=1e-10)
    np.testing.assert_allclose(tab.loc["m", "variance"], sig["Subject:(Intercept)"], rtol=1e-10)
    np.testing.assert_allclose(tab.loc["residual", "variance"], sig["Residual"], rtol=1e-10)
    np.testing.assert_allclose(tab["total"].sum(), 1.0, rtol=1e-12)
    np.testing.assert_allclose(tab["within"].sum(), 1.0, rtol=1e-12)
    r2 = res.r2()
    np.testing.assert_allclose(r2["marginal"], tab.loc[["f1", "f2"], "total"].sum(), rtol=1e-10)
    np.testing.assert_allclose(r2["conditional"], tab.loc[["f1", "f2", "v", "m"], "total"].sum(), rtol=1e-10)


def test_random_slope_variance_is_mean_of_z_sigma_z():
    df = tm.load_dataset("sleepstudy")
    res = tm.mix("Reaction ~ Days + (1 + Days | Subject)", df, progress=False)
    v = res.varcomp
    d = df["Days"].to_numpy()
    expect = np.mean(v["Subject:(Intercept)"] + 2 * d * v["Subject:(Intercept):Days"] + d ** 2 * v["Subject:Days"])
    np.testing.assert_allclose(res.r2()["var_random:Subject"], expect, rtol=1e-10)
    np.testing.assert_allclose(res.r2()["var_fixed"], res.coef["Days"] ** 2 * np.var(d), rtol=1e-10)


@pytest.mark.parametrize("link,resid", [("logit", math.pi ** 2 / 3), ("probit", 1.0)])
def test_latent_scale_r2_binomial(link, resid):
    df = tm.load_dataset("sleepstudy")
    df["hi"] = (df["Reaction"] > 300).astype(int)
    res = tm.mix("hi ~ Days + (1 | Subject)", df, family="binomial", link=link, n_quad=1, progress=False)
    vf = res.coef["Days"] ** 2 * np.var(df["Days"])
    tau = res.varcomp.iloc[0]
    r2 = res.r2()
    np.testing.assert_allclose(r2["marginal"], vf / (vf + tau + resid), rtol=1e-10)
    np.testing.assert_allclose(r2["conditional"], (vf + tau) / (vf + tau + resid), rtol=1e-10)


def test_poisson_lognormal_residual():
    df = tm.load_dataset("sleepstudy")
    df["cnt"] = (df["Reaction"] // 40).astype(int)
    res = tm.mix("cnt ~ Days + (1 | Subject)", df, family="poisson", n_quad=1, progress=False)
    eta = res.coef["(Intercept)"] + res.coef["Days"] * df["Days"].to_numpy()
    tau = res.varcomp.iloc[0]
    lam = math.exp(eta.mean() + tau / 2)
    np.testing.assert_allclose(res.r2()["var_residual"], math.log(1 + 1 / lam), rtol=1e-10)


def test_pooled_r2_is_the_mean_over_plausible_values():
    df = tm.load_dataset("sleepstudy")
    rng = np.random.default_rng(0)
    for k in range(3):
        df[f"pv{k}"] = df["Reaction"] + rng.normal(0, 15, len(df))
    pooled = tm.mix("score ~ Days + (1 | Subject)", df, plausible_values={"score": ["pv0", "pv1", "pv2"]},
                    progress=False)
    each = np.stack([f.r2().to_numpy() for f in pooled.fits])
    np.testing.assert_allclose(pooled.r2().to_numpy(), each.mean(0), rtol=1e-12)
    tables = np.stack([f.r2_decomposition().to_numpy() for f in pooled.fits])
    np.testing.assert_allclose(pooled.r2_decomposition().to_numpy(), tables.mean(0), rtol=1e-12)


def test_r2_decomposition_needs_two_level_gaussian():
    df = tm.load_dataset("sleepstudy")
    df["hi"] = (df["Reaction"] > 300).astype(int)
    res = tm.mix("hi ~ Days + (1 | Subject)", df, family="binomial", n_quad=1, progress=False)
    with pytest.raises(tm.DataError, match="2-level gaussian"):
        res.r2_decomposition()
