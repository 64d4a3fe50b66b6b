"""Formula parsing (lme4 bars), design construction, centering and prediction."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import torchmix as tm
from torchmix.formula import parse_formula


def test_parse_bars():
    p = parse_formula("y ~ x + I(x**2) + poly(x, 2) + (1 + x | g) + (z || a/b) - 1")
    assert p.response == "y"
    assert p.fixed == "x + I(x**2) + poly(x, 2) - 1"
    assert [(t.expr, t.group, t.independent) for t in p.random] == [
        ("1 + x", "g", False), ("z", "a", True), ("z", "a:b", True)]
    assert p.random[2].group_vars == ("a", "b")
    assert parse_formula("y ~ (1 | a:b)").random[0].group_vars == ("a", "b")
    assert parse_formula("y ~ (1 | g)").fixed == "1"


@pytest.mark.parametrize("bad", ["y ~ x | g", "y ~ x", "y ~ (|g)", "y x (1|g)", "y ~ (1|g", "~ (1|g)"])
def test_parse_errors(bad):
    with pytest.raises(tm.FormulaError):
        parse_formula(bad)


def test_double_bar_equals_separate_terms(sleep_w):
    a = tm.mix("Reaction ~ Days + (Days || Subject)", sleep_w, weights=["w1", "w2"], progress=False)
    b = tm.mix("Reaction ~ Days + (1|Subject) + (0 + Days|Subject)", sleep_w, weights=["w1", "w2"], progress=False)
    np.testing.assert_allclose(a.lnl, b.lnl, rtol=1e-10)
    assert list(a.varcomp.index) == ["Subject:(Intercept)", "Subject:Days", "Residual"]
    np.testing.assert_allclose(a.varcomp, b.varcomp, rtol=1e-6)
    np.testing.assert_allclose(a.varcomp_se, b.varcomp_se, rtol=1e-5)


def test_nested_slash_equals_explicit_interaction(sleep3):
    # school-local ids: the same Subject label under different Groups must be written a/b
    d = sleep3.copy()
    d["local"] = d.groupby("Group")["Subject"].transform(lambda s: pd.factorize(s)[0]).astype(str)
    with pytest.raises(tm.FormulaError, match="not nested"):
        tm.mix("Reaction ~ Days + (1|Group) + (1|local)", d, progress=False)
    a = tm.mix("Reaction ~ Days + (1|Group/local)", d, progress=False)
    b = tm.mix("Reaction ~ Days + (1|Group) + (1|Group:local)", d, progress=False)
    c = tm.mix("Reaction ~ Days + (1|Group) + (1|Subject)", d, progress=False)
    np.testing.assert_allclose(a.lnl, b.lnl, rtol=1e-12)
    np.testing.assert_allclose(a.lnl, c.lnl, rtol=1e-10)
    assert a.ngroups == {"Group:local": 18, "Group": 4}


def test_factor_treatment_contrasts_first_level_reference():
    df = tm.load_dataset("hsb82")
    res = tm.mix("mAch ~ ses + sector + (1|school)", df, progress=False)
    assert "sector[T.Public]" in res.coef.index  # 'Catholic' sorts first and is the reference


def test_group_mean_centering_matches_manual(sleep_w):
    d = sleep_w.copy()
    w = d["w1"]
    means = (d["Days"] * w).groupby(d["Subject"]).sum() / w.groupby(d["Subject"]).sum()
    d["Days_c"] = d["Days"] - d["Subject"].map(means)
    a = tm.mix("Reaction ~ Days + (1|Subject)", sleep_w, weights=["w1", "w2"], center_group={"Subject": ["Days"]},
               progress=False)
    b = tm.mix("Reaction ~ Days_c + (1|Subject)", d, weights=["w1", "w2"], progress=False)
    np.testing.assert_allclose(a.lnl, b.lnl, rtol=1e-10)
    np.testing.assert_allclose(a.coef.to_numpy(), b.coef.to_numpy(), rtol=1e-8)


def test_grand_mean_centering_uses_unconditional_weights(sleep_w):
    d = sleep_w.copy()
    d["Days_c"] = d["Days"] - np.average(d["Days"], weights=d["w1"])
    a = tm.mix("Reaction ~ Days + (1|Subject)", sleep_w, weights=["c1", "c2"], cweights=True,
               center_grand=["Days"], progress=False)
    b = tm.mix("Reaction ~ Days_c + (1|Subject)", d, weights=["w1", "w2"], progress=False)
    np.testing.assert_allclose(a.coef.to_numpy(), b.coef.to_numpy(), rtol=1e-8)


def test_predict_new_levels(sleep_w):
    res = tm.mix("Reaction ~ Days + (1 + Days|Subject)", sleep_w, weights=["w1", "w2"], progress=False)
    fitted = res.predict()
    np.testing.assert_allclose(res.predict(sleep_w).to_numpy(), fitted.loc[sleep_w.index].to_numpy(), rtol=1e-10)
    new = pd.DataFrame({"Days": [1.0, 2.0, np.nan], "Subject": ["308", "999", "308"]})
    with pytest.raises(tm.DataError, match="allow_new_levels"):
        res.predict(new)
    pred = res.predict(new, allow_new_levels=True)
    b = res.ranef["Subject"].loc["308"]
    np.testing.assert_allclose(pred.iloc[0], res.coef.iloc[0] + b.iloc[0] + (res.coef.iloc[1] + b.iloc[1]) * 1.0)
    np.testing.assert_allclose(pred.iloc[1], res.coef.iloc[0] + res.coef.iloc[1] * 2.0)
    assert np.isnan(pred.iloc[2])


def test_wald_test_single_coefficient_is_t_squared(sleep_w):
    res = tm.mix("Reaction ~ Days + (1 + Days|Subject)", sleep_w, weights=["w1", "w2"], progress=False)
    w = res.wald_test(["Days"])
    np.testing.assert_allclose(w.statistic, (res.coef["Days"] / res.se["Days"]) ** 2, rtol=1e-10)
    assert w.df == 1 and 0 <= w.p_value < 1e-6
    lam = res.wald_test(["Subject:Days"], type="Lambda")
    np.testing.assert_allclose(lam.statistic, (res.varcomp["Subject:Days"] / res.varcomp_se["Subject:Days"]) ** 2)


def test_icc_random_intercept():
    res = tm.mix("Reaction ~ Days + (1|Subject)", tm.load_dataset("sleepstudy"), progress=False)
    tau, s2 = res.varcomp.iloc[0], res.varcomp.iloc[1]
    np.testing.assert_allclose(res.icc, tau / (tau + s2), rtol=1e-12)
    np.testing.assert_allclose(res.icc_level["Subject"], tau / (tau + s2), rtol=1e-12)
