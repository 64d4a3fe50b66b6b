"""A simulated 4-level linear model (students in classes in schools in districts): V1 and V7."""

from __future__ import annotations

import numpy as np
import pytest

import torchmix as tm
from conftest import assert_same_fit, simulate_nested

F4 = "y ~ x + (1|cls) + (1|school) + (1|district)"


@pytest.fixture(scope="module")
def sim():
    df = simulate_nested(seed=11)
    df["u1"] = df["w1c"] * df["w2c"] * df["w3c"] * df["w4c"]
    df["u2"] = df["w2c"] * df["w3c"] * df["w4c"]
    df["u3"] = df["w3c"] * df["w4c"]
    df["u4"] = df["w4c"]
    return df


@pytest.fixture(scope="module")
def fit_cond(sim):
    return tm.mix(F4, sim, weights=["w1c", "w2c", "w3c", "w4c"], cweights=True, progress=False)


def test_four_levels_structure(fit_cond, sim):
    assert fit_cond.converged
    assert fit_cond.levels == 4
    assert list(fit_cond.ngroups) == ["cls", "school", "district"]
    assert list(fit_cond.varcomp.index) == ["cls:(Intercept)", "school:(Intercept)", "district:(Intercept)",
                                            "Residual"]
    assert np.isfinite(fit_cond.se).all() and np.isfinite(fit_cond.varcomp_se).all()
    assert set(fit_cond.icc_level) == {"cls", "school", "district"}


def test_four_levels_v7(fit_cond, sim):
    unc = tm.mix(F4, sim, weights=["u1", "u2", "u3", "u4"], progress=False)
    assert_same_fit(fit_cond, unc, rtol=1e-10)


def test_four_levels_v1(fit_cond, sim):
    rep = sim.loc[sim.index.repeat(sim["w1c"].astype(int))].reset_index(drop=True)
    rep["one"] = 1.0
    b = tm.mix(F4, rep, weights=["one", "w2c", "w3c", "w4c"], cweights=True, progress=False)
    assert_same_fit(fit_cond, b)
