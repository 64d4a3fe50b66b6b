"""Property-based tests: identities on random valid data, typed errors on random malformed input.

Valid data: two levels, 5-15 groups of 2-8 rows, one or two predictors, positive weights.
Identities (MATH.md 12): integer level-1 weights equal replicated rows (V1), row order and relabelled
ids change nothing (V8), scaling a predictor by ``a`` divides its coefficient and SE by ``a`` and
changes nothing else, scaling the response by ``a`` scales coefficients and SEs by ``a`` and
variances by ``a**2``.
Malformed input (formulas, weights, columns, argument types) raises only subclasses of
:class:`torchmix.TorchmixError`, never another exception.

Profiles: ``ci`` (default; few examples, derandomised so the suite is deterministic) and
``thorough`` (``TORCHMIX_HYPOTHESIS_PROFILE=thorough``; ``TORCHMIX_PROPERTY_EXAMPLES`` examples per
property, 1000 by default), used by ``scripts/run_properties.py``.
"""

from __future__ import annotations

import math
import os
import warnings
from collections import Counter

import numpy as np
import pandas as pd
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st

import torchmix as tm

settings.register_profile("ci", max_examples=10, deadline=None, derandomize=True, database=None,
                          phases=[Phase.explicit, Phase.generate],  # no shrinking: a failure is reported at once
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("thorough", max_examples=int(os.environ.get("TORCHMIX_PROPERTY_EXAMPLES", "1000")),
                          deadline=None, derandomize=False, database=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("TORCHMIX_HYPOTHESIS_PROFILE", "ci"))

EXAMPLES: Counter = Counter()  # examples run per property (read by scripts/run_properties.py)
MALFORMED = settings(max_examples=25) if os.environ.get("TORCHMIX_HYPOTHESIS_PROFILE", "ci") == "ci" else settings()


# ----------------------------------------------------------------------------- strategies


@st.composite
def datasets(draw):
    """(data, formula, predictors): y ~ x1 [+ x2] + (1 | g), integer level-1 weights k1, group weights c2."""
    n_groups = draw(st.integers(5, 15))
    sizes = draw(st.lists(st.integers(2, 8), min_size=n_groups, max_size=n_groups))
    p = draw(st.integers(1, 2))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    g = np.repeat(np.arange(n_groups), sizes)
    n = len(g)
    x = rng.normal(size=(n, p)) * rng.uniform(0.5, 3, p) + rng.normal(size=p)
    beta = rng.normal(size=p)
    u = rng.normal(size=n_groups) * draw(st.sampled_from([0.5, 1.0, 2.0]))
    y = 1.0 + x @ beta + u[g] + rng.normal(size=n)
    data = pd.DataFrame({"y": y, **{f"x{j + 1}": x[:, j] for j in range(p)}, "g": g + 100,
                         "k1": rng.integers(1, 4, n).astype(float), "c2": rng.uniform(0.5, 2.0, n_groups)[g]})
    preds = [f"x{j + 1}" for j in range(p)]
    return data, "y ~ " + " + ".join(preds) + " + (1 | g)", preds


def fit(formula, data, weights=("k1", "c2"), **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tm.mix(formula, data, weights=list(weights) if weights else None, cweights=True, progress=False, **kw)


def same_fit(a, b, se=True):
    np.testing.assert_allclose(a.lnl, b.lnl, rtol=1e-8)
    np.testing.assert_allclose(a.coef.to_numpy(), b.coef.to_numpy(), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(a.varcomp.to_numpy(), b.varcomp.to_numpy(), rtol=1e-6, atol=1e-8)
    if se:
        np.testing.assert_allclose(a.se.to_numpy(), b.se.to_numpy(), rtol=1e-5)


# ----------------------------------------------------------------------------- identities


@given(datasets())
def test_integer_weights_equal_replicated_rows(case):
    data, formula, _ = case
    EXAMPLES["integer_weights_equal_replicated_rows"] += 1
    rep = data.loc[data.index.repeat(data["k1"].astype(int))].reset_index(drop=True).assign(one=1.0)
    same_fit(fit(formula, data), fit(formula, rep, ("one", "c2")))


@given(datasets(), st.randoms(use_true_random=False))
def test_row_order_changes_nothing(case, rnd):
    data, formula, _ = case
    EXAMPLES["row_order_changes_nothing"] += 1
    order = list(range(len(data)))
    rnd.shuffle(order)
    same_fit(fit(formula, data), fit(formula, data.iloc[order]))


@given(datasets(), st.randoms(use_true_random=False), st.sampled_from(["str", "negative", "float", "sparse"]))
def test_relabelled_ids_change_nothing(case, rnd, kind):
    data, formula, _ = case
    EXAMPLES["relabelled_ids_change_nothing"] += 1
    ids = sorted(data["g"].unique())
    new = list(range(len(ids)))
    rnd.shuffle(new)
    mapping = {old: {"str": f"s{v:03d}x", "negative": -v - 1, "float": v + 0.5, "sparse": 10**6 * (v + 1)}[kind]
               for old, v in zip(ids, new)}
    a, b = fit(formula, data), fit(formula, data.assign(g=data["g"].map(mapping)))
    same_fit(a, b)
    ra = a.ranef["g"]
    rb = b.ranef["g"].loc[[mapping[i] for i in ra.index]]
    np.testing.assert_allclose(ra.to_numpy(), rb.to_numpy(), rtol=1e-5, atol=1e-7)


@given(datasets(), st.integers(-6, 6).filter(lambda e: e != 0), st.booleans())
def test_scaling_a_predictor_scales_only_its_coefficient(case, exponent, second):
    data, formula, preds = case
    EXAMPLES["scaling_a_predictor_scales_only_its_coefficient"] += 1
    name = preds[-1] if second else preds[0]
    a = 10.0 ** exponent
    base, scaled = fit(formula, data), fit(formula, data.assign(**{name: data[name] * a}))
    factor = np.array([1 / a if n == name else 1.0 for n in base.coef.index])
    np.testing.assert_allclose(scaled.coef.to_numpy(), base.coef.to_numpy() * factor, rtol=1e-6, atol=1e-10)
    np.testing.assert_allclose(scaled.se.to_numpy(), base.se.to_numpy() * factor, rtol=1e-6)
    np.testing.assert_allclose(scaled.varcomp.to_numpy(), base.varcomp.to_numpy(), rtol=1e-6, atol=1e-10)
    np.testing.assert_allclose(scaled.lnl, base.lnl, rtol=1e-8)


@given(datasets(), st.integers(-6, 6).filter(lambda e: e != 0))
def test_scaling_the_response_scales_estimates(case, exponent):
    data, formula, _ = case
    EXAMPLES["scaling_the_response_scales_estimates"] += 1
    a = 10.0 ** exponent
    base, scaled = fit(formula, data), fit(formula, data.assign(y=data["y"] * a))
    np.testing.assert_allclose(scaled.coef.to_numpy(), base.coef.to_numpy() * a, rtol=1e-6, atol=1e-10 * a)
    np.testing.assert_allclose(scaled.se.to_numpy(), base.se.to_numpy() * a, rtol=1e-6)
    np.testing.assert_allclose(scaled.varcomp.to_numpy(), base.varcomp.to_numpy() * a**2, rtol=1e-6,
                               atol=1e-10 * a**2)
    # each observation's density is divided by a: the log-likelihood moves by -(sum of weights) log a
    total = float((data["k1"] * data["c2"]).sum())
    np.testing.assert_allclose(scaled.lnl, base.lnl - total * math.log(a), rtol=1e-8, atol=1e-8 * total)


# ----------------------------------------------------------------------------- malformed input

BASE = pd.DataFrame({
    "y": np.linspace(-1, 2, 24) ** 2, "x": np.tile([0.0, 1.0, 2.5, -1.0], 6), "g": np.repeat(np.arange(6), 4),
    "s": ["a", "b", "c"] * 8, "w1": 1.0 + np.arange(24) % 3, "w2": np.repeat([1.0, 2.0, 1.5, 1.0, 2.0, 3.0], 4),
    "b": np.tile([0, 1], 12),
})

TOKENS = ["y", "x", "g", "s", "b", "w1", "~", " ~ ", "+", "-", "*", ":", "/", "(", ")", "|", "||", "1", "0", "-1",
          "I(", "np.log(", "log(", "C(", "Q(", "'x'", '"g"', "`x`", "`a b`", "^", "**", "2", ",", ".", "%in%",
          "__import__(", "eval(", "lambda", ":", "[", "]", "{", "}", "np.", "os", "poly(", "scale(", "nan", "inf",
          "\\", "'", '"', "`", "#", ";", "=", "==", "@", "!", "$", "x.y", "f'", "\n", " ", "é", "\x00"]


def expect_typed(call):
    """Run ``call``; it may succeed or raise a torchmix error, nothing else."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            call()
        except tm.TorchmixError:
            pass


@MALFORMED
@given(st.lists(st.sampled_from(TOKENS), min_size=1, max_size=14))
def test_random_formulas_raise_only_typed_errors(tokens):
    EXAMPLES["random_formulas_raise_only_typed_errors"] += 1
    expect_typed(lambda: tm.mix("".join(tokens), BASE, progress=False))
    expect_typed(lambda: tm.mix("y ~ " + "".join(tokens) + " + (1 | g)", BASE, progress=False))
    expect_typed(lambda: tm.mix("y ~ x + (" + "".join(tokens) + " | g)", BASE, progress=False))
    expect_typed(lambda: tm.mix("y ~ x + (1 | " + "".join(tokens) + ")", BASE, progress=False))


@MALFORMED
@given(st.text(max_size=40))
def test_arbitrary_text_formulas_raise_only_typed_errors(text):
    EXAMPLES["arbitrary_text_formulas_raise_only_typed_errors"] += 1
    expect_typed(lambda: tm.mix(text, BASE, progress=False))
    expect_typed(lambda: tm.mix(f"y ~ x + {text} + (1 | g)", BASE, progress=False))


BAD_VALUES = [np.nan, np.inf, -np.inf, -1.0, 0.0, -0.0, 1e308, 5e-324, "a", "", None, True, False, 2**63]


@MALFORMED
@given(st.sampled_from(["w1", "w2"]), st.lists(st.tuples(st.integers(0, 23), st.sampled_from(BAD_VALUES)),
                                               min_size=1, max_size=5),
       st.sampled_from(["keep", "object", "bool", "string"]))
def test_bad_weights_raise_only_typed_errors(column, edits, dtype):
    EXAMPLES["bad_weights_raise_only_typed_errors"] += 1
    data = BASE.copy()
    data[column] = data[column].astype(object)
    for row, value in edits:
        data.loc[row, column] = value
    if dtype == "bool":
        data[column] = data[column].astype(bool)
    elif dtype == "string":
        data[column] = data[column].astype(str)
    elif dtype == "keep":
        data[column] = pd.to_numeric(data[column], errors="coerce")
    expect_typed(lambda: tm.mix("y ~ x + (1 | g)", data, weights=["w1", "w2"], progress=False))


@MALFORMED
@given(st.sampled_from(["y", "x", "g"]), st.sampled_from(["drop", "rename", "strings", "nan", "inf", "object",
                                                          "bool", "empty"]),
       st.sampled_from(["gaussian", "binomial", "poisson"]))
def test_bad_columns_raise_only_typed_errors(column, change, family):
    EXAMPLES["bad_columns_raise_only_typed_errors"] += 1
    data = BASE.copy()
    if change == "drop":
        data = data.drop(columns=column)
    elif change == "rename":
        data = data.rename(columns={column: column + "_"})
    elif change == "strings":
        data[column] = data[column].astype(str) + "z"
    elif change in ("nan", "inf"):
        data[column] = np.nan if change == "nan" else np.inf
    elif change == "object":
        data[column] = [object()] * len(data)
    elif change == "bool":
        data[column] = data[column].astype(bool)
    elif change == "empty":
        data = data.iloc[:0]
    expect_typed(lambda: tm.mix("y ~ x + (1 | g)", data, family=family, progress=False, max_iter=20))


WEIRD = st.one_of(st.sampled_from([None, True, False, 0, -1, 1, 2.5, np.nan, np.inf, -np.inf, "", "abc", "13",
                                   [], {}, (), [1, 2], {"a": 1}, {"g": "x"}, {"g": ["s"]}, {"y": ["x"]}, object(),
                                   b"x", 1j, "cuda:7", "float16", "binomial", "probit", "A", "timss", "PISA"]),
                  st.integers(-10, 40), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8))
ARGS = ["weights", "cweights", "family", "link", "n_quad", "center_group", "center_grand", "scaling", "survey",
        "edsurvey_compat", "plausible_values", "start", "max_iter", "tol", "small_sample", "device", "dtype",
        "transforms"]


@MALFORMED
@given(st.sampled_from(ARGS), WEIRD, st.sampled_from(["gaussian", "binomial"]))
def test_wrong_argument_types_raise_only_typed_errors(name, value, family):
    EXAMPLES["wrong_argument_types_raise_only_typed_errors"] += 1
    assume(not (name == "family" and value == "binomial"))
    # the n_quad upper bound has its own test; a huge grid here would only exhaust memory
    assume(not (name == "n_quad" and isinstance(value, (int, float)) and not isinstance(value, bool)
                and math.isfinite(value) and value > 400))
    data = BASE if family == "gaussian" else BASE.assign(y=BASE["b"])
    kwargs = {"family": family, name: value} if name != "family" else {name: value}
    expect_typed(lambda: tm.mix("y ~ x + (1 | g)", data, progress=False, max_iter=kwargs.pop("max_iter", 20),
                                **kwargs))


@MALFORMED
@given(WEIRD)
def test_wrong_data_and_formula_types_raise_only_typed_errors(value):
    EXAMPLES["wrong_data_and_formula_types_raise_only_typed_errors"] += 1
    expect_typed(lambda: tm.mix("y ~ x + (1 | g)", value, progress=False))
    if not isinstance(value, str):
        expect_typed(lambda: tm.mix(value, BASE, progress=False))
