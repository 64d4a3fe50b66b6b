"""Plausible values of a GLMM fitted batched over values equal separate fits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import torchmix as tm
from torchmix.api import _prepare
from torchmix.families import get_family
from torchmix.fit.glmm_many import stack_responses
from torchmix.likelihood.agq import AGQLogLik

from conftest import simulate_nested


def _with_values(df, k, seed=3):
    """The contraception data with ``k`` binary outcomes: the observed one and noisy copies."""
    rng = np.random.default_rng(seed)
    out = df.copy()
    out["w1"] = 1.0 + (np.arange(len(df)) % 3)
    out["w2"] = 1.0 + (out["district"].astype(int) % 4)
    cols = []
    for j in range(k):
        flip = rng.uniform(size=len(df)) < (0.0 if j == 0 else 0.08)
        out[f"use{j}"] = np.where(flip, 1 - out["use01"], out["use01"]).astype(float)
        cols.append(f"use{j}")
    return out, cols


def assert_fits_equal(a, b, rtol=1e-6):
    np.testing.assert_allclose(a.lnl, b.lnl, rtol=1e-10)
    np.testing.assert_allclose(a.coef, b.coef, rtol=rtol, atol=1e-10)
    np.testing.assert_allclose(a.se, b.se, rtol=rtol)
    np.testing.assert_allclose(a.varcomp, b.varcomp, rtol=rtol)
    np.testing.assert_allclose(a.varcomp_se, b.varcomp_se, rtol=rtol)
    for name in a.ranef:
        np.testing.assert_allclose(a.ranef[name].to_numpy(), b.ranef[name].to_numpy(), rtol=1e-5, atol=1e-8)


@pytest.mark.slow
def test_logit_four_values_batched_equal_separate():
    df, cols = _with_values(tm.load_dataset("contraception"), 4)
    kw = dict(weights=["w1", "w2"], family="binomial", progress=False)
    rhs = "age + urban + (1 | district)"
    pooled = tm.mix(f"y ~ {rhs}", df, plausible_values={"y": cols}, **kw)
    assert [f._out.extra.get("batched", False) for f in pooled.fits] == [False, True, True, True]
    for col, fit in zip(cols, pooled.fits):
        assert_fits_equal(fit, tm.mix(f"{col} ~ {rhs}", df, **kw))


@pytest.mark.parametrize("levels", [2, 3])
def test_stacked_copies_evaluate_each_value(levels):
    """The stacked model's top-group contributions are those of each value's own model."""
    df = simulate_nested(n_top=8, levels=3)
    rng = np.random.default_rng(1)
    cols = []
    for k in range(3):
        df[f"pass{k}"] = (df["y"] + rng.normal(0, 1, len(df)) > 1.5).astype(float)
        cols.append(f"pass{k}")
    if levels == 2:
        formula, weights, lams = "y ~ x + (1 | cls)", ["w1c", "w2c"], [[[0.6]]]
    else:
        formula, weights, lams = "y ~ x + (1 | cls) + (1 | school)", ["w1c", "w2c", "w3c"], [[[0.6]], [[0.4]]]
    prep = _prepare(formula, df, weights, cweights=True, family="binomial", progress=False,
                    plausible_values={"y": cols})
    t = prep.design.tensors
    ys = torch.stack([prep.responses[c] for c in cols], dim=1)
    fam = get_family("binomial")
    beta = torch.tensor([-0.5, 0.3], dtype=torch.float64)
    lams = [torch.tensor(lam, dtype=torch.float64) for lam in lams]
    stacked = AGQLogLik(stack_responses(t, ys), fam, 5).loglik(beta, lams)
    for k in range(3):
        alone = AGQLogLik(t.with_response(ys[:, k]), fam, 5).loglik(beta, lams)
        np.testing.assert_allclose(stacked.reshape(3, -1)[k].numpy(), alone.numpy(), rtol=1e-12)


@pytest.mark.slow
def test_logit_values_with_an_offset_batched_equal_separate():
    df, cols = _with_values(tm.load_dataset("contraception"), 2, seed=7)
    df["off"] = 0.02 * df["age"]
    kw = dict(weights=["w1", "w2"], family="binomial", progress=False, offset="off")
    rhs = "urban + (1 | district)"
    pooled = tm.mix(f"y ~ {rhs}", df, plausible_values={"y": cols}, **kw)
    assert [f._out.extra.get("batched", False) for f in pooled.fits] == [False, True]
    for col, fit in zip(cols, pooled.fits):
        assert_fits_equal(fit, tm.mix(f"{col} ~ {rhs}", df, **kw))
