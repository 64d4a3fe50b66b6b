"""p-values, intervals, standard-error types, VarCorr, boundary diagnosis and model comparison.

References: lme4 1.1-31 (``tests/data/lme4_inference_refs.R``, numbers in REFERENCES.md) and
R's ``qt``/``pt``/``qnorm``; the rest are hand computations from the formulas.
"""

import math
import warnings
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

import torchmix as tm
from torchmix.plausible import PooledResults
from torchmix.report.distributions import betainc, norm_cdf, norm_ppf, t_cdf, t_ppf, t_sf2

SLEEP = "Reaction ~ Days + (1 + Days | Subject)"
Q975_17 = 2.10981557783332  # qt(0.975, 17)


def quiet(formula, data, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tm.mix(formula, data, progress=False, **kw)


@pytest.fixture(scope="module")
def ss():
    return tm.load_dataset("sleepstudy")


@pytest.fixture(scope="module")
def fit(ss):
    return quiet(SLEEP, ss)


@pytest.fixture(scope="module")
def fit_model(ss):
    return quiet(SLEEP, ss, se_type="model")


# ---------------------------------------------------------------- distribution functions (R values)
@pytest.mark.parametrize("value,expected", [
    (lambda: t_ppf(0.975, 17), 2.10981557783332),
    (lambda: t_cdf(-2.0, 5), 0.0509697394149291),
    (lambda: norm_ppf(0.975), 1.95996398454005),
    (lambda: t_ppf(0.975, 2.5), 3.57465484200369),
    (lambda: t_ppf(0.999999, 3), 103.299467779429),
    (lambda: t_cdf(1.3, 3.7), 0.865666637913686),
    (lambda: t_ppf(0.995, 123.4), 2.61625836414558),
    (lambda: t_sf2(6.771485, 17), 3.26378663385e-06),
    (lambda: t_cdf(-40.0, 3), 1.71903403946e-05),
    (lambda: t_ppf(1e-10, 7), -53.8355794847),
])
def test_distribution_functions_match_r(value, expected):
    assert value() == pytest.approx(expected, rel=1e-10)


def test_distribution_identities():
    assert betainc(2.0, 3.0, 0.4) == pytest.approx(0.5248, rel=1e-12)  # 1 - sum_{j<2} C(4,j) .4^j .6^(4-j)
    assert t_ppf(0.5, 4) == 0.0 and t_ppf(0.3, 9) == pytest.approx(-t_ppf(0.7, 9), rel=1e-14)
    assert t_sf2(1.7, math.inf) == pytest.approx(2 * (1 - norm_cdf(1.7)), rel=1e-12)
    assert t_cdf(t_ppf(0.025, 0.7), 0.7) == pytest.approx(0.025, rel=1e-10)
    assert t_ppf(0.975, 1) == pytest.approx(math.tan(math.pi * 0.475), rel=1e-12)  # Cauchy
    with pytest.raises(ValueError):
        t_cdf(1.0, 0)


# ---------------------------------------------------------------- se_type="model" = lme4 vcov()
def test_model_se_equals_lme4_vcov_sleepstudy(fit_model, fit):
    # lme4 lmer(REML = FALSE) with a tight optimiser (rhoend 1e-12): sqrt(diag(vcov)).
    np.testing.assert_allclose(fit_model.se.to_numpy(), [6.63227642116, 1.50223679257], rtol=1e-5)
    # lme4's default optimiser stops short of the optimum: 6.632123, 1.502230 (2e-5 relative)
    np.testing.assert_allclose(fit_model.se.to_numpy(), [6.632123, 1.502230], rtol=5e-5)
    np.testing.assert_allclose(fit_model.cov_mat.to_numpy(), fit.vcov_model.to_numpy(), rtol=1e-12)
    # the sandwich is still the default and differs
    assert fit.se["(Intercept)"] == pytest.approx(6.824557, rel=1e-5)
    assert fit_model.lnl == pytest.approx(-875.969672231599, rel=1e-10)


@pytest.mark.slow
def test_model_se_equals_lme4_vcov_contraception():
    r = quiet("use01 ~ age + urban + (1 | district)", tm.load_dataset("contraception"), family="binomial",
              n_quad=13, se_type="model")
    assert r.lnl == pytest.approx(-1250.06257491, rel=1e-8)
    # glmer(nAGQ = 13): sqrt(diag(vcov(g1)))
    np.testing.assert_allclose(r.se.to_numpy(), [0.08560350031523, 0.00540881006273, 0.11566588844163], rtol=1e-5)
    assert r.cov_mat.iloc[0, 2] == pytest.approx(-3.55094213305e-03, rel=1e-4)
    assert np.isfinite(r.varcomp_se.to_numpy()).all()


def test_model_variance_components_are_the_inverse_information(fit_model, fit):
    """The model-based covariance of tau is D (-H)^{-1} D' over (theta, sigma): positive definite and
    different from the sandwich; the summary says which standard errors it prints."""
    vt = fit_model.var_theta.to_numpy()
    assert np.all(np.linalg.eigvalsh(vt) > 0)
    assert not np.allclose(vt, fit.var_theta.to_numpy())
    assert "Standard errors: model-based" in str(fit_model.summary())
    assert "Standard errors" not in str(fit.summary())
    assert "se_type = 'model'" in fit_model.call


def test_bad_se_type_and_df(ss):
    with pytest.raises(tm.ConfigError, match="se_type"):
        tm.mix(SLEEP, ss, se_type="robust", progress=False)
    with pytest.raises(tm.ConfigError, match="df"):
        tm.mix(SLEEP, ss, df="satterthwaite", progress=False)
    with pytest.raises(tm.ConfigError, match="df"):
        tm.mix(SLEEP, ss, df=-1, progress=False)


def test_few_clusters_warning(ss):
    with pytest.warns(tm.SmallSampleWarning, match="18 top-level clusters") as rec:
        tm.mix(SLEEP, ss, progress=False)
    assert issubclass(tm.SmallSampleWarning, tm.TorchmixWarning)
    assert "se_type='model'" in str(rec[0].message)
    assert rec[0].filename == __file__  # points at the caller's line
    with warnings.catch_warnings():
        warnings.simplefilter("error", tm.SmallSampleWarning)
        tm.mix(SLEEP, ss, se_type="model", progress=False)


# ---------------------------------------------------------------- t, p, intervals by hand
def test_t_p_and_intervals_by_hand(fit):
    t = fit.coef / fit.se
    np.testing.assert_allclose(fit.tvalues, t, rtol=1e-14)
    assert (fit.df == 17).all()
    ci = fit.conf_int()
    np.testing.assert_allclose(ci["lower"], fit.coef - Q975_17 * fit.se, rtol=1e-12)
    np.testing.assert_allclose(ci["upper"], fit.coef + Q975_17 * fit.se, rtol=1e-12)
    assert fit.pvalues["Days"] == pytest.approx(3.26378663385e-06, rel=1e-5)  # 2 * pt(-6.771485, 17)
    ci_z = fit.conf_int(0.05, df="normal")
    np.testing.assert_allclose(ci_z["upper"], fit.coef + 1.95996398454005 * fit.se, rtol=1e-12)
    ci90 = fit.conf_int(0.10, df=17)
    np.testing.assert_allclose(ci90["upper"] - fit.coef, 1.73960672607507 * fit.se, rtol=1e-12)  # qt(.95,17)


def test_df_normal_option(ss):
    r = quiet(SLEEP, ss, df="normal")
    assert np.isinf(r.df).all()
    z = r.coef / r.se
    expected = [math.erfc(abs(v) / math.sqrt(2)) for v in z]
    np.testing.assert_allclose(r.pvalues, expected, rtol=1e-12)


def test_variance_intervals_log_sd_scale(fit):
    vc = fit.conf_int_varcomp()
    for name in ["Subject:(Intercept)", "Subject:Days", "Residual"]:
        v, s = fit.varcomp[name], fit.varcomp_se[name]
        half = Q975_17 * s / v  # log SD +- q * s / (2 v), doubled on the variance scale
        assert vc.loc[name, "lower"] == pytest.approx(v * math.exp(-half), rel=1e-12)
        assert vc.loc[name, "upper"] == pytest.approx(v * math.exp(half), rel=1e-12)
        assert vc.loc[name, "sd_cor_lower"] == pytest.approx(math.sqrt(v * math.exp(-half)), rel=1e-12)
        assert vc.loc[name, "lower"] > 0
    # the covariance: Fisher z of the correlation, SE by the delta method
    names = ["Subject:(Intercept)", "Subject:Days", "Subject:(Intercept):Days"]
    va, vb, c = (fit.varcomp[n] for n in names)
    rho = c / math.sqrt(va * vb)
    grad = np.array([-rho / (2 * va), -rho / (2 * vb), 1 / math.sqrt(va * vb)])
    se_rho = math.sqrt(grad @ fit.var_theta.loc[names, names].to_numpy() @ grad)
    z, se_z = math.atanh(rho), se_rho / (1 - rho ** 2)
    row = vc.loc["Subject:(Intercept):Days"]
    assert row["sd_cor"] == pytest.approx(rho, rel=1e-12)
    assert row["sd_cor_lower"] == pytest.approx(math.tanh(z - Q975_17 * se_z), rel=1e-10)
    assert row["sd_cor_upper"] == pytest.approx(math.tanh(z + Q975_17 * se_z), rel=1e-10)
    assert row["upper"] == pytest.approx(row["sd_cor_upper"] * math.sqrt(va * vb), rel=1e-12)


def test_boundary_variance_has_nan_interval():
    rng = np.random.default_rng(8)
    g = np.repeat(np.arange(40), 5)
    x = rng.normal(size=g.size)
    y = 2 + x + rng.normal(size=g.size)
    d = pd.DataFrame({"y": y - (pd.Series(y).groupby(g).transform("mean") - y.mean()), "x": x, "g": g.astype(str)})
    with pytest.warns(tm.BoundaryWarning, match="variance of random effect 1 .* is estimated at zero"):
        r = tm.mix("y ~ x + (1|g)", d, progress=False)
    vc = r.conf_int_varcomp()
    assert np.isnan(vc.loc["g:(Intercept)", ["lower", "upper"]].to_numpy(float)).all()
    assert np.isfinite(vc.loc["Residual", ["lower", "upper"]].to_numpy(float)).all()
    assert r.singular and "g:(Intercept) is estimated at zero" in r.singular_reason


# ---------------------------------------------------------------- to_frame and summaries
def test_to_frame_columns(fit):
    f = fit.to_frame()
    assert list(f.columns) == ["term", "kind", "level", "group", "estimate", "std_error", "t", "df", "p_value",
                               "conf_low", "conf_high"]
    fixed = f[f["kind"] == "fixed"].set_index("term")
    np.testing.assert_allclose(fixed["p_value"], fit.pvalues, rtol=1e-14)
    np.testing.assert_allclose(fixed["conf_low"], fit.conf_int()["lower"], rtol=1e-14)
    assert f.loc[f["kind"] != "fixed", "p_value"].isna().all()
    res = f.set_index("term").loc["Residual"]
    assert res["conf_low"] == pytest.approx(fit.conf_int_varcomp().loc["Residual", "lower"])


def test_default_summary_layout_unchanged_and_extended_view(fit):
    text = str(fit.summary())
    assert "Pr(>|t|)" not in text and "Standard errors" not in text and "Reference distribution" not in text
    assert text.splitlines()[-2].startswith("lnl= ") and "Fixed Effects:" in text
    ext = str(fit.summary(extended=True))
    assert "Standard errors: sandwich (cluster-robust, 18 clusters of Subject" in ext
    assert "t with 17 degrees of freedom" in ext
    assert "Pr(>|t|)" in ext and "2.5%" in ext and "97.5%" in ext
    assert "AIC= 1763.9393" in ext


# ---------------------------------------------------------------- VarCorr, singular fits
def test_varcorr_matches_lme4(fit):
    vc = fit.varcorr
    # as.data.frame(VarCorr(m2)), the tight lme4 fit
    np.testing.assert_allclose(vc["variance"], [565.5152710427, 32.6821976138, 11.0554144586, 654.9410375802],
                               rtol=1e-5)
    np.testing.assert_allclose(vc["sd_cor"], [23.7805649857756, 5.7168345798898, 0.0813199745871, 25.5918158320228],
                               rtol=1e-5)
    assert not fit.singular and fit.singular_reason == ""


def test_correlation_at_minus_one_is_reported_as_such():
    rng = np.random.default_rng(0)
    G, n = 30, 8
    g = np.repeat(np.arange(G), n)
    x = np.tile(np.linspace(-1, 1, n), G)
    a = rng.normal(size=G)
    y = 1 + 0.5 * x + a[g] - 0.8 * a[g] * x + rng.normal(scale=0.5, size=G * n)
    d = pd.DataFrame({"y": y, "x": x, "g": g.astype(str)})
    with pytest.warns(tm.BoundaryWarning) as rec:
        r = tm.mix("y ~ x + (1 + x | g)", d, progress=False)
    msg = " ".join(str(w.message) for w in rec if issubclass(w.category, tm.BoundaryWarning))
    assert "correlation" in msg and "-1" in msg and "variance" not in msg.split("(both")[0]
    assert "estimated at zero" not in msg
    assert r.singular
    assert r.singular_reason == "the correlation of g:(Intercept) and g:x is estimated at -1 (both variances are positive)"
    assert r.varcorr.loc["g:(Intercept):x", "sd_cor"] == pytest.approx(-1.0, abs=1e-6)
    assert (r.varcorr.loc[["g:(Intercept)", "g:x"], "variance"] > 0.5).all()
    assert np.isnan(r.conf_int_varcomp().loc["g:(Intercept):x", "sd_cor_lower"])


# ---------------------------------------------------------------- AIC, BIC, LRT (unit weights)
def test_information_criteria_and_lrt_match_lme4_anova(ss, fit):
    fit0 = quiet("Reaction ~ Days + (1 | Subject)", ss)
    # anova(m0, m1) in lme4
    assert fit.aic == pytest.approx(1763.93934449, rel=1e-9)
    assert fit.bic == pytest.approx(1783.09708559, rel=1e-9)
    assert fit.deviance == pytest.approx(1751.93934449, rel=1e-9)
    assert fit0.aic == pytest.approx(1802.07864301, rel=1e-9)
    assert fit0.bic == pytest.approx(1814.85047041, rel=1e-9)
    test = tm.lrt(fit0, fit)
    assert test.statistic == pytest.approx(2 * (fit.lnl - fit0.lnl), rel=1e-14)
    assert test.statistic == pytest.approx(42.1393, rel=1e-5) and test.df == 2
    assert test.p_value == pytest.approx(7.0724e-10, rel=1e-4)
    assert fit.compare(fit0).statistic == test.statistic
    assert tm.lrt(fit, fit0).statistic == test.statistic  # order does not matter
    assert list(test.table.columns) == ["npar", "AIC", "BIC", "logLik", "deviance", "Chisq", "Df", "Pr(>Chisq)"]


def test_likelihood_comparisons_refuse_sampling_weights(ss, fit):
    w = ss.assign(w1=1.0 + (ss["Days"] % 3) * 0.5, w2=1.0)
    r = quiet(SLEEP, w, weights=["w1", "w2"])
    for attr in ("aic", "bic", "deviance"):
        with pytest.raises(tm.WeightError, match="pseudo-likelihood.*wald_test"):
            getattr(r, attr)
    with pytest.raises(tm.WeightError, match="wald_test"):
        tm.lrt(fit, r)
    other = quiet("Reaction ~ 1 + (1 | Subject)", ss.iloc[:170])
    with pytest.raises(tm.DataError, match="same rows"):
        tm.lrt(other, fit)


# ---------------------------------------------------------------- Wald tests with constraints
def test_wald_constraint_strings(fit):
    b, v = fit.coef, fit.cov_mat
    w = fit.wald_test("Days = 10")
    assert w.statistic == pytest.approx((b["Days"] - 10) ** 2 / v.loc["Days", "Days"], rel=1e-12) and w.df == 1
    R = np.array([[1.0, 0.0], [0.0, 1.0]])
    r = np.array([250.0, 10.0])
    d = R @ b.to_numpy() - r
    expected = d @ np.linalg.solve(R @ v.to_numpy() @ R.T, d)
    assert fit.wald_test("(Intercept) = 250, Days = 10").statistic == pytest.approx(expected, rel=1e-12)
    assert fit.wald_test(["(Intercept) = 250", "Days = 10"]).statistic == pytest.approx(expected, rel=1e-12)
    d1 = b["(Intercept)"] - 20 * b["Days"] - 50
    var1 = v.iloc[0, 0] - 40 * v.iloc[0, 1] + 400 * v.iloc[1, 1]
    assert fit.wald_test("(Intercept) - 20*Days = 50").statistic == pytest.approx(d1 ** 2 / var1, rel=1e-12)
    assert fit.wald_test("(Intercept) = 20 * Days + 50").statistic == pytest.approx(d1 ** 2 / var1, rel=1e-12)
    with pytest.raises(tm.DataError, match="unknown coefficient"):
        fit.wald_test("Nights = 0")
    with pytest.raises(tm.DataError, match="linearly dependent"):
        fit.wald_test("Days = 0, 2*Days = 0")


def test_wald_drops_aliased_columns(ss):
    d = ss.assign(Days2=2.0 * ss["Days"], z=np.sin(np.arange(len(ss))))
    r = quiet("Reaction ~ Days + Days2 + z + (1 | Subject)", d)
    assert np.isnan(r.coef["Days2"])
    w = r.wald_test()
    assert np.isfinite(w.statistic) and w.df == 2 and w.terms == ["Days", "z"]
    with pytest.warns(tm.TorchmixWarning, match="Days2"):
        w2 = r.wald_test(["Days", "Days2"])
    assert w2.df == 1
    with pytest.raises(tm.DataError, match="aliased"):
        r.wald_test("Days = Days2")
    assert r.wald_test("Days = z").df == 1


# ---------------------------------------------------------------- pooled results: Barnard-Rubin
def _fake_fit(estimate, se, df_rule="cluster"):
    names = ["x"]
    var_df = pd.DataFrame({"name": ["g:(Intercept)"], "level": [2], "group": ["g"], "var1": ["(Intercept)"],
                           "var2": [""], "estimate": [1.0], "se": [0.2], "ngroups": [21]})
    return SimpleNamespace(
        coef=pd.Series([estimate], index=names), cov_mat=pd.DataFrame([[se ** 2]], index=names, columns=names),
        varcomp=pd.Series([1.0], index=["g:(Intercept)"]), varcomp_se=pd.Series([0.2], index=["g:(Intercept)"]),
        var_theta=pd.DataFrame([[0.04]], index=["g:(Intercept)"], columns=["g:(Intercept)"]), var_df=var_df,
        nobs=200, ngroups={"g": 21}, levels=2, family=None, notes=[], converged=True, lnl=-1.0, call="mix()",
        formula="y ~ x + (1|g)", options={"df": df_rule, "se_type": "sandwich"}, icc=None)


def test_pooled_barnard_rubin_df_by_hand():
    p = PooledResults([_fake_fit(e, 0.1) for e in (1.0, 1.2, 1.4)], ["a", "b", "c"])
    # by hand (and in R, tests/data/lme4_inference_refs.R): U = 0.01, B = 0.04, T = U + (4/3) B
    T = 0.01 + 4 / 3 * 0.04
    lam = 4 / 3 * 0.04 / T
    nu_old = 2 / lam ** 2
    nu_obs = 21 / 23 * 20 * (1 - lam)  # complete-data df = 21 clusters - 1
    nu = 1 / (1 / nu_old + 1 / nu_obs)
    assert nu == pytest.approx(1.4257280503515, rel=1e-12)
    assert p.df["x"] == pytest.approx(nu, rel=1e-12)
    assert p.se["x"] == pytest.approx(math.sqrt(T), rel=1e-12)
    assert p.conf_int().loc["x", "upper"] == pytest.approx(1.2 + 6.4758478059652 * math.sqrt(T), rel=1e-10)
    assert p.pvalues["x"] == pytest.approx(0.0762887099244, rel=1e-9)
    pz = PooledResults([_fake_fit(e, 0.1, "normal") for e in (1.0, 1.2, 1.4)], ["a", "b", "c"])
    assert pz.conf_int().loc["x", "upper"] == pytest.approx(1.2 + 1.95996398454005 * math.sqrt(T), rel=1e-12)
    with pytest.raises(tm.DataError, match="plausible values"):
        p.aic


def test_model_variance_components_closed_form_balanced(ss):
    """Balanced one-way model (18 subjects x 10 days), unit weights: with lambda1 = sigma^2 and
    lambda2 = sigma^2 + n tau the information at fixed beta is diagonal, G(n-1)/(2 lambda1^2) and
    G/(2 lambda2^2), so Var(sigma^2) = 2 lambda1^2/(G(n-1)), Var(tau) = (Var lambda1 + Var lambda2)/n^2
    and Cov(tau, sigma^2) = -Var(lambda1)/n."""
    r = quiet("Reaction ~ Days + (1 | Subject)", ss, se_type="model")
    G, n = 18, 10
    tau, s2 = r.varcomp["Subject:(Intercept)"], r.varcomp["Residual"]
    l1, l2 = s2, s2 + n * tau
    v1, v2 = 2 * l1 ** 2 / (G * (n - 1)), 2 * l2 ** 2 / G
    assert r.varcomp_se["Residual"] == pytest.approx(math.sqrt(v1), rel=1e-6)
    assert r.varcomp_se["Subject:(Intercept)"] == pytest.approx(math.sqrt((v1 + v2) / n ** 2), rel=1e-6)
    assert r.var_theta.loc["Residual", "Subject:(Intercept)"] == pytest.approx(-v1 / n, rel=1e-6)


@pytest.mark.slow
def test_model_se_and_aic_equal_lme4_glmer_sleepstudy_logit(ss):
    r = quiet("y ~ Days + (1 | Subject)", ss.assign(y=(ss["Reaction"] > 300).astype(float)), family="binomial",
              n_quad=13, se_type="model")
    # glmer(nAGQ = 13): logLik -86.9904228585, sqrt(diag(vcov)), AIC, BIC
    np.testing.assert_allclose(r.se.to_numpy(), [0.6893709669828, 0.0981790097934], rtol=1e-5)
    assert r.aic == pytest.approx(179.980845717, rel=1e-8)
    assert r.bic == pytest.approx(189.55971627, rel=1e-8)


def test_design_based_standard_errors_use_the_design_degrees_of_freedom(ss):
    subjects = sorted(ss["Subject"].unique())
    d = ss.assign(st=ss["Subject"].map({s: i % 3 for i, s in enumerate(subjects)}))
    r = quiet(SLEEP, d, strata="st", psu="Subject")
    assert r.se_type == "linearization" and (r.df == 15).all()  # 18 PSUs - 3 strata
    np.testing.assert_allclose(r.conf_int()["upper"], r.coef + 2.13144954555978 * r.se, rtol=1e-12)  # qt(.975, 15)
    assert "design degrees of freedom" in str(r.summary(extended=True))
