"""Exact weighting identities for GLMM fits (MATH.md 12: V1, V3, V7, V8) through ``mix``.

Binomial (logit, probit) and Poisson, two and three levels; a correlated random intercept and
slope (q = 2) for V1.
"""

import numpy as np
import pandas as pd
import pytest

import torchmix as tm
from conftest import assert_same_fit
from glmm_support import one_thread, simulate  # noqa: F401

# the identities are checked at interior estimates
pytestmark = pytest.mark.filterwarnings("error::torchmix.errors.BoundaryWarning")

CASES = [("binomial", "logit", 2), ("binomial", "probit", 3), ("poisson", None, 2), ("poisson", None, 3),
         ("binomial", "logit", 3), ("binomial", "probit", 2)]


def formula(levels, slope=False):
    re = "(1 + x | g)" if slope else "(1 | g)"
    return f"y ~ x + {re}" + (" + (1 | k)" if levels == 3 else "")


def fit(df, levels, family, link, weights, cweights=True, slope=False, n_quad=5):
    return tm.mix(formula(levels, slope), df, weights=weights, cweights=cweights, family=family, link=link,
                  n_quad=n_quad, progress=False)


def weight_names(levels, first="c1"):
    return [first, "c2"] + (["c3"] if levels == 3 else [])


def data(family, link, levels, seed, slope=False):
    return simulate(family, levels=levels, seed=seed, link=link or "logit", slope=slope,
                    n_top=7 if levels == 3 else 9)


@pytest.mark.parametrize("family,link,levels", CASES)
def test_v1_level1_replication(family, link, levels):
    """Integer conditional level-1 weight c = c copies of the row with weight 1: everything equal."""
    df = data(family, link, levels, seed=21)
    rep = df.loc[df.index.repeat(df["c1"].astype(int))].reset_index(drop=True)
    rep["one"] = 1.0
    a = fit(df, levels, family, link, weight_names(levels))
    b = fit(rep, levels, family, link, weight_names(levels, "one"))
    assert a.converged and b.converged
    assert b.nobs == int(df["c1"].sum())
    assert_same_fit(a, b, rtol=1e-9)


def test_v1_correlated_intercept_and_slope():
    df = data("binomial", "logit", 2, seed=22, slope=True)
    rep = df.loc[df.index.repeat(df["c1"].astype(int))].reset_index(drop=True)
    rep["one"] = 1.0
    a = fit(df, 2, "binomial", None, ["c1", "c2"], slope=True, n_quad=7)
    b = fit(rep, 2, "binomial", None, ["one", "c2"], slope=True, n_quad=7)
    assert a.converged and list(a.varcomp.index) == ["g:(Intercept)", "g:x", "g:(Intercept):x"]
    assert a.varcomp.iloc[0] > 0 and a.varcomp.iloc[1] > 0
    assert_same_fit(a, b, rtol=1e-9)


def _replicate_groups(df, levels):
    parts = []
    for gid, rows in df.groupby("g", sort=False):
        c = int(rows["c2"].iloc[0])
        for r in range(c):
            copy = rows.copy()
            copy["g"] = f"{gid}_{r}"
            copy["c2"] = 1.0
            parts.append(copy)
    return pd.concat(parts, ignore_index=True)


@pytest.mark.parametrize("family,link,levels", CASES)
def test_v3_level2_replication(family, link, levels):
    """Integer conditional level-2 weight c = c copies of the group: three levels everything equal;
    two levels (copies become new top groups) equal likelihood and estimates."""
    df = data(family, link, levels, seed=23)
    rep = _replicate_groups(df, levels)
    a = fit(df, levels, family, link, weight_names(levels))
    b = fit(rep, levels, family, link, weight_names(levels))
    assert b.ngroups["g"] == int(df.groupby("g")["c2"].first().sum())
    if levels == 3:
        assert_same_fit(a, b, rtol=1e-9, ranef=False)
    else:
        assert_same_fit(a, b, rtol=1e-9, se=False, ranef=False)
        assert not np.allclose(a.se.to_numpy(), b.se.to_numpy(), rtol=1e-3)


@pytest.mark.parametrize("family,link,levels", CASES)
def test_v7_conditional_and_unconditional_inputs(family, link, levels):
    df = data(family, link, levels, seed=28)
    if levels == 3:
        df["u3"] = df["c3"]
        df["u2"] = df["c2"] * df["c3"]
        df["u1"] = df["c1"] * df["u2"]
        names = ["u1", "u2", "u3"]
    else:
        df["u2"] = df["c2"]
        df["u1"] = df["c1"] * df["c2"]
        names = ["u1", "u2"]
    a = fit(df, levels, family, link, weight_names(levels), cweights=True)
    b = fit(df, levels, family, link, names, cweights=False)
    assert_same_fit(a, b, rtol=1e-12)


def test_v8_row_order_labels_and_top_weight_scale():
    df = data("binomial", "logit", 3, seed=25)
    a = fit(df, 3, "binomial", None, weight_names(3))
    shuffled = df.sample(frac=1.0, random_state=3).reset_index(drop=True)
    shuffled["g"] = "new_" + shuffled["g"]
    b = fit(shuffled, 3, "binomial", None, weight_names(3))
    assert a.lnl == pytest.approx(b.lnl, rel=1e-10)
    np.testing.assert_allclose(a.coef, b.coef, rtol=1e-7)
    np.testing.assert_allclose(a.se, b.se, rtol=1e-6)
    scaled = df.assign(c3=df["c3"] * 3.5)
    c = fit(scaled, 3, "binomial", None, weight_names(3))
    assert c.lnl == pytest.approx(3.5 * a.lnl, rel=1e-10)
    np.testing.assert_allclose(c.coef, a.coef, rtol=1e-7)
    np.testing.assert_allclose(c.se, a.se, rtol=1e-6)
    np.testing.assert_allclose(c.varcomp_se, a.varcomp_se, rtol=1e-6)
