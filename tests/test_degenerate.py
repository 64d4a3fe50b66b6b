"""Degenerate and malformed inputs through ``mix()``: a typed error or a specific warning, never a crash
and never a non-optimum reported as converged."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

import torchmix as tm
from torchmix.errors import (ConfigError, ConvergenceWarning, DataError, FormulaError, NumericalError,
                             WeightError)
from torchmix.quadrature import MAX_N_QUAD, check_grid_size, gauss_hermite

from conftest import sleepstudy_weighted


def _sleep():
    return tm.load_dataset("sleepstudy")


def _con():
    return tm.load_dataset("contraception")


def _binary_groups(n_groups=20, size=15, seed=3):
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(n_groups), size)
    x = rng.normal(size=g.size)
    u = rng.normal(scale=0.7, size=n_groups)
    y = (rng.random(g.size) < 1 / (1 + np.exp(-(0.2 + 0.8 * x + u[g])))).astype(int)
    return pd.DataFrame({"y": y, "x": x, "g": g.astype(str)})


# ---------------------------------------------------------------- crashes through mix()

def test_constant_response_is_a_data_error():
    df = _sleep().assign(Reaction=5.0)
    with pytest.raises(DataError, match="'Reaction' is constant"):
        tm.mix("Reaction ~ Days + (1|Subject)", df, progress=False)


def test_random_term_without_columns_is_a_formula_error():
    with pytest.raises(FormulaError, match=r"\(0 \| Subject\)"):
        tm.mix("Reaction ~ Days + (0|Subject)", _sleep(), progress=False)


@pytest.mark.parametrize("w2", ["w2", "c1", "c2"])
def test_weighted_groups_of_size_one_are_not_identified(w2):
    df = sleepstudy_weighted()
    df["id"] = np.arange(len(df)).astype(str)
    with pytest.raises(DataError, match="every group of 'id' has a single observation"):
        tm.mix("Reaction ~ Days + (1|id)", df, weights=["w1", w2], progress=False)


def test_unweighted_groups_of_size_one_are_not_identified():
    df = _sleep()
    df["id"] = np.arange(len(df)).astype(str)
    with pytest.raises(DataError, match="not separately identified"):
        tm.mix("Reaction ~ Days + (1|id)", df, progress=False)


def test_some_weighted_groups_of_size_one_fit():
    df = sleepstudy_weighted()
    extra = df.groupby("Subject").head(1).assign(Subject=lambda d: "s" + d["Subject"])
    res = tm.mix("Reaction ~ Days + (1|Subject)", pd.concat([df, extra], ignore_index=True), weights=["w1", "w2"],
                 progress=False)
    assert res.converged
    assert np.all(np.isfinite(res.se)) and np.all(res.varcomp > 1.0)


def test_binomial_log_link_is_a_numerical_error_naming_the_link():
    with pytest.raises(NumericalError, match="log link"):
        tm.mix("use ~ age + urban + (1|district)", _con(), family="binomial", link="log", progress=False)


@pytest.mark.parametrize("n_quad", [2 ** 63 - 1, 100000, 20000, 500, MAX_N_QUAD + 1])
def test_n_quad_above_the_bound_is_a_config_error(n_quad):
    with pytest.raises(ConfigError, match=f"at most {MAX_N_QUAD}"):
        tm.mix("use ~ age + (1|district)", _con(), family="binomial", n_quad=n_quad, progress=False)


# ---------------------------------------------------------------- n_quad bound and grid size

def test_gauss_hermite_is_accurate_up_to_the_bound():
    z, w = gauss_hermite(MAX_N_QUAD)
    z, w = z.numpy(), w.numpy()
    assert np.all(np.isfinite(w)) and np.all(w > np.finfo(float).tiny)
    for k, moment in [(0, 1.0), (2, 1.0), (4, 3.0), (6, 15.0), (8, 105.0)]:
        assert abs((w * z ** k).sum() - moment) < 1e-12 * moment


def test_grid_too_big_is_refused_with_its_size():
    with pytest.raises(ConfigError, match=r"60\^3 = 2.16e\+05 nodes.*GiB"):
        check_grid_size(60, 3, 1934)
    assert check_grid_size(13, 2, 1000) == 169000


def test_sixty_points_three_random_effects_does_not_hang():
    df = _con()
    df["a2"] = df["age"] ** 2 / 100
    with pytest.raises(ConfigError, match="quadrature grid is too big"):
        tm.mix("use ~ age + (1 + age + a2|district)", df, family="binomial", n_quad=60, progress=False)


# ---------------------------------------------------------------- degenerate models

def test_single_top_level_group_is_a_data_error():
    df = _sleep().assign(one="a")
    with pytest.raises(DataError, match="single group"):
        tm.mix("Reaction ~ Days + (1|one)", df, progress=False)
    con = _con().assign(one="a")
    with pytest.raises(DataError, match="single group"):
        tm.mix("use ~ age + (1|one)", con, family="binomial", progress=False)


@pytest.mark.parametrize("value", [0, 1])
def test_constant_binomial_response_is_a_data_error(value):
    df = _binary_groups().assign(y=value)
    with pytest.raises(DataError, match=f"is {value} in every row"):
        tm.mix("y ~ x + (1|g)", df, family="binomial", progress=False)


def test_all_zero_poisson_response_is_a_data_error():
    df = _binary_groups().assign(y=0)
    with pytest.raises(DataError, match="0 in every row"):
        tm.mix("y ~ x + (1|g)", df, family="poisson", progress=False)


@pytest.mark.parametrize("family", ["gaussian", "binomial"])
def test_random_slope_on_an_all_zero_column_names_it(family):
    df = _binary_groups().assign(z=0.0)
    with pytest.raises(DataError, match="'z' of grouping factor 'g'"):
        tm.mix("y ~ x + (1 + z|g)", df, family=family, progress=False)


def _separation_fit(df):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = tm.mix("y ~ x + (1|g)", df, family="binomial", progress=False)
    msgs = [str(w.message) for w in caught if issubclass(w.category, ConvergenceWarning)]
    return res, msgs


def test_complete_separation_is_announced_and_not_converged():
    df = _binary_groups()
    df["y"] = (df["x"] > 0.1).astype(int)
    res, msgs = _separation_fit(df)
    assert any("separation" in m for m in msgs), msgs
    assert not res.converged


def test_quasi_complete_separation_is_announced_and_not_converged():
    df = _binary_groups()
    df["d"] = (df["x"] > 0.8).astype(float)
    df.loc[df["d"] == 1, "y"] = 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = tm.mix("y ~ x + d + (1|g)", df, family="binomial", progress=False)
    assert any("separation" in str(w.message) for w in caught)
    assert not res.converged


def test_no_separation_warning_on_an_ordinary_fit():
    res, msgs = _separation_fit(_binary_groups())
    assert res.converged and not msgs


# ---------------------------------------------------------------- smaller

def test_infinite_weight_is_a_weight_error_naming_the_column():
    df = sleepstudy_weighted()
    df.loc[3, "w1"] = np.inf
    with pytest.raises(WeightError, match="'w1' has infinite values"):
        tm.mix("Reaction ~ Days + (1|Subject)", df, weights=["w1", "w2"], progress=False)


def test_nan_start_value_is_blamed_on_start():
    with pytest.raises(DataError, match="start has non-finite values"):
        tm.mix("Reaction ~ Days + (1|Subject)", _sleep(), start=[250, 10, np.nan, 600], progress=False)


def test_boolean_weight_column_is_a_weight_error():
    df = _sleep()
    df["wb"] = df["Days"] > 2
    df["one"] = 1.0
    with pytest.raises(WeightError, match="'wb' is boolean"):
        tm.mix("Reaction ~ Days + (1|Subject)", df, weights=["wb", "one"], progress=False)


def test_scaling_without_weights_is_a_config_error():
    with pytest.raises(ConfigError, match="no weights were given"):
        tm.mix("Reaction ~ Days + (1|Subject)", _sleep(), scaling="A", progress=False)


def _poisson_counts(scale):
    rng = np.random.default_rng(1)
    g = np.repeat(np.arange(40), 20)
    x = rng.normal(size=g.size)
    u = rng.normal(scale=0.5, size=40)
    y = rng.poisson(np.exp(0.5 + 0.3 * x + u[g])) * scale
    return pd.DataFrame({"y": y, "x": x, "g": g.astype(str)})


def test_poisson_counts_times_a_million_converge():
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        res = tm.mix("y ~ x + (1|g)", _poisson_counts(10 ** 6), family="poisson", progress=False)
    assert res.converged


def test_tol_so_large_that_start_passes_warns_gaussian():
    with pytest.warns(ConvergenceWarning, match="starting values already pass"):
        res = tm.mix("Reaction ~ Days + (1|Subject)", _sleep(), tol=1e3, progress=False)
    assert not res.converged


def test_tol_so_large_that_start_passes_warns_binomial():
    with pytest.warns(ConvergenceWarning, match="starting values already pass"):
        res = tm.mix("y ~ x + (1|g)", _binary_groups(), family="binomial", tol=1e3, n_quad=1, progress=False)
    assert not res.converged


def test_no_information_warning_on_a_well_posed_fit():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = tm.mix("Reaction ~ Days + (1 + Days|Subject)", sleepstudy_weighted(), weights=["w1", "w2"],
                     progress=False)
    assert res.converged
    assert not [w for w in caught if "information matrix" in str(w.message)]


def test_binary_response_with_groups_of_size_one_is_not_identified():
    df = _binary_groups()
    df["id"] = np.arange(len(df)).astype(str)
    with pytest.raises(DataError, match="single 0/1 observation"):
        tm.mix("y ~ x + (1|id)", df, family="binomial", progress=False)
