"""Bad input (MATH.md section 11, rows 1-3, 6-8, 10-16): a typed error naming the culprit,
or a warning and a well-defined result."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import torchmix as tm

F = "Reaction ~ Days + (1|Subject)"


def fit(*args, **kw):
    kw.setdefault("progress", False)
    return tm.mix(*args, **kw)


@pytest.fixture
def df(sleep_w):
    return sleep_w


# row 1
def test_formula_not_a_string(df):
    with pytest.raises(tm.FormulaError, match="formula must be a string"):
        fit(42, df)


def test_data_not_a_dataframe(df):
    with pytest.raises(tm.DataError, match="data must be a pandas DataFrame"):
        fit(F, df.to_dict())


def test_weights_not_strings(df):
    with pytest.raises(tm.WeightError, match="weights must be"):
        fit(F, df, weights=[1, 2])


# row 2
def test_missing_weight_columns_all_named(df):
    with pytest.raises(tm.WeightError, match="'nope1'.*'nope2'"):
        fit(F, df, weights=["nope1", "nope2"])


# row 3
def test_wrong_number_of_weights(df):
    with pytest.raises(tm.WeightError, match="got 1, expecting 2"):
        fit(F, df, weights=["w1"])
    with pytest.raises(tm.WeightError, match="got 3, expecting 2"):
        fit(F, df, weights=["w1", "w2", "w2"])


# row 6
def test_missing_values_dropped_with_count(df):
    d = df.copy()
    d.loc[d.index[[0, 5]], "Reaction"] = np.nan
    d.loc[d.index[9], "w1"] = np.nan
    with pytest.warns(tm.DataWarning, match="3 row"):
        res = fit(F, d, weights=["w1", "w2"])
    assert res.nobs == len(df) - 3
    assert d["Reaction"].isna().sum() == 2  # caller's data untouched


def test_caller_data_never_modified(df):
    before = df.copy()
    fit("Reaction ~ Days + (1|Subject)", df, weights=["w1", "w2"], center_group={"Subject": ["Days"]},
        center_grand=["Days"])
    pd.testing.assert_frame_equal(df, before)


# row 7
def test_nonpositive_weights_dropped_with_count(df):
    d = df.copy()
    d.loc[d.index[[1, 2]], "w1"] = 0.0
    d.loc[d.index[3], "w1"] = -1.0
    with pytest.warns(tm.DataWarning, match="3 row"):
        res = fit(F, d, weights=["w1", "w2"])
    assert res.nobs == len(df) - 3
    assert res.ngroups["Subject"] == 18


# row 8
def test_level2_weight_varies_within_group(df):
    d = df.copy()
    d.loc[d.index[d["Subject"] == "309"][:3], "w2"] = 9.0
    with pytest.raises(tm.WeightError, match="'w2'.*'309'"):
        fit(F, d, weights=["w1", "w2"])


# row 10
def test_crossed_factors_are_an_error(df):
    d = df.copy()
    d["day_group"] = (d["Days"] % 3).astype(str)
    with pytest.raises(tm.FormulaError, match="not nested"):
        fit("Reaction ~ Days + (1|Subject) + (1|day_group)", d)


def test_same_number_of_groups_is_an_error(df):
    d = df.copy()
    d["Subject2"] = "s" + d["Subject"]
    with pytest.raises(tm.FormulaError, match="same number of groups"):
        fit("Reaction ~ Days + (1|Subject) + (1|Subject2)", d)


def test_bar_without_parentheses(df):
    with pytest.raises(tm.FormulaError, match="inside parentheses"):
        fit("Reaction ~ Days | Subject", df)


def test_unknown_column(df):
    with pytest.raises(tm.FormulaError, match="'Dayz'"):
        fit("Reaction ~ Dayz + (1|Subject)", df)
    with pytest.raises(tm.FormulaError, match="'Subjekt'"):
        fit("Reaction ~ Days + (1|Subjekt)", df)


# row 11
def test_center_group_errors(df):
    with pytest.raises(tm.DataError, match="'school'"):
        fit(F, df, center_group={"school": ["Days"]})
    with pytest.raises(tm.DataError, match="'nothere'"):
        fit(F, df, center_group={"Subject": ["nothere"]})
    with pytest.raises(tm.DataError, match="center_group"):
        fit(F, df, center_group=["Days"])
    with pytest.raises(tm.DataError, match="'Subject'.*not numeric"):
        fit(F, df, center_grand=["Subject"])


# row 12
def test_start_of_wrong_length(df):
    with pytest.raises(tm.DataError, match="expecting 4"):
        fit(F, df, start=[1.0, 2.0])


def test_start_of_right_length_is_used(df):
    a = fit(F, df)
    b = fit(F, df, start=[250.0, 10.0, 1000.0, 900.0])
    np.testing.assert_allclose(a.lnl, b.lnl, rtol=1e-10)


# row 13
def test_no_random_term(df):
    with pytest.raises(tm.FormulaError, match="no random-effect term"):
        fit("Reaction ~ Days", df)


# row 14
def test_dot_in_grouping_name_is_allowed(df):
    d = df.rename(columns={"Subject": "subject.id"})
    res = fit("Reaction ~ Days + (1|subject.id)", d)
    assert res.ngroups == {"subject.id": 18}


# row 15
def test_singleton_groups_and_all_zero_slope_columns():
    rng = np.random.default_rng(4)
    g = np.repeat(np.arange(30), rng.integers(1, 5, 30))
    x = rng.normal(size=g.size)
    z = np.where(g < 5, 0.0, rng.normal(size=g.size))  # groups 0-4: slope column all zero
    y = 1 + x + rng.normal(size=30)[g] + 0.5 * z * rng.normal(size=30)[g] + rng.normal(size=g.size)
    d = pd.DataFrame({"y": y, "x": x, "z": z, "g": g.astype(str)})
    d = pd.concat([d, pd.DataFrame({"y": [0.3], "x": [0.1], "z": [0.2], "g": ["single"]})], ignore_index=True)
    res = fit("y ~ x + (1 + z|g)", d)
    assert res.converged
    assert np.isfinite(res.lnl) and np.isfinite(res.se).all()
    assert res.ngroups["g"] == 31


# row 16
def test_rank_deficient_x(df):
    d = df.copy()
    d["Days2"] = 2 * d["Days"]
    with pytest.warns(tm.DataWarning, match="Days2"):
        res = fit("Reaction ~ Days + Days2 + (1|Subject)", d)
    assert np.isnan(res.coef["Days2"]) and np.isnan(res.se["Days2"])
    ref = fit(F, df)
    np.testing.assert_allclose(res.lnl, ref.lnl, rtol=1e-10)
    np.testing.assert_allclose(res.coef[["(Intercept)", "Days"]], ref.coef, rtol=1e-7)


def test_bad_options(df):
    with pytest.raises(tm.ConfigError, match="n_quad"):
        fit(F, df, n_quad=0)
    with pytest.raises(tm.ConfigError, match="device"):
        fit(F, df, device="tpu")
    with pytest.raises(tm.ConfigError, match="small_sample"):
        fit(F, df, small_sample="CR2")
    with pytest.raises(TypeError, match="bogus"):
        fit(F, df, bogus=1)


def test_deprecated_arguments_accepted_with_warning(df):
    with pytest.warns(FutureWarning, match="fast"):
        fit(F, df, fast=True)


def test_zero_variance_on_the_boundary():
    rng = np.random.default_rng(8)
    g = np.repeat(np.arange(40), 5)
    x = rng.normal(size=g.size)
    y = 2 + x + rng.normal(size=g.size)  # no group effect at all
    d = pd.DataFrame({"y": y - (pd.Series(y).groupby(g).transform("mean") - y.mean()), "x": x, "g": g.astype(str)})
    with pytest.warns(tm.BoundaryWarning, match="zero"):
        res = fit("y ~ x + (1|g)", d)
    assert res.varcomp["g:(Intercept)"] == 0.0
    assert np.isnan(res.varcomp_se["g:(Intercept)"])
    assert np.isfinite(res.se).all() and np.isfinite(res.varcomp_se["Residual"])


def test_duplicated_plausible_value_columns(df):
    with pytest.raises(tm.ConfigError, match="'Reaction' more than once"):
        fit("y ~ Days + (1|Subject)", df, plausible_values={"y": ["Reaction", "Reaction"]})
