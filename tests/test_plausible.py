"""Plausible values and survey weighting through ``torchmix.mix`` on PISA 2012 New Zealand.

Model: ``PV?MATH ~ ST04Q01 + MATHEFF + (1 | SCHOOLID)`` (2,790 students, 177 schools after
dropping rows with a missing ``MATHEFF``).
"""

import warnings

import numpy as np
import pytest

import torchmix
from torchmix.api import mix
from torchmix.plausible import PooledResults, fit_plausible_values, warm_start

PVS = [f"PV{k}MATH" for k in range(1, 6)]
RHS = "ST04Q01 + MATHEFF + (1 | SCHOOLID)"
RTOL = 1e-8  # gaussian closed form (MATH.md 12)


def quiet(formula, data, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return mix(formula, data, progress=False, **kw)


@pytest.fixture(scope="module")
def nz():
    return torchmix.load_dataset("pisa2012_nz")


@pytest.fixture(scope="module")
def clean(nz):
    """The rows every fit here uses, found independently of torchmix."""
    return nz.dropna(subset=["ST04Q01", "MATHEFF", "SCHOOLID", "W_FSTUWT", "W_FSCHWT"] + PVS).copy()


@pytest.fixture(scope="module")
def single_uncond(nz):
    return quiet(f"PV1MATH ~ {RHS}", nz, weights=["W_FSTUWT", "W_FSCHWT"])


@pytest.fixture(scope="module")
def pooled(nz):
    return quiet(f"math ~ {RHS}", nz, survey="PISA", plausible_values={"math": PVS})


@pytest.fixture(scope="module")
def singles(nz):
    return [quiet(f"{pv} ~ {RHS}", nz, survey="PISA") for pv in PVS]


def assert_same_fit(a, b, rtol=RTOL):
    np.testing.assert_allclose(a.coef.to_numpy(), b.coef.to_numpy(), rtol=rtol)
    np.testing.assert_allclose(a.se.to_numpy(), b.se.to_numpy(), rtol=rtol * 10)
    np.testing.assert_allclose(a.varcomp.to_numpy(), b.varcomp.to_numpy(), rtol=rtol * 10)
    np.testing.assert_allclose(a.varcomp_se.to_numpy(), b.varcomp_se.to_numpy(), rtol=rtol * 1e3)


# ---------------------------------------------------------------------------------------------
# weights on real data
# ---------------------------------------------------------------------------------------------

def test_v7_conditional_equals_unconditional_on_pisa(nz, single_uncond):
    cond = quiet(f"PV1MATH ~ {RHS}", nz, weights=["condwt", "W_FSCHWT"], cweights=True)
    assert single_uncond.nobs == cond.nobs == 2790
    assert single_uncond.ngroups == cond.ngroups == {"SCHOOLID": 177}
    assert single_uncond.converged and cond.converged
    assert_same_fit(single_uncond, cond)
    assert abs(single_uncond.lnl - cond.lnl) <= 1e-8 * abs(cond.lnl)


def test_timss_scaling_is_no_scaling(nz, single_uncond):
    timss = quiet(f"PV1MATH ~ {RHS}", nz, weights=["W_FSTUWT", "W_FSCHWT"], scaling="timss")
    assert_same_fit(single_uncond, timss)
    assert abs(single_uncond.lnl - timss.lnl) <= 1e-8 * abs(timss.lnl)


def test_pisa_preset_is_method_a_on_cleaned_rows(clean, singles):
    d = clean.copy()
    d["pwtA"] = d["W_FSTUWT"] * d.groupby("SCHOOLID")["W_FSTUWT"].transform(lambda s: len(s) / s.sum())
    manual = quiet(f"PV1MATH ~ {RHS}", d, weights=["pwtA", "W_FSCHWT"], cweights=True)
    assert_same_fit(singles[0], manual)
    assert any("method A" in n for n in singles[0].notes)


def test_edsurvey_compat_pisa_is_method_b_passed_as_unconditional(nz, clean):
    """E1 + E3: EdSurvey hands a method-B weight to WeMix as an *unconditional* level-1 weight."""
    d = clean.copy()
    g = d.groupby("SCHOOLID")["W_FSTUWT"]
    d["pwt1"] = d["W_FSTUWT"] * g.transform("sum") / g.transform(lambda s: (s * s).sum())
    manual = quiet(f"PV1MATH ~ {RHS}", d, weights=["pwt1", "W_FSCHWT"])
    compat = quiet(f"PV1MATH ~ {RHS}", nz, survey="pisa", edsurvey_compat=True)
    assert_same_fit(compat, manual)
    assert abs(compat.lnl - manual.lnl) <= 1e-8 * abs(manual.lnl)


# ---------------------------------------------------------------------------------------------
# pooling five plausible values
# ---------------------------------------------------------------------------------------------

def test_pooled_coefficients_are_the_mean_of_single_fits(pooled, singles):
    assert isinstance(pooled, PooledResults)
    assert pooled.n_pv == 5 and pooled.pv_columns == PVS and len(pooled.fits) == 5
    assert pooled.converged and pooled.lnl is None
    # each warm-started fit equals the cold single fit of the same value
    for fit, single in zip(pooled.fits, singles):
        assert_same_fit(fit, single, rtol=1e-7)
    mean_coef = np.mean([s.coef.to_numpy() for s in singles], axis=0)
    np.testing.assert_allclose(pooled.coef.to_numpy(), mean_coef, rtol=1e-7)
    mean_vc = np.mean([s.varcomp.to_numpy() for s in singles], axis=0)
    np.testing.assert_allclose(pooled.varcomp.to_numpy(), mean_vc, rtol=1e-6)


def test_pooled_standard_errors_follow_rubin(pooled):
    k = 5
    est = np.array([f.coef.to_numpy() for f in pooled.fits])
    se = np.array([f.se.to_numpy() for f in pooled.fits])
    v_imp = (k + 1) / ((k - 1) * k) * ((est - est.mean(0)) ** 2).sum(0)
    v_samp = (se ** 2).mean(0)
    np.testing.assert_allclose(pooled.coef.to_numpy(), est.mean(0), rtol=1e-14)
    np.testing.assert_allclose(pooled.se.to_numpy(), np.sqrt(v_imp + v_samp), rtol=1e-12)
    np.testing.assert_allclose(pooled.var_imputation.iloc[:3].to_numpy(), v_imp, rtol=1e-12)
    np.testing.assert_allclose(pooled.var_sampling.iloc[:3].to_numpy(), v_samp, rtol=1e-12)
    assert np.all(v_imp > 0)
    # matrix form: the diagonal of T is the scalar rule
    np.testing.assert_allclose(np.diag(pooled.cov_mat.to_numpy()), v_imp + v_samp, rtol=1e-12)
    vc = np.array([f.varcomp.to_numpy() for f in pooled.fits])
    vc_se = np.array([f.varcomp_se.to_numpy() for f in pooled.fits])
    vc_imp = (k + 1) / ((k - 1) * k) * ((vc - vc.mean(0)) ** 2).sum(0)
    np.testing.assert_allclose(pooled.varcomp_se.to_numpy(), np.sqrt(vc_imp + (vc_se ** 2).mean(0)), rtol=1e-12)
    # Barnard-Rubin df with complete-data df = 177 schools - 1, and below it
    assert pooled.df_complete == 176
    assert np.all((pooled.df > 0) & (pooled.df < 176))
    assert np.all((pooled.fmi > 0) & (pooled.fmi < 1))


def test_pooled_icc_is_mean_of_per_value_iccs(pooled):
    iccs = [f.icc for f in pooled.fits]
    assert abs(pooled.icc - sum(iccs) / 5) < 1e-15
    tau, sigma2 = pooled.varcomp.iloc[0], pooled.varcomp.iloc[-1]
    assert abs(pooled.icc - tau / (tau + sigma2)) > 1e-6  # not the ICC of the averaged variances
    assert 0 < pooled.icc < 1


def test_pooled_summary_layout(pooled):
    text = str(pooled.summary())
    for piece in ["Call:", "Formula: math ~", "Plausible Values: 5", "Number of Groups:", "Variance terms:",
                  "Fixed Effects:", "SCHOOLID:(Intercept)", "Residual", "MATHEFF", "method A"]:
        assert piece in text, piece
    assert "lnl=" not in text
    icc_line = [ln for ln in text.splitlines() if ln.startswith("Intraclass Correlation= ")]
    assert icc_line and icc_line[0] == f"Intraclass Correlation= {pooled.icc:.3f}"
    groups = text.split("Number of Groups:")[1].split("Variance terms:")[0]
    assert "177" in groups and "2790" in groups


def test_pooled_to_frame_adds_rubin_split(pooled):
    fr = pooled.to_frame()
    assert list(fr["term"]) == list(pooled.coef.index) + list(pooled.varcomp.index)
    for col in ["estimate", "std_error", "t", "var_sampling", "var_imputation", "fmi", "df"]:
        assert col in fr.columns
    np.testing.assert_allclose(fr["std_error"] ** 2, fr["var_sampling"] + fr["var_imputation"], rtol=1e-12)
    np.testing.assert_allclose(fr["estimate"].iloc[:3], pooled.coef.to_numpy(), rtol=0)


def test_pooled_ranef_predict_and_wald(pooled, clean):
    re = pooled.ranef["SCHOOLID"]
    mean_re = sum(f.ranef["SCHOOLID"] for f in pooled.fits) / 5
    np.testing.assert_allclose(re.to_numpy(), mean_re.to_numpy(), rtol=1e-14)
    pred = pooled.predict(clean.head(20))
    mean_pred = np.mean([f.predict(clean.head(20)).to_numpy() for f in pooled.fits], axis=0)
    np.testing.assert_allclose(pred.to_numpy(), mean_pred, rtol=1e-14)
    w = pooled.wald_test(["MATHEFF"])
    expected = pooled.coef["MATHEFF"] ** 2 / pooled.cov_mat.loc["MATHEFF", "MATHEFF"]
    assert abs(w.statistic - expected) < 1e-9 * expected


def test_v14_identical_values_equal_the_single_fit(nz, single_uncond):
    twin = nz.assign(PV1MATH_copy=nz["PV1MATH"])
    same = quiet(f"math ~ {RHS}", twin, weights=["W_FSTUWT", "W_FSCHWT"],
                 plausible_values={"math": ["PV1MATH", "PV1MATH_copy"]})
    assert same.n_pv == 2
    # warm start from the optimum: the second fit is the first to optimiser precision
    assert np.all(same.var_imputation.to_numpy() <= 1e-12 * same.var_sampling.to_numpy())
    assert_same_fit(same, single_uncond, rtol=1e-8)
    np.testing.assert_allclose(same.var_sampling.iloc[:3].to_numpy(), single_uncond.se.to_numpy() ** 2, rtol=1e-7)
    assert abs(same.icc - single_uncond.icc) < 1e-9


def test_single_value_reduces_to_the_fit(single_uncond):
    one = PooledResults([single_uncond], ["PV1MATH"], response="math")
    assert one.n_pv == 1 and one.lnl == single_uncond.lnl
    np.testing.assert_array_equal(one.coef.to_numpy(), single_uncond.coef.to_numpy())
    np.testing.assert_allclose(one.se.to_numpy(), single_uncond.se.to_numpy(), rtol=1e-15)
    np.testing.assert_allclose(one.cov_mat.to_numpy(), single_uncond.cov_mat.to_numpy(), rtol=0)
    assert np.all(one.var_imputation == 0)
    text = str(one.summary())
    assert "Plausible Values" not in text and "lnl=" in text


# ---------------------------------------------------------------------------------------------
# the fitting loop, with a stub fit_one (no fitting cost)
# ---------------------------------------------------------------------------------------------

def test_loop_warm_starts_suppresses_later_warnings_and_shows_progress(pooled, capsys):
    calls = []

    def fit_one(prepared, y, start=None):
        calls.append(start)
        warnings.warn(f"warning from value {y}", UserWarning)
        return pooled.fits[y]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = fit_plausible_values(None, {"a": 0, "b": 1, "c": 2}, fit_one, progress=True)
    assert [str(w.message) for w in caught] == ["warning from value 0"]
    assert calls[0] is None
    np.testing.assert_array_equal(calls[1], warm_start(pooled.fits[0]))
    np.testing.assert_array_equal(calls[2], warm_start(pooled.fits[1]))
    assert len(calls[1]) == 3 + 2  # beta, then tau with the residual last
    assert res.n_pv == 3 and res.pv_columns == ["a", "b", "c"]
    assert "plausible values" in capsys.readouterr().err
    fit_plausible_values(None, {"a": 0, "b": 1}, lambda p, y, start=None: pooled.fits[y], progress=False)
    assert "plausible values" not in capsys.readouterr().err


def test_plausible_values_with_a_logit_model(nz):
    """Any family: K binary outcomes (PVk > 480) pooled the same way."""
    d = nz.assign(**{f"pass{k}": (nz[f"PV{k}MATH"] > 480).astype(float) for k in (1, 2, 3)})
    kw = dict(weights=["W_FSTUWT", "W_FSCHWT"], family="binomial")
    pooled = quiet("passed ~ ST04Q01 + MATHEFF + (1 | SCHOOLID)", d,
                   plausible_values={"passed": ["pass1", "pass2", "pass3"]}, **kw)
    single = quiet("pass3 ~ ST04Q01 + MATHEFF + (1 | SCHOOLID)", d, **kw)
    assert pooled.n_pv == 3 and pooled.converged and pooled.icc is None
    # the warm-started third fit equals the cold single fit
    assert_same_fit(pooled.fits[2], single, rtol=1e-6)
    est = np.array([f.coef.to_numpy() for f in pooled.fits])
    se = np.array([f.se.to_numpy() for f in pooled.fits])
    np.testing.assert_allclose(pooled.coef.to_numpy(), est.mean(0), rtol=1e-14)
    v_imp = 4 / 6 * ((est - est.mean(0)) ** 2).sum(0)
    np.testing.assert_allclose(pooled.se.to_numpy(), np.sqrt(v_imp + (se ** 2).mean(0)), rtol=1e-12)
    assert list(pooled.varcomp.index) == ["SCHOOLID:(Intercept)"]
    assert "Plausible Values: 3" in str(pooled.summary())
