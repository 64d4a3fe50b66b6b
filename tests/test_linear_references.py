"""Linear mixed models against published reference numbers.

Sources: MATH.md section 12 (a)-(d) (WeMix 4.0.3; (d) also Stata ``mixed`` to 1e-3) and lme4
``lmer(REML=FALSE)`` on hsb82 (issue acceptance numbers)."""

from __future__ import annotations

import numpy as np

import torchmix as tm


def rel(a, b):
    return np.max(np.abs(np.asarray(a, float) - np.asarray(b, float)) / np.abs(np.asarray(b, float)))


def test_sleepstudy_a_unit_weights():
    res = tm.mix("Reaction ~ Days + (1|Subject)", tm.load_dataset("sleepstudy"), progress=False)
    assert res.converged
    assert rel(res.lnl, -897.03932) < 1e-6
    assert rel(res.coef, [251.4051, 10.46729]) < 1e-5
    assert rel(res.varcomp, [1296.8768, 954.52789]) < 1e-5
    assert list(res.varcomp.index) == ["Subject:(Intercept)", "Residual"]


def test_sleepstudy_b_level1_weights():
    df = tm.load_dataset("sleepstudy")
    df["w1"] = np.where(df["Subject"].isin(["308", "309", "310"]), 2.0, 1.0)
    df["w2"] = 1.0
    res = tm.mix("Reaction ~ Days + (1|Subject)", df, weights=["w1", "w2"], progress=False)
    assert rel(res.lnl, -1048.34318) < 1e-6


def test_sleepstudy_c_random_slope_with_ses(sleep_w):
    res = tm.mix("Reaction ~ Days + (1 + Days|Subject)", sleep_w, weights=["w1", "w2"], progress=False)
    assert res.converged
    assert rel(res.lnl, -1656.886777) < 1e-6
    assert rel(res.coef, [248.3606191, 10.98035162]) < 1e-5
    assert rel(res.se, [7.409949663, 1.576110133]) < 1e-4
    assert rel(res.varcomp, [736.2244, 37.72848, -26.19468, 499.7978]) < 1e-5
    assert rel(res.varcomp_se, [184.2361, 11.25074, 48.41357, 142.2167]) < 1e-4
    assert list(res.varcomp.index) == ["Subject:(Intercept)", "Subject:Days", "Subject:(Intercept):Days", "Residual"]


def test_sleepstudy_c_conditional_input_is_identical(sleep_w):
    a = tm.mix("Reaction ~ Days + (1 + Days|Subject)", sleep_w, weights=["w1", "w2"], progress=False)
    b = tm.mix("Reaction ~ Days + (1 + Days|Subject)", sleep_w, weights=["c1", "c2"], cweights=True,
               progress=False)
    np.testing.assert_allclose(b.lnl, a.lnl, rtol=1e-10)
    np.testing.assert_allclose(b.se, a.se, rtol=1e-7)


def test_sleepstudy_d_three_levels(sleep3):
    res = tm.mix("Reaction ~ Days + (1|Subject) + (1|Group)", sleep3, weights=["c1", "c2", "c3"], cweights=True,
                 progress=False)
    assert res.converged
    assert res.ngroups == {"Subject": 18, "Group": 4}
    assert rel(res.lnl, -1389.09828) < 1e-6
    assert rel(res.coef, [243.68315, 12.679538]) < 1e-5
    assert rel(res.varcomp, [360.9699, 756.5480, 1153.7053]) < 1e-5
    assert rel(res.se, [11.688795, 2.4684745]) < 1e-4
    assert list(res.varcomp.index) == ["Subject:(Intercept)", "Group:(Intercept)", "Residual"]


def test_hsb82_unit_weights_equal_lme4_ml():
    df = tm.load_dataset("hsb82")
    res = tm.mix("mAch ~ meanses + cses + C(sector, levels=['Public', 'Catholic']) + (1 + cses | school)", df,
                 progress=False)
    assert res.converged
    assert rel(res.lnl, -23269.0714738216) < 1e-8
    assert rel(res.coef, [12.0636631, 5.2454039, 2.1949720, 1.3719031]) < 1e-4
    assert rel(res.varcomp, [2.3224279, 0.6850044, 0.2298005, 36.7099625]) < 1e-3


def test_hsb82_weights_of_one_equal_no_weights():
    df = tm.load_dataset("hsb82")
    df["one1"], df["one2"] = 1.0, 1.0
    a = tm.mix("mAch ~ meanses + cses + (1 + cses | school)", df, progress=False)
    b = tm.mix("mAch ~ meanses + cses + (1 + cses | school)", df, weights=["one1", "one2"], progress=False)
    np.testing.assert_allclose(a.lnl, b.lnl, rtol=1e-12)
    np.testing.assert_allclose(a.se, b.se, rtol=1e-8)


def test_summary_layout(sleep_w):
    res = tm.mix("Reaction ~ Days + (1 + Days|Subject)", sleep_w, weights=["w1", "w2"], progress=False)
    text = str(res.summary())
    for piece in ["Call:", "Variance terms:", "Groups:", "Fixed Effects:", "lnl= -1656.8868",
                  "Intraclass Correlation=", "Corr1", "Std. Error", "Residual", "mean wgt", "sum wgt"]:
        assert piece in text
    frame = res.to_frame()
    assert list(frame.columns) == ["term", "kind", "level", "group", "estimate", "std_error", "t", "df", "p_value",
                                   "conf_low", "conf_high"]
    assert (frame["kind"] == "fixed").sum() == 2 and (frame["kind"] == "covariance").sum() == 1
    # weights table: unconditional weights, level 1 rows and one value per level-2 group
    np.testing.assert_allclose(res.wgt_stats.loc["Obs", "sum"], sleep_w["w1"].sum())
    np.testing.assert_allclose(res.wgt_stats.loc["Subject", "sum"], sleep_w.groupby("Subject")["w2"].first().sum())
