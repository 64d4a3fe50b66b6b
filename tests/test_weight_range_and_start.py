"""Weights float64 cannot carry, malformed starting values and mixed-type binary responses are typed errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import torchmix as tm

F = "Reaction ~ Days + (1 | Subject)"


def _sleep():
    df = tm.load_dataset("sleepstudy")
    df["w"] = 1.0 + (df["Days"] % 3)
    df["w2"] = 1.0
    return df


@pytest.mark.parametrize("value, match", [(1e308, "spans more than"), (2.0 ** 63, "spans more than"),
                                          (5e-324, "subnormal")])
def test_extreme_weight_is_a_weight_error(value, match):
    df = _sleep()
    df.loc[df.index[23], "w"] = value
    with pytest.raises(tm.WeightError, match=match):
        tm.mix(F, df, weights=["w", "w2"], progress=False)


def test_weights_too_large_to_add_up():
    df = _sleep()
    df["w"] *= 1e307
    with pytest.raises(tm.WeightError, match="too large to add up"):
        tm.mix(F, df, weights=["w", "w2"], progress=False)


def test_weights_of_any_common_scale_are_accepted():
    """Unconditional weights of both levels times one constant: the same estimates."""
    df = _sleep()
    a = tm.mix(F, df, weights=["w", "w2"], progress=False)
    df["w"] *= 1e150
    df["w2"] *= 1e150
    b = tm.mix(F, df, weights=["w", "w2"], progress=False)
    np.testing.assert_allclose(b.coef, a.coef, rtol=1e-9)
    np.testing.assert_allclose(b.se, a.se, rtol=1e-8)


@pytest.mark.parametrize("start", [object(), "250, 10", {"a": 1}, ["a", "b"]])
def test_start_of_the_wrong_type_is_a_config_error(start):
    with pytest.raises(tm.ConfigError, match="start"):
        tm.mix(F, _sleep(), start=start, progress=False)


def test_binomial_response_of_mixed_types_is_a_data_error():
    df = _sleep()
    y = pd.Series((df["Days"] > 4).astype(int), dtype=object)
    y.iloc[3] = "yes"
    df["y"] = y
    with pytest.raises(tm.DataError, match="mixes values of different types"):
        tm.mix("y ~ Days + (1 | Subject)", df, family="binomial", progress=False)
