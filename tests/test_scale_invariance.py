"""Units do not matter: scaling a predictor by c scales its coefficient and SE by 1/c, nothing else moves.

Also the response (gaussian): y * c scales the coefficients and SEs by c and the variances by c^2.
Tolerance 1e-8 relative, and no "singular information", convergence or boundary warning.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

import torchmix as tm
from torchmix.errors import BoundaryWarning, ConvergenceWarning

from conftest import sleepstudy_three_level, sleepstudy_weighted

REL = 1e-8


def _fit(formula, data, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = tm.mix(formula, data, progress=False, **kw)
    bad = [str(w.message) for w in caught
           if issubclass(w.category, (ConvergenceWarning, BoundaryWarning)) or "information matrix" in str(w.message)]
    assert not bad, bad
    assert res.converged
    return res


def _close(a, b, what):
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    rel = np.abs(a - b) / np.abs(b)
    assert np.all(rel < REL), f"{what}: relative differences {rel}"


def _varcomp_power(res, column):
    """Power of c by which each variance component scales when ``column`` is multiplied by c."""
    out = []
    for name in res.varcomp.index:
        effects = name.split(":")[1:]  # "g:x" a variance, "g:x1:x2" a covariance
        if len(effects) == 1:
            effects = effects * 2
        out.append(-float(sum(e == column for e in effects)))
    return np.array(out)


def _check_predictor(formula, data, column, **kw):
    base = _fit(formula, data, **kw)
    power = _varcomp_power(base, column)
    for c in (1e6, 1e-6):
        scaled = data.copy()
        scaled[column] = scaled[column] * c
        res = _fit(formula, scaled, **kw)
        factor = pd.Series(1.0, index=base.coef.index)
        factor[column] = 1.0 / c
        _close(res.coef, base.coef * factor, f"coef x{c:g}")
        _close(res.se, base.se * factor, f"se x{c:g}")
        _close(res.varcomp, base.varcomp * c ** power, f"varcomp x{c:g}")
        _close(res.varcomp_se, base.varcomp_se * c ** power, f"varcomp_se x{c:g}")
        assert abs(res.lnl - base.lnl) < 1e-8 * abs(base.lnl)


def test_gaussian_random_intercept_days_scaled():
    _check_predictor("Reaction ~ Days + (1|Subject)", sleepstudy_weighted(), "Days", weights=["w1", "w2"])


def test_gaussian_random_slope_days_scaled():
    _check_predictor("Reaction ~ Days + (1 + Days|Subject)", sleepstudy_weighted(), "Days", weights=["w1", "w2"])


def test_gaussian_three_levels_days_scaled():
    _check_predictor("Reaction ~ Days + (1|Subject) + (1|Group)", sleepstudy_three_level(), "Days",
                     weights=["c1", "c2", "c3"], cweights=True)


def test_gaussian_response_scaled():
    df = sleepstudy_weighted()
    base = _fit("Reaction ~ Days + (1 + Days|Subject)", df, weights=["w1", "w2"])
    for c in (1e6, 1e-6):
        scaled = df.assign(Reaction=df["Reaction"] * c)
        res = _fit("Reaction ~ Days + (1 + Days|Subject)", scaled, weights=["w1", "w2"])
        _close(res.coef, base.coef * c, "coef")
        _close(res.se, base.se * c, "se")
        _close(res.varcomp, base.varcomp * c ** 2, "varcomp")
        _close(res.varcomp_se, base.varcomp_se * c ** 2, "varcomp_se")


def test_binomial_age_scaled():
    _check_predictor("use ~ age + urban + (1|district)", tm.load_dataset("contraception"), "age",
                     family="binomial")


def _poisson_data():
    rng = np.random.default_rng(1)
    g = np.repeat(np.arange(40), 20)
    x = rng.normal(size=g.size)
    u = rng.normal(scale=0.5, size=40)
    y = rng.poisson(np.exp(0.5 + 0.3 * x + u[g]))
    return pd.DataFrame({"y": y, "x": x, "g": g.astype(str)})


def test_poisson_x_scaled():
    _check_predictor("y ~ x + (1|g)", _poisson_data(), "x", family="poisson")
