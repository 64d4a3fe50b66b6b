"""A formula cannot run code; column names with dots or spaces work everywhere; ``^`` in calls is power.

Every attack below would create a marker file if it ran; each must be a FormulaError (exit 2 from
the command line, no traceback) and the marker must not exist afterwards.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import formulaic
import numpy as np
import pandas as pd
import pytest

import torchmix as tm
from torchmix import cli
from torchmix import formula_safety as safety_mod
from torchmix import formula as formula_mod
from torchmix.errors import ConfigError, FormulaError
from torchmix.formula import parse_formula
from torchmix.formula_context import evaluation_context
from torchmix.formula_text import rewrite_power

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}

# Each payload is a Python expression that creates the file MARKER if evaluated.
PAYLOADS = {
    "attribute_chain": 'np.lib._datasource.os.system("touch MARKER")',
    "import": '__import__("os").system("touch MARKER")',
    "eval": 'eval("__import__(\'os\').system(\'touch MARKER\')")',
    "exec": 'exec("import os; os.system(\'touch MARKER\')")',
    "getattr": 'getattr(getattr(getattr(np, "lib"), "_datasource"), "os").system("touch MARKER")',
    "globals": 'globals()["__builtins__"]["__import__"]("os").system("touch MARKER")',
    "open": 'open("MARKER", "w")',
    "lambda": '(lambda: __import__("os").system("touch MARKER"))()',
    "comprehension": '[__import__("os").system("touch MARKER") for _ in [0]]',
    "generator": 'list(__import__("os").system("touch MARKER") for _ in [0])',
    "class_bases": '().__class__.__bases__[0].__subclasses__()',
    "fstring": 'f"{__import__(\'os\').system(\'touch MARKER\')}"',
    "backticked_call": '`__import__`("os").system("touch MARKER")',
    "function_globals": 'np.where.__globals__["os"].system("touch MARKER")',
    "contrast_chain": 'contr.treatment.__init__.__globals__["sys"].modules["os"].system("touch MARKER")',
    "keyword_value": 'scale(Days, ddof=__import__("os").system("touch MARKER"))',
    "private_keyword": 'scale(Days, _state=__import__("os").system("touch MARKER"))',
    "starred": 'np.log(*[__import__("os").system("touch MARKER")])',
    "walrus": '(f := __import__("os")).system("touch MARKER")',
    "conditional": '__import__("os").system("touch MARKER") if Days else 0',
    "subscript": 'Days[__import__("os").system("touch MARKER")]',
    "string_in_Q": 'Q(__import__("os").system("touch MARKER"))',
    "contrast_arg": 'C(Subject, __import__("os").system("touch MARKER"))',
    "vars_builtins": 'vars()["__builtins__"].open("MARKER", "w")',
}


def _formulas(payload: str) -> dict:
    return {
        "fixed": f"Reaction ~ Days + I({payload}) + (1 | Subject)",
        "fixed_bare": f"Reaction ~ Days + {{{payload}}} + (1 | Subject)",
        "random": f"Reaction ~ Days + (1 + I({payload}) | Subject)",
        "group": f"Reaction ~ Days + (1 | {payload})",
        "response": f"I({payload}) ~ Days + (1 | Subject)",
    }


@pytest.fixture(scope="module")
def sleep():
    return tm.load_dataset("sleepstudy")


@pytest.mark.parametrize("route", sorted(PAYLOADS))
def test_no_route_runs_code_through_mix(route, sleep, tmp_path):
    marker = tmp_path / "marker"
    for where, formula in _formulas(PAYLOADS[route].replace("MARKER", str(marker))).items():
        with pytest.raises(FormulaError) as err:
            tm.mix(formula, sleep, progress=False)
        assert not marker.exists(), (route, where)
        msg = str(err.value)
        assert "not allowed" in msg or "grouping factor" in msg or "cannot read" in msg, (route, where, msg)


def test_the_message_names_the_term(sleep):
    with pytest.raises(FormulaError, match=r"term 'I\(eval\(1\)\)' in random term .*calling 'eval'"):
        tm.mix("Reaction ~ Days + (1 + I(eval(1)) | Subject)", sleep)
    with pytest.raises(FormulaError, match=r"grouping factor 'os.system\(\"x\"\)'"):
        tm.mix('Reaction ~ Days + (1 | os.system("x"))', sleep)


def test_second_wall_context_refuses_without_the_check(sleep, tmp_path, monkeypatch):
    """With the allow-list check switched off, the evaluation context alone stops every route."""
    marker = tmp_path / "marker"

    def unchecked(text, where, formula, transforms=(), lhs=False):
        f = formulaic.Formula(f"{text} ~ 1" if lhs else text)
        return sorted(v for v in f.required_variables if v in sleep.columns)

    monkeypatch.setattr(formula_mod, "check_part", lambda *a, **k: None)
    monkeypatch.setattr(safety_mod, "part_columns", unchecked)
    for route in ("attribute_chain", "import", "eval", "exec", "getattr", "globals", "open", "lambda",
                  "comprehension", "function_globals", "vars_builtins"):
        payload = PAYLOADS[route].replace("MARKER", str(marker))
        with pytest.raises(FormulaError):
            tm.mix(f"Reaction ~ Days + I({payload}) + (1 | Subject)", sleep, progress=False)
        assert not marker.exists(), route
    ctx = evaluation_context()
    for name in ("__import__", "eval", "exec", "getattr", "globals", "open", "vars", "compile", "lag", "hashed"):
        with pytest.raises(FormulaError):
            ctx[name]("x")
    assert not hasattr(ctx["np"], "lib") and not hasattr(ctx["np"], "load")


def _cli_config(folder: Path, formula: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "run.toml"
    path.write_text(f'[data]\ndataset = "sleepstudy"\n[model]\nformula = """{formula}"""\n', encoding="utf-8")
    return path


@pytest.mark.parametrize("route", ["attribute_chain", "import", "eval", "getattr", "globals", "open",
                                   "lambda", "comprehension", "class_bases", "fstring"])
def test_no_route_runs_code_through_the_command(route, tmp_path, capsys):
    marker = tmp_path / "marker"
    for where, formula in _formulas(PAYLOADS[route].replace("MARKER", str(marker))).items():
        cfg = _cli_config(tmp_path / where, formula)
        assert cli.main(["validate", str(cfg)]) == 2, (route, where)
        assert cli.main(["fit", str(cfg), "--out", str(tmp_path / where / "out"), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and ("not allowed" in err or "grouping factor" in err), err
        assert not marker.exists(), (route, where)
        assert not (tmp_path / where / "out" / "run.json").exists()


@pytest.mark.slow
def test_command_line_process_exits_2_without_traceback(tmp_path):
    marker = tmp_path / "marker"
    for route in ("attribute_chain",):
        formula = _formulas(PAYLOADS[route].replace("MARKER", str(marker)))["fixed"]
        cfg = _cli_config(tmp_path / route, formula)
        for args in (["validate", str(cfg)], ["fit", str(cfg), "--out", str(tmp_path / route / "out")]):
            proc = subprocess.run([sys.executable, "-m", "torchmix", *args], capture_output=True, text=True,
                                  env=ENV, cwd=tmp_path, timeout=120)
            assert proc.returncode == 2, proc.stderr
            assert "Traceback" not in proc.stderr and "not allowed" in proc.stderr
            assert not marker.exists()


# ----------------------------------------------------------------------------- allowed formulas


def test_allowed_transforms_still_work(sleep):
    sleep = sleep.assign(g=np.where(sleep["Days"] % 2 == 0, "even", "odd"), pos=sleep["Days"] + 1)
    d = sleep.assign(a=np.log(sleep["pos"]), s=np.where(sleep["g"] == "even", 1.0, -1.0), c=(sleep["Days"] > 3) * 1.0,
                     dc=sleep["Days"] - sleep["Days"].mean())
    pairs = [("Reaction ~ np.log(pos) + I((Days > 3) * 1.0) + (1 | Subject)", "Reaction ~ a + c + (1 | Subject)"),
             ("Reaction ~ Days + C(g, contr.sum) + (1 | Subject)", "Reaction ~ Days + s + (1 | Subject)")]
    for formula, ref_formula in pairs:
        fit, ref = tm.mix(formula, sleep, progress=False), tm.mix(ref_formula, d, progress=False)
        np.testing.assert_allclose(fit.coef.to_numpy(), ref.coef.to_numpy(), rtol=1e-8)
    fit = tm.mix("Reaction ~ Days + (1 + center(Days) | Subject)", sleep, progress=False)
    ref = tm.mix("Reaction ~ Days + (1 + dc | Subject)", d, progress=False)
    np.testing.assert_allclose(fit.varcomp.to_numpy(), ref.varcomp.to_numpy(), rtol=1e-6)
    for formula in ("y ~ poly(x, 2) + bs(x, df=4) + scale(x) + center(x) + standardize(x) + (1 | g)",
                    "y ~ log(x) + log2(x) + log10(x) + log1p(x) + exp(x) + expm1(x) + sqrt(x) + abs(x) + (1 | g)",
                    "y ~ np.power(x, 2) + np.square(x) + np.floor(x) + np.clip(x, 0, 1) + np.where(x > 0, x, 0) + (1 | g)",
                    "y ~ C(f, levels=['b', 'a']) + C(f, contr.sum) + C(f, Treatment('b')) + x:C(f) + I(x * np.pi) + (1 | g)",
                    "y ~ x*z + x:z + (x + z)**2 + a %in% b + {x + 1} + I(-x) + I((x > 0) & (z < 1)) - 1 + (0 + x || g)"):
        parse_formula(formula)


def test_user_transforms_are_explicit(sleep):
    formula = "Reaction ~ logit((Days + 1) / 11) + (1 | Subject)"
    with pytest.raises(FormulaError, match="calling 'logit'"):
        tm.mix(formula, sleep)
    logit = lambda p: np.log(p / (1 - p))  # noqa: E731
    fit = tm.mix(formula, sleep, transforms={"logit": logit}, progress=False)
    ref = tm.mix("Reaction ~ lt + (1 | Subject)", sleep.assign(lt=logit((sleep["Days"] + 1) / 11)), progress=False)
    np.testing.assert_allclose(fit.coef.to_numpy(), ref.coef.to_numpy(), rtol=1e-10)
    np.testing.assert_allclose(fit.predict(sleep.head(20)).to_numpy(), ref.predict(
        sleep.head(20).assign(lt=logit((sleep["Days"].head(20) + 1) / 11))).to_numpy(), rtol=1e-10)
    for bad in ({"__import__": logit}, {"np": logit}, {"my f": logit}, {"f": 3}, ["logit"]):
        with pytest.raises(ConfigError):
            tm.mix(formula, sleep, transforms=bad)


@pytest.mark.parametrize("formula", [
    "y ~ `my var` + (1 | `school.id`)",
    "y ~ Q('my var') + (1 | Q('school.id'))",
    'y ~ Q("my var") + (1 + Q("my var") | `school.id`)',
    "y ~ `my var` + (1 + `my var` | school.id)",
    pytest.param("y ~ `my var` + (1 | `school.id`/`class id`)", marks=pytest.mark.slow),  # three levels
    "y ~ `my var` + (1 | `school.id`:Q('class id'))",
])
def test_quoted_names_everywhere_equal_renamed_columns(formula):
    rng = np.random.default_rng(7)
    school = np.repeat(np.arange(12), 10)
    cls = np.tile(np.repeat([1, 2], 5), 12)
    x = rng.normal(size=120)
    y = 1 + 0.5 * x + rng.normal(size=12)[school] + 0.3 * rng.normal(size=24)[school * 2 + cls - 1] + rng.normal(size=120)
    quoted = pd.DataFrame({"y": y, "my var": x, "school.id": school, "class id": cls})
    plain = quoted.rename(columns={"my var": "x", "school.id": "school", "class id": "cls"})
    ref_formula = (formula.replace("Q('my var')", "x").replace('Q("my var")', "x").replace("`my var`", "x")
                   .replace("Q('school.id')", "school").replace("`school.id`", "school").replace("school.id", "school")
                   .replace("`class id`", "cls").replace("Q('class id')", "cls"))
    fit, ref = tm.mix(formula, quoted, progress=False), tm.mix(ref_formula, plain, progress=False)
    np.testing.assert_allclose(fit.coef.to_numpy(), ref.coef.to_numpy(), rtol=1e-10)
    np.testing.assert_allclose(fit.se.to_numpy(), ref.se.to_numpy(), rtol=1e-8)
    np.testing.assert_allclose(fit.varcomp.to_numpy(), ref.varcomp.to_numpy(), rtol=1e-8)
    assert fit.lnl == pytest.approx(ref.lnl, rel=1e-12)


def test_quoted_column_joins_the_missing_value_mask():
    rng = np.random.default_rng(3)
    d = pd.DataFrame({"y": rng.normal(size=60), "my var": rng.normal(size=60), "g": np.repeat(np.arange(10), 6)})
    d.loc[[4, 17], "my var"] = np.nan
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit = tm.mix("y ~ Q('my var') + (1 | g)", d, progress=False)
    assert any("2 row(s)" in str(w.message) for w in caught)
    ref = tm.mix("y ~ x + (1 | g)", d.rename(columns={"my var": "x"}).dropna(), progress=False)
    np.testing.assert_allclose(fit.coef.to_numpy(), ref.coef.to_numpy(), rtol=1e-10)


def test_grouping_factor_names_are_columns():
    assert parse_formula("y ~ x + (1 | `a b`/Q('c.d'))").random[1].group_vars == ("a b", "c.d")
    assert parse_formula("y ~ x + (1 | school.id)").random[0].group == "school.id"
    for bad in ("y ~ (1 | g + h)", "y ~ (1 | g())", "y ~ (1 | Q(g))", "y ~ (1 | `a`b)", "y ~ (1 | g[0])"):
        with pytest.raises(FormulaError, match="grouping factor"):
            parse_formula(bad)


# ----------------------------------------------------------------------------- ^ means power in calls


def test_caret_inside_a_call_is_power_as_in_r(sleep):
    assert rewrite_power("y ~ I(age^2) + (a + b)^2 + log(x^3) + C(g, levels=['a^b'])") == \
        "y ~ I(age**2) + (a + b)^2 + log(x**3) + C(g, levels=['a^b'])"
    caret = tm.mix("Reaction ~ I(Days^2) + (1 | Subject)", sleep, progress=False)
    star = tm.mix("Reaction ~ I(Days**2) + (1 | Subject)", sleep, progress=False)
    manual = tm.mix("Reaction ~ d2 + (1 | Subject)", sleep.assign(d2=sleep["Days"].astype(float) ** 2), progress=False)
    np.testing.assert_allclose(caret.coef.to_numpy(), manual.coef.to_numpy(), rtol=1e-10)
    np.testing.assert_allclose(caret.se.to_numpy(), manual.se.to_numpy(), rtol=1e-8)
    np.testing.assert_allclose(star.coef.to_numpy(), manual.coef.to_numpy(), rtol=1e-10)
    # Days is integer: read as Python's xor, I(Days^2) would be Days with its bit 2 flipped
    xor = tm.mix("Reaction ~ d2 + (1 | Subject)", sleep.assign(d2=sleep["Days"] ^ 2), progress=False)
    assert abs(caret.coef.iloc[1] - xor.coef.iloc[1]) > 0.1


def test_caret_at_formula_level_crosses_terms_as_in_r(sleep):
    sleep = sleep.assign(z=np.cos(sleep["Days"]))
    crossed = tm.mix("Reaction ~ (Days + z)^2 + (1 | Subject)", sleep, progress=False)
    assert list(crossed.coef.index) == ["(Intercept)", "Days", "z", "Days:z"]
    assert rewrite_power("y ~ {x ^ 2} + x^2") == "y ~ {x ** 2} + x^2"


@pytest.mark.parametrize("formula", [
    "y ~ x # + I(1)\n + (1 | g)",
    "y ~ Q('a\\') + I(1) + Q(\\'b') + (1 | g)",
    "y ~ C(g, '''a') + I(1) + C(g, 'b''') + (1 | g)",
    "y ~ C(g, 'a' 'b') + (1 | g)",
    "y ~ x\x00 + (1 | g)",
])
def test_text_that_tokenizers_could_read_differently_is_refused(formula):
    with pytest.raises(FormulaError):
        parse_formula(formula)


def test_line_breaks_are_spaces():
    p = parse_formula("y ~ x +\n  I(x^2)\t+ (1 + x |\n g)")
    assert p.random[0].group == "g"


@pytest.mark.parametrize("formula", [
    "y ~ I(10**10**10) + (1 | g)",
    "y ~ I(x * 9**(9**9)) + (1 | g)",
    "y ~ C(g, 'a' * 1000000000) + (1 | g)",
    "y ~ poly(x, 1000000) + (1 | g)",
    "y ~ bs(x, df=10**6) + (1 | g)",
])
def test_constant_expressions_that_would_exhaust_the_machine_are_refused(formula):
    with pytest.raises(FormulaError):
        parse_formula(formula)


def test_small_constant_expressions_are_fine():
    parse_formula("y ~ I(x * 10**6) + I(2**x) + I(x**-2) + poly(x, 3) + (1 | g)")


def test_plausible_value_columns_with_any_name(sleep):
    data = sleep.assign(**{"pv 1": sleep["Reaction"], "pv.2": sleep["Reaction"] + np.sin(sleep["Days"])})
    pooled = tm.mix("Reaction ~ Days + (1 | Subject)", data, plausible_values={"Reaction": ["pv 1", "pv.2"]},
                    progress=False)
    assert np.isfinite(pooled.coef.to_numpy()).all()


@pytest.mark.parametrize("route", ["attribute_chain", "import", "eval", "open", "string_in_Q"])
def test_no_route_runs_code_through_an_offset(route, sleep, tmp_path):
    marker = tmp_path / "marker"
    payload = PAYLOADS[route].replace("MARKER", str(marker))
    with pytest.raises(FormulaError):
        tm.mix(f"Reaction ~ Days + offset(I({payload})) + (1 | Subject)", sleep, progress=False)
    assert not marker.exists()


def test_offsets_with_transforms_and_quoted_names(sleep):
    data = sleep.assign(**{"my n": sleep["Days"] + 1.0})
    fit = tm.mix("Reaction ~ Days + offset(log(`my n`)) + (1 | Subject)", data, progress=False)
    ref = tm.mix("Reaction ~ Days + offset(lo) + (1 | Subject)", data.assign(lo=np.log(data["my n"])),
                 progress=False)
    np.testing.assert_allclose(fit.coef.to_numpy(), ref.coef.to_numpy(), rtol=1e-10)
    twice = tm.mix("Reaction ~ Days + offset(dbl(Days)) + (1 | Subject)", data, progress=False,
                   transforms={"dbl": lambda v: 2 * v})
    ref = tm.mix("Reaction ~ Days + offset(d2) + (1 | Subject)", data.assign(d2=2.0 * data["Days"]), progress=False)
    np.testing.assert_allclose(twice.coef.to_numpy(), ref.coef.to_numpy(), rtol=1e-10)
