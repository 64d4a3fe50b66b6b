"""GLMM fits: published references (MATH.md 12 (c), (e); contraception vs lme4), outputs, bad input."""

import math
import warnings

import numpy as np
import pytest
import torch

import torchmix as tm
from conftest import sleepstudy_weighted
from glmm_support import CauchitLink, brute_force_loglik, frame_tensors, one_thread, simulate  # noqa: F401
from torchmix.errors import BoundaryWarning, ConfigError, ConvergenceWarning, DataError
from torchmix.families import get_family
from torchmix.fit.glmm import fit_glmm
from torchmix.likelihood.agq import AGQLogLik

SLEEP = "I(Reaction > 300) ~ Days + (1 | Subject)"


@pytest.fixture(scope="module")
def sleep_c():
    """Reference (c): deterministic weights c1 = 1 + 0.5 (Days mod 3), c2 = 1 + 0.25 ((s-1) mod 4)."""
    return tm.mix(SLEEP, sleepstudy_weighted(), weights=["w1", "w2"], family="binomial", n_quad=13, progress=False)


def test_reference_c_weighted_logit(sleep_c):
    r = sleep_c
    assert r.converged
    assert r.lnl == pytest.approx(-155.1742981, rel=1e-8)
    np.testing.assert_allclose(r.coef.to_numpy(), [-3.760377723, 0.6984039577], rtol=1e-6)
    np.testing.assert_allclose(r.se.to_numpy(), [1.059385539, 0.167158936], rtol=1e-5)
    assert list(r.varcomp.index) == ["Subject:(Intercept)"]
    assert r.varcomp.iloc[0] == pytest.approx(3.94217644, rel=1e-6)
    assert r.varcomp_se.iloc[0] == pytest.approx(2.952804819, rel=1e-5)
    assert r.n_quad == 13


def test_reference_c_outputs(sleep_c):
    r = sleep_c
    out = r._out
    # scores sum to zero at the optimum (V10) and the sandwich is built from them
    scores = out.scores.numpy()
    assert scores.shape == (18, 3)
    assert np.abs(scores.sum(0)).max() < 1e-6 * np.abs(scores).max()
    # sign-normalised absolute Cholesky factor, modes and predictions b = Lambda u
    assert float(out.theta[0][0]) == pytest.approx(math.sqrt(3.94217644), rel=1e-6)
    ranef = r.ranef["Subject"]
    assert ranef.shape == (18, 1)
    np.testing.assert_allclose(ranef.to_numpy(), out.u[0].numpy() * float(out.theta[0][0]), rtol=1e-12)
    eta = r.predict()
    mu = r.predict(type="response")
    np.testing.assert_allclose(mu, 1 / (1 + np.exp(-np.asarray(eta))), rtol=1e-12)
    assert np.all((mu > 0) & (mu < 1))
    text = str(r.summary())
    assert "Fixed Effects" in text and "Subject" in text
    assert out.cov_beta_model.shape == (2, 2) and out.extra["n_quad"] == 13


def test_reference_e_unit_weights_glmer_nagq13():
    r = tm.mix(SLEEP, tm.load_dataset("sleepstudy"), family="binomial", n_quad=13, progress=False)
    assert r.converged
    assert r.lnl == pytest.approx(-86.990422858, rel=1e-9)
    np.testing.assert_allclose(r.coef.to_numpy(), [-3.195817792, 0.584923249], rtol=1e-4)
    assert r.varcomp.iloc[0] == pytest.approx(3.096541344, rel=1e-4)


def test_contraception_matches_lme4_nagq13():
    df = tm.load_dataset("contraception")
    r = tm.mix("use01 ~ age + I(age**2) + urban + livch + (1 | district)", df, family="binomial", n_quad=13,
               progress=False)
    assert r.converged
    assert r.lnl == pytest.approx(-1186.2294424709, rel=1e-7)
    assert r.coef["(Intercept)"] == pytest.approx(-1.035439, rel=1e-4)
    assert r.coef["urban[T.Y]"] == pytest.approx(0.696717, rel=1e-4)
    assert r.varcomp["district:(Intercept)"] == pytest.approx(0.229099, rel=1e-4)


def test_cauchit_link_end_to_end():
    """A user-defined link (one small class, registered by name) fits through the public API."""
    df = tm.load_dataset("sleepstudy")
    r = tm.mix(SLEEP, df, family="binomial", link="cauchit", n_quad=13, progress=False)
    assert r.converged and r.family.link.name == "cauchit"
    r2 = tm.mix(SLEEP, df, family="binomial", link=CauchitLink(), n_quad=13, progress=False)
    assert r2.lnl == pytest.approx(r.lnl, rel=1e-12)
    # the fitted value is the 13-point AGQ of (2.1) at the estimates, and AGQ converges to the integral
    # (slowly for this heavy-tailed link) as the number of points grows
    frame = df.assign(y=(df["Reaction"] > 300).astype(float), x=df["Days"], g=df["Subject"], c1=1.0, c2=1.0)
    fam = r.family

    def logf(y, eta):
        y, eta = np.array(y, dtype=float), np.array(eta, dtype=float)
        return fam.logf(torch.as_tensor(y, dtype=torch.float64), torch.as_tensor(eta, dtype=torch.float64)).numpy()

    sd = math.sqrt(r.varcomp.iloc[0])
    beta = torch.as_tensor(r.coef.to_numpy().copy(), dtype=torch.float64)
    tens = frame_tensors(frame)

    def agq(m):
        return float(AGQLogLik(tens, fam, m).loglik(beta, [torch.full((1, 1), sd, dtype=torch.float64)]).sum())

    assert agq(13) == pytest.approx(r.lnl, rel=1e-12)
    exact = brute_force_loglik(frame, tuple(r.coef), sd, logf=logf, n_grid=801)
    assert abs(agq(101) - exact) < 1e-7 * abs(exact) < abs(agq(13) - exact)
    mu = r.predict(type="response")
    np.testing.assert_allclose(mu, 0.5 + np.arctan(r.predict()) / np.pi, rtol=1e-12)


def _small(levels=2, seed=31, family="binomial"):
    df = simulate(family, levels=levels, seed=seed, n_top=12 if levels == 2 else 6)
    return df, frame_tensors(df, levels=levels)


def test_start_vector_and_its_length_check():
    df, tens = _small()
    fam = get_family("binomial")
    a = fit_glmm(tens, fam, n_quad=9, progress=False)
    b = fit_glmm(tens, fam, n_quad=9, start=torch.cat([a.beta, a.tau]), progress=False)
    assert b.converged and b.lnl == pytest.approx(a.lnl, rel=1e-12)
    torch.testing.assert_close(b.beta, a.beta, rtol=1e-6, atol=1e-8)
    with pytest.raises(DataError, match=r"start has length 2, expecting 3 \(2 fixed effects, then 1 variance"):
        fit_glmm(tens, fam, start=[0.0, 1.0], progress=False)
    with pytest.raises(DataError, match="expecting 3"):
        tm.mix("y ~ x + (1 | g)", df, family="binomial", start=[0.0, 1.0, 1.0, 1.0], progress=False)


@pytest.mark.parametrize("bad", [0, -2, 0.3])
def test_non_positive_n_quad(bad):
    df, tens = _small()
    with pytest.raises(ConfigError, match="n_quad"):
        fit_glmm(tens, get_family("binomial"), n_quad=bad, progress=False)
    with pytest.raises(ConfigError, match="n_quad"):
        tm.mix("y ~ x + (1 | g)", df, family="binomial", n_quad=bad, progress=False)


def test_non_integer_n_quad_is_rounded():
    _, tens = _small()
    out = fit_glmm(tens, get_family("binomial"), n_quad=2.6, progress=False)
    assert out.extra["n_quad"] == 3


def test_bad_responses_and_families_through_mix():
    df, _ = _small()
    bad = df.assign(y=df["y"] + 2 * (df.index % 3 == 0))
    with pytest.raises(DataError, match=r"0/1.*2\.0, 3\.0"):
        tm.mix("y ~ x + (1 | g)", bad, family="binomial", progress=False)
    counts = df.assign(y=df["y"] - 2 * (df.index == 4))
    with pytest.raises(DataError, match="non-negative count"):
        tm.mix("y ~ x + (1 | g)", counts, family="poisson", progress=False)
    with pytest.raises(ConfigError, match=r"unknown family 'Gamma'; valid families: binomial, gaussian, poisson"):
        tm.mix("y ~ x + (1 | g)", df, family="Gamma", progress=False)
    with pytest.raises(ConfigError, match="unknown link 'sqrt'"):
        tm.mix("y ~ x + (1 | g)", df, family="poisson", link="sqrt", progress=False)
    with pytest.raises(ConfigError, match="dispersion"):
        fit_glmm(frame_tensors(df), get_family("gaussian", "log"), progress=False)


def test_perfectly_separated_group_fits_with_finite_modes():
    df, _ = _small(seed=32)
    df.loc[df["g"] == "g0", "y"] = 1.0
    df.loc[df["g"] == "g1", "y"] = 0.0
    r = tm.mix("y ~ x + (1 | g)", df, weights=["c1", "c2"], cweights=True, family="binomial", progress=False)
    assert r.converged
    re = r.ranef["g"]["(Intercept)"]
    assert np.isfinite(re.to_numpy()).all()
    assert re["g0"] > 0 > re["g1"]
    assert np.isfinite(r.se.to_numpy()).all()


def test_zero_variance_is_reported_on_the_boundary():
    """Identical groups carry no between-group variation: variance 0, SE NaN, warning."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=8)
    y = (rng.uniform(size=8) < 0.5).astype(float)
    y[:2] = [0.0, 1.0]
    import pandas as pd

    df = pd.DataFrame({"x": np.tile(x, 10), "y": np.tile(y, 10), "g": np.repeat([f"g{i}" for i in range(10)], 8)})
    with pytest.warns(BoundaryWarning):
        r = tm.mix("y ~ x + (1 | g)", df, family="poisson", n_quad=7, progress=False)
    assert r.varcomp.iloc[0] == 0.0 and math.isnan(r.varcomp_se.iloc[0])
    assert np.isfinite(r.se.to_numpy()).all()
    glm = get_family("poisson")
    eta = torch.as_tensor(r.coef["(Intercept)"] + r.coef["x"] * df["x"].to_numpy(), dtype=torch.float64)
    expected = float(glm.logf(torch.as_tensor(df["y"].to_numpy().copy(), dtype=torch.float64), eta).sum())
    assert r.lnl == pytest.approx(expected, rel=1e-10)


def test_failed_gradient_test_warns_and_flags():
    _, tens = _small()
    with pytest.warns(ConvergenceWarning, match="did not converge"):
        out = fit_glmm(tens, get_family("binomial"), n_quad=5, tol=1e-30, progress=False)
    assert out.converged is False and "gradient test failed" in out.message


def test_three_level_poisson_fit_is_stationary():
    df, tens = _small(levels=3, family="poisson", seed=33)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        out = fit_glmm(tens, get_family("poisson"), n_quad=7, progress=False)
    assert out.converged and out.extra["grad_max"] < 1e-8
    assert len(out.u) == 2 and out.u[1].shape == (6, 1) and out.tau.shape == (2,)
    assert out.scores.shape == (6, 4)
    assert float(out.scores.sum(0).abs().max()) < 1e-6 * float(out.scores.abs().max())
    assert bool(torch.isfinite(out.tau_cov).all()) and bool((torch.diagonal(out.tau_cov) > 0).all())


def test_two_uncorrelated_terms_for_one_factor():
    """(1 | g) + (0 + x | g) (WeMix fails here, Quirk Q4) equals (x || g): block-diagonal Lambda."""
    df = tm.load_dataset("sleepstudy")
    df = df.assign(y=(df["Reaction"] > 300).astype(float), x=df["Days"] / 9.0, g=df["Subject"])
    a = tm.mix("y ~ x + (1 | g) + (0 + x | g)", df, family="binomial", n_quad=5, progress=False)
    b = tm.mix("y ~ x + (x || g)", df, family="binomial", n_quad=5, progress=False)
    assert a.converged and list(a.varcomp.index) == ["g:(Intercept)", "g:x"]
    assert (a.varcomp > 0).all() and np.isfinite(a.varcomp_se).all()
    assert a.lnl == pytest.approx(b.lnl, rel=1e-12)
    np.testing.assert_allclose(a.varcomp.to_numpy(), b.varcomp.to_numpy(), rtol=1e-8)
