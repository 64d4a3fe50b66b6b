"""Offsets: ``offset(expr)`` in the formula and the ``offset=`` column, for every family.

Reference: lme4 ``glmer(y ~ x + (1 | g) + offset(log(n)), family = poisson, nAGQ = 13)`` on
tests/data/poisson_offset.csv (tests/data/lme4_references.R / .txt).
"""

from __future__ import annotations

import pathlib

import numpy as np
import pandas as pd
import pytest
import torch

import torchmix as tm
from torchmix.formula import parse_formula

from conftest import sleepstudy_three_level

DATA = pathlib.Path(__file__).parent / "data"


def lme4_line(block: str, key: str) -> np.ndarray:
    text = (DATA / "lme4_references.txt").read_text().split(f"## {block}\n")[1].split("##")[0]
    for line in text.splitlines():
        if line.split()[0] == key:
            return np.array([float(v) for v in line.split()[1:]])
    raise KeyError(key)


@pytest.fixture(scope="module")
def rate_data():
    return pd.read_csv(DATA / "poisson_offset.csv")


@pytest.fixture(scope="module")
def rate_fit(rate_data):
    return tm.mix("y ~ x + (1 | g) + offset(log(n))", rate_data, family="poisson", progress=False)


def test_parse_offset_term():
    p = parse_formula("y ~ x + offset(log(n)) + (1 | g)")
    assert p.offsets == ("log(n)",) and p.fixed == "x"
    with pytest.raises(tm.FormulaError, match="subtracted"):
        parse_formula("y ~ x - offset(n) + (1 | g)")


def test_poisson_rate_model_equals_glmer(rate_fit, rate_data):
    np.testing.assert_allclose(rate_fit.coef.to_numpy(), lme4_line("poisson_offset", "beta"), rtol=2e-6)
    np.testing.assert_allclose(rate_fit.varcomp.to_numpy(), lme4_line("poisson_offset", "var"), rtol=2e-5)
    # glmer's nAGQ > 1 log-likelihood leaves out the saturated term sum(log f(y | mu = y))
    y = rate_data["y"].to_numpy(dtype=float)
    ylogy = np.where(y > 0, y * np.log(np.where(y > 0, y, 1.0)), 0.0)
    saturated = float((ylogy - y - torch.special.gammaln(torch.as_tensor(y + 1.0)).numpy()).sum())
    np.testing.assert_allclose(rate_fit.lnl - saturated, lme4_line("poisson_offset", "lnl")[0], rtol=1e-8)
    np.testing.assert_allclose(rate_fit.predict(rate_data).to_numpy()[:3], lme4_line("poisson_offset", "pred_first3"),
                               rtol=1e-5)


def test_offset_argument_equals_formula_term(rate_fit, rate_data):
    d = rate_data.assign(log_n=np.log(rate_data["n"]))
    b = tm.mix("y ~ x + (1 | g)", d, family="poisson", offset="log_n", progress=False)
    np.testing.assert_allclose(b.lnl, rate_fit.lnl, rtol=1e-10)
    np.testing.assert_allclose(b.coef.to_numpy(), rate_fit.coef.to_numpy(), rtol=1e-7)
    assert "offset = 'log_n'" in b.call
    np.testing.assert_allclose(b.fitted().to_numpy(), rate_fit.fitted().to_numpy(), rtol=1e-7)


def test_predict_includes_the_offset(rate_fit, rate_data):
    np.testing.assert_allclose(rate_fit.predict(rate_data).to_numpy(), rate_fit.fitted().to_numpy(), rtol=1e-12)
    doubled = rate_data.assign(n=2 * rate_data["n"])
    np.testing.assert_allclose(rate_fit.predict(doubled).to_numpy() - rate_fit.predict(rate_data).to_numpy(),
                               np.log(2.0), rtol=1e-12)
    resid = rate_fit.residuals().to_numpy()
    np.testing.assert_allclose(resid, rate_data["y"] - rate_fit.fitted("response").to_numpy(), rtol=1e-12)


def test_gaussian_offset_is_y_minus_offset():
    df = tm.load_dataset("sleepstudy").assign(base=lambda d: 3.0 * d["Days"] + 0.01 * d["Days"] ** 2)
    a = tm.mix("Reaction ~ Days + (1 + Days | Subject) + offset(base)", df, progress=False)
    b = tm.mix("adj ~ Days + (1 + Days | Subject)", df.assign(adj=df["Reaction"] - df["base"]), progress=False)
    np.testing.assert_allclose(a.lnl, b.lnl, rtol=1e-10)
    np.testing.assert_allclose(a.coef.to_numpy(), b.coef.to_numpy(), rtol=1e-8)
    np.testing.assert_allclose(a.varcomp.to_numpy(), b.varcomp.to_numpy(), rtol=1e-6)
    np.testing.assert_allclose(a.fitted().to_numpy(), b.fitted().to_numpy() + df["base"].to_numpy(), rtol=1e-9)


@pytest.mark.parametrize("family,formula", [
    ("gaussian", "Reaction ~ Days + (1 | Subject) + (1 | Group)"),
    ("binomial", "hi ~ Days + (1 | Subject)"),
    pytest.param("poisson", "cnt ~ Days + (1 | Subject)", marks=pytest.mark.slow),
])
def test_constant_offset_shifts_the_intercept(family, formula):
    """An offset c on every row is absorbed by the intercept: same fit, intercept lower by c."""
    df = sleepstudy_three_level()
    df["hi"] = (df["Reaction"] > 300).astype(int)
    df["cnt"] = (df["Reaction"] // 50).astype(int)
    df["c"] = 0.75
    kw = dict(family=family, progress=False, n_quad=5)
    a = tm.mix(formula, df, **kw)
    b = tm.mix(formula, df, offset="c", **kw)
    np.testing.assert_allclose(b.lnl, a.lnl, rtol=1e-8)
    np.testing.assert_allclose(b.coef["(Intercept)"], a.coef["(Intercept)"] - 0.75, rtol=1e-5)
    np.testing.assert_allclose(b.coef["Days"], a.coef["Days"], rtol=1e-5)
    np.testing.assert_allclose(b.se.to_numpy(), a.se.to_numpy(), rtol=1e-4)


@pytest.mark.slow
def test_three_level_glmm_offset_is_used():
    df = sleepstudy_three_level()
    df["cnt"] = (df["Reaction"] // 50).astype(int)
    df["expo"] = 1.0 + (df["Days"] % 2)
    a = tm.mix("cnt ~ Days + (1 | Subject) + (1 | Group) + offset(log(expo))", df, family="poisson", n_quad=3,
               progress=False)
    b = tm.mix("cnt ~ Days + (1 | Subject) + (1 | Group)", df, family="poisson", n_quad=3, progress=False)
    assert abs(a.lnl - b.lnl) > 1.0
    np.testing.assert_allclose(a.predict(df).to_numpy(), a.fitted().to_numpy(), rtol=1e-12)


def test_bad_offsets():
    df = tm.load_dataset("sleepstudy").assign(z=0.0, s="a")
    with pytest.raises(tm.DataError, match="not finite"):
        tm.mix("Reaction ~ Days + (1 | Subject) + offset(log(z))", df, progress=False)
    with pytest.raises(tm.DataError, match="not numeric"):
        tm.mix("Reaction ~ Days + (1 | Subject)", df, offset="s", progress=False)
    with pytest.raises(tm.FormulaError, match="nope"):
        tm.mix("Reaction ~ Days + (1 | Subject)", df, offset="nope", progress=False)
