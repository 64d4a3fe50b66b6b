"""Level-1 weight scaling (MATH.md 3, identity V11) and survey presets (seed Table 1)."""

import warnings

import numpy as np
import pandas as pd
import pytest

from torchmix.errors import ConfigError, WeightError
from torchmix.surveys import (SURVEYS, apply_scaling, find_columns, lookup_survey, normalise_scaling,
                              resolve_survey)

TOL = 1e-12


@pytest.fixture(scope="module")
def design():
    """30 groups of 1..6 rows, shuffled rows, random conditional weights and school weights."""
    rng = np.random.default_rng(20240611)
    sizes = rng.integers(1, 7, size=30)
    codes = np.repeat(np.arange(30), sizes)
    perm = rng.permutation(codes.size)
    codes = codes[perm]
    w2_group = rng.uniform(1.0, 40.0, size=30)
    w1_cond = rng.uniform(0.5, 5.0, size=codes.size)
    w2 = w2_group[codes]
    return codes, w1_cond, w2, w1_cond * w2


def test_hand_computed_methods():
    codes = np.array([0, 0, 0, 1])
    a = np.array([1.0, 2.0, 3.0, 4.0])
    # A: n_j / sum a -> group 0: 3/6, group 1: 1/4
    np.testing.assert_allclose(apply_scaling(a, None, codes, "A", conditional_input=True),
                               [0.5, 1.0, 1.5, 1.0], rtol=0, atol=TOL)
    # B: sum a / sum a^2 -> group 0: 6/14, group 1: 4/16
    np.testing.assert_allclose(apply_scaling(a, None, codes, "B", conditional_input=True),
                               [3 / 7, 6 / 7, 9 / 7, 1.0], rtol=0, atol=TOL)
    w2 = np.array([2.0, 2.0, 2.0, 8.0])
    np.testing.assert_allclose(apply_scaling(a, w2, codes, "timss"), [0.5, 1.0, 1.5, 0.5], rtol=0, atol=TOL)
    np.testing.assert_allclose(apply_scaling(a, w2, codes, None), [0.5, 1.0, 1.5, 0.5], rtol=0, atol=TOL)


@pytest.mark.parametrize("method", ["A", "B"])
def test_v11_conditional_and_unconditional_inputs_agree(design, method):
    codes, w1_cond, w2, w1_uncond = design
    from_cond = apply_scaling(w1_cond, w2, codes, method, conditional_input=True)
    from_uncond = apply_scaling(w1_uncond, w2, codes, method, conditional_input=False)
    np.testing.assert_allclose(from_cond, from_uncond, rtol=1e-13, atol=0)
    # w2 is not needed for A/B
    np.testing.assert_allclose(apply_scaling(w1_uncond, None, codes, method), from_uncond, rtol=0, atol=0)


def test_v11_method_a_sums_to_group_size(design):
    codes, w1_cond, w2, w1_uncond = design
    out = apply_scaling(w1_uncond, w2, codes, "A")
    n_j = np.bincount(codes)
    np.testing.assert_allclose(np.bincount(codes, weights=out), n_j, rtol=1e-13, atol=0)
    # the within-group ratios are those of the input
    j = codes == codes[0]
    np.testing.assert_allclose(out[j] / out[j][0], w1_cond[j] / w1_cond[j][0], rtol=1e-13)


def test_method_b_sums_to_effective_size(design):
    codes, w1_cond, w2, w1_uncond = design
    out = apply_scaling(w1_cond, w2, codes, "b", conditional_input=True)
    s1 = np.bincount(codes, weights=w1_cond)
    s2 = np.bincount(codes, weights=w1_cond ** 2)
    np.testing.assert_allclose(np.bincount(codes, weights=out), s1 ** 2 / s2, rtol=1e-13)
    # and sum of squares equals sum: the scaled weights are their own effective size
    np.testing.assert_allclose(np.bincount(codes, weights=out ** 2), np.bincount(codes, weights=out), rtol=1e-13)


def test_v11_timss_method(design):
    codes, w1_cond, w2, w1_uncond = design
    # TOTWGT/SCHWGT is the conditional weight ...
    np.testing.assert_allclose(apply_scaling(w1_uncond, w2, codes, "timss"), w1_cond, rtol=1e-15)
    # ... and with conditional input it is the input, which times SCHWGT is the raw unconditional weight
    out = apply_scaling(w1_cond, w2, codes, "TIMSS", conditional_input=True)
    np.testing.assert_allclose(out * w2, w1_uncond, rtol=1e-15)
    # so the TIMSS method is no scaling at all
    np.testing.assert_array_equal(out, apply_scaling(w1_cond, w2, codes, None, conditional_input=True))


def test_e3_scaled_weight_treated_as_unconditional(design):
    codes, w1_cond, w2, w1_uncond = design
    a = apply_scaling(w1_uncond, w2, codes, "B")
    np.testing.assert_allclose(apply_scaling(w1_uncond, w2, codes, "B", scaled_as_unconditional=True), a / w2,
                               rtol=1e-15)
    # TIMSS under E3: TOTWGT / SCHWGT^2
    np.testing.assert_allclose(apply_scaling(w1_uncond, w2, codes, "timss", scaled_as_unconditional=True),
                               w1_uncond / w2 ** 2, rtol=1e-15)
    # no transformation, no quirk
    np.testing.assert_array_equal(apply_scaling(w1_uncond, w2, codes, None, scaled_as_unconditional=True),
                                  w1_uncond / w2)


def test_scaling_input_errors(design):
    codes, w1_cond, w2, w1_uncond = design
    with pytest.raises(ConfigError, match="scaling='C'"):
        apply_scaling(w1_cond, w2, codes, "C")
    with pytest.raises(WeightError, match="w1"):
        apply_scaling(np.r_[0.0, w1_cond[1:]], w2, codes, "A")
    with pytest.raises(WeightError, match="w2"):
        apply_scaling(w1_uncond, w2[:-1], codes, "A")
    with pytest.raises(WeightError, match="needs the level-2 weight"):
        apply_scaling(w1_uncond, None, codes, "timss")
    with pytest.raises(WeightError, match="group_codes"):
        apply_scaling(w1_uncond, w2, codes.astype(float), "A")
    with pytest.raises(WeightError, match="group_codes"):
        apply_scaling(w1_uncond, w2, codes[:-1], "A")


def test_normalise_scaling():
    assert normalise_scaling(None) is None
    assert normalise_scaling(None, allow_unset=True) == "unset"
    assert normalise_scaling("None") is None
    assert normalise_scaling(False) is None
    assert normalise_scaling(" a ") == "A"
    assert normalise_scaling("Timss") == "timss"
    with pytest.raises(ConfigError, match="scaling"):
        normalise_scaling(1)


# ---------------------------------------------------------------------------------------------
# presets
# ---------------------------------------------------------------------------------------------

PISA_COLS = ["SCHOOLID", "PV1MATH", "W_FSTUWT", "W_FSCHWT", "condwt"]


def test_pisa_preset_case_insensitive():
    plan = resolve_survey("pisa", PISA_COLS)
    assert plan.survey == "PISA"
    assert plan.weights == ("W_FSTUWT", "W_FSCHWT")
    assert plan.cweights is False and plan.scaling == "A" and not plan.scaled_as_unconditional
    assert "method A" in plan.note and "PISA" in plan.note


def test_pisa_edsurvey_compat_is_method_b_with_e3():
    plan = resolve_survey("PISA", PISA_COLS, edsurvey_compat=True)
    assert plan.scaling == "B" and plan.scaled_as_unconditional
    assert "E1" in plan.note and "E3" in plan.note


@pytest.mark.parametrize("name", ["TIMSS", "timss advanced", "TIMSS_Advanced", "Timss-Advanced", "pirls"])
def test_timss_family_presets(name):
    plan = resolve_survey(name, ["IDSCHOOL", "TotWgt", "SCHWGT"])
    assert plan.weights == ("TotWgt", "SCHWGT")
    assert plan.scaling == "timss" and plan.cweights is False


def test_pirls_edsurvey_compat_raw_weights_with_warning():
    with pytest.warns(Warning, match="PIRLS"):
        plan = resolve_survey("PIRLS", ["totwgt", "schwgt"], edsurvey_compat=True)
    assert plan.scaling is None and not plan.scaled_as_unconditional
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        timss = resolve_survey("TIMSS", ["totwgt", "schwgt"], edsurvey_compat=True)
    assert timss.scaling == "timss" and timss.scaled_as_unconditional


def test_talis_preset():
    plan = resolve_survey("TALIS", ["IDTEACH", "TCHWGT", "SCHWGT"])
    assert plan.weights == ("TCHWGT", "SCHWGT") and plan.scaling == "A" and not plan.cweights


@pytest.mark.parametrize("name", ["ICCS", "icils"])
def test_iea_product_presets(name):
    rng = np.random.default_rng(3)
    school = np.repeat([0, 1, 2], [4, 2, 5])
    fac1 = np.array([10.0, 20.0, 5.0])[school]
    adj1 = np.array([1.1, 1.0, 1.2])[school]
    student = rng.uniform(1, 3, size=school.size) * rng.uniform(1, 1.2, size=school.size)
    df = pd.DataFrame({"IDSCHOOL": school, "TOTWGTS": fac1 * adj1 * student, "WGTFAC1": fac1, "WGTADJ1S": adj1})
    plan = resolve_survey(name, df.columns)
    assert plan.weights == ("TOTWGTS", "WGTFAC1*WGTADJ1S") and plan.cweights is False and plan.scaling is None
    out = plan.materialise(df)
    assert "WGTFAC1*WGTADJ1S" not in df.columns  # the input is not modified
    np.testing.assert_allclose(out["WGTFAC1*WGTADJ1S"], fac1 * adj1, rtol=0)
    cond = plan.apply(out["TOTWGTS"].to_numpy(), out["WGTFAC1*WGTADJ1S"].to_numpy(), school)
    # the conditional level-1 weight is the product of the within-school factors
    np.testing.assert_allclose(cond, student, rtol=1e-14)


@pytest.mark.parametrize("name", ["NAEP", "ECLS-K", "eclsk", "ELS", "CIVED", "PIAAC"])
def test_surveys_without_recommendation(name):
    with pytest.raises(ConfigError, match=r"no recommended weights.*weights=\["):
        resolve_survey(name, ["origwt", "smsrswt"])
    plan = resolve_survey(name, ["origwt", "smsrswt"], weights=["origwt", "smsrswt"])
    assert plan.weights == ("origwt", "smsrswt") and plan.scaling is None
    assert "no recommendation" in plan.note
    # the user may still choose a scaling
    assert resolve_survey(name, None, weights=["a", "b"], scaling="B").scaling == "B"


def test_cived_error_mentions_timss():
    with pytest.raises(ConfigError, match="TIMSS"):
        resolve_survey("cived", [])


def test_every_preset_is_reachable_by_name():
    for name in SURVEYS:
        assert lookup_survey(name.lower()).name == name
    assert set(SURVEYS) == {"PISA", "TIMSS", "TIMSS Advanced", "PIRLS", "TALIS", "ICCS", "ICILS", "NAEP",
                            "ECLS-K", "ELS", "CIVED", "PIAAC"}


def test_unknown_survey_suggests():
    with pytest.raises(ConfigError, match=r"unknown survey 'PISSA'.*'PISA'"):
        resolve_survey("PISSA", PISA_COLS)


def test_missing_columns_are_all_named():
    with pytest.raises(WeightError, match=r"w_fstuwt, w_fschwt"):
        resolve_survey("PISA", ["SCHOOLID", "PV1MATH"])
    with pytest.raises(WeightError, match=r"schwgt$"):
        resolve_survey("TIMSS", ["TOTWGT"])


def test_ambiguous_column_case():
    with pytest.raises(WeightError, match="differ only in case"):
        find_columns(["totwgt", "TOTWGT_x", "TotWgt", "x"], ["TOTWGT"])
    assert find_columns(["totwgt", "TOTWGT"], ["TOTWGT"]) == ["TOTWGT"]  # exact match wins


def test_user_weights_and_explicit_scaling_override_preset():
    plan = resolve_survey("PISA", PISA_COLS, weights=["condwt", "W_FSCHWT"], cweights=True)
    assert plan.weights == ("condwt", "W_FSCHWT") and plan.cweights and plan.scaling == "A"
    off = resolve_survey("PISA", PISA_COLS, scaling="none")
    assert off.scaling is None and "as requested" in off.note
    b = resolve_survey("PISA", PISA_COLS, scaling="B", edsurvey_compat=False)
    assert b.scaling == "B" and not b.scaled_as_unconditional


def test_cweights_conflicts_with_preset_columns():
    with pytest.raises(ConfigError, match="cweights=True"):
        resolve_survey("PISA", PISA_COLS, cweights=True)


def test_no_survey_passes_through():
    plan = resolve_survey(None, None, weights=["w1", "w2"], cweights=True, scaling="a")
    assert plan.survey is None and plan.weights == ("w1", "w2") and plan.cweights and plan.scaling == "A"
    assert resolve_survey().weights is None and resolve_survey().scaling is None
    compat = resolve_survey(None, None, weights=["w1", "w2"], scaling="B", edsurvey_compat=True)
    assert compat.scaled_as_unconditional
    with pytest.raises(WeightError, match="weights"):
        resolve_survey(None, None, weights=[1, 2])


def test_plan_scaler_matches_design_callable(design):
    codes, w1_cond, w2, w1_uncond = design
    w2_groups = np.zeros(codes.max() + 1)
    w2_groups[codes] = w2
    plan = resolve_survey("PISA", PISA_COLS)
    out, note = plan.scaler()(w1_uncond, w2_groups, codes, False)
    np.testing.assert_array_equal(out, apply_scaling(w1_uncond, w2, codes, "A"))
    assert note == plan.note
    assert resolve_survey("PISA", PISA_COLS, scaling="none").scaler() is None
    e3 = resolve_survey("PISA", PISA_COLS, edsurvey_compat=True).scaler()(w1_uncond, w2_groups, codes, False)[0]
    np.testing.assert_allclose(e3, apply_scaling(w1_uncond, w2, codes, "B") / w2, rtol=1e-15)
