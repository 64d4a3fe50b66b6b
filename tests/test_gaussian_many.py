"""Plausible values of a gaussian model fitted batched over values equal separate fits."""

from __future__ import annotations

import numpy as np

import torchmix as tm
from torchmix.api import _fit_one, _prepare


def separate_fits(formula, data, pv_cols, **kw):
    out = []
    for col in pv_cols:
        prepared = _prepare(formula.replace("y ~", f"{col} ~", 1), data, progress=False, **kw)
        out.append(_fit_one(prepared))
    return out


def assert_fits_equal(a, b):
    np.testing.assert_allclose(a.lnl, b.lnl, rtol=1e-10)
    np.testing.assert_allclose(a.coef, b.coef, rtol=1e-8)
    np.testing.assert_allclose(a.se, b.se, rtol=1e-7)
    np.testing.assert_allclose(a.varcomp, b.varcomp, rtol=1e-7)
    np.testing.assert_allclose(a.varcomp_se, b.varcomp_se, rtol=1e-6)
    for name in a.ranef:
        np.testing.assert_allclose(a.ranef[name].to_numpy(), b.ranef[name].to_numpy(), rtol=1e-6, atol=1e-8)


def test_pisa_five_values_batched_equal_separate():
    nz = tm.load_dataset("pisa2012_nz")
    cols = [f"PV{k}MATH" for k in range(1, 6)]
    kw = dict(weights=["W_FSTUWT", "W_FSCHWT"])
    pooled = tm.mix("y ~ ST04Q01 + MATHEFF + (1|SCHOOLID)", nz, plausible_values={"y": cols}, progress=False, **kw)
    assert [f._out.extra.get("batched", False) for f in pooled.fits] == [False, True, True, True, True]
    for a, b in zip(pooled.fits, separate_fits("y ~ ST04Q01 + MATHEFF + (1|SCHOOLID)", nz, cols, **kw)):
        assert_fits_equal(a, b)


def test_three_levels_random_slope_batched_equal_separate(sleep3):
    rng = np.random.default_rng(5)
    d = sleep3.copy()
    cols = []
    for k in range(4):
        d[f"pv{k}"] = d["Reaction"] + rng.normal(0, 15, len(d))
        cols.append(f"pv{k}")
    kw = dict(weights=["c1", "c2", "c3"], cweights=True)
    formula = "y ~ Days + (1 + Days|Subject) + (1|Group)"
    pooled = tm.mix(formula, d, plausible_values={"y": cols}, progress=False, **kw)
    for a, b in zip(pooled.fits, separate_fits(formula, d, cols, **kw)):
        assert_fits_equal(a, b)
