"""What a user reads and types: the call line, HTML, argument forms, warnings, progress bars,
the interface single and pooled results share, and the documentation's claims."""

from __future__ import annotations

import inspect
import re
import warnings
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import torchmix as tm
from torchmix.errors import (BoundaryWarning, ConfigError, ConvergenceWarning, DataWarning, TorchmixWarning,
                             WeightError)
from torchmix.plausible import PooledResults

ROOT = Path(__file__).resolve().parent.parent
FORMULA = "Reaction ~ Days + (1 | Subject)"


def quiet_mix(*args, **kw):
    kw.setdefault("progress", False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tm.mix(*args, **kw)


def recorded(fn, *args, **kw):
    """Run ``fn`` and return (result, list of torchmix/Future warnings caught)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn(*args, **kw)
    return out, [w for w in caught if issubclass(w.category, (TorchmixWarning, FutureWarning))]


@pytest.fixture(scope="module")
def sleep():
    df = tm.load_dataset("sleepstudy")
    subjects = sorted(df["Subject"].unique(), key=int)
    pos = df["Subject"].map({s: i + 1 for i, s in enumerate(subjects)})
    df["c1"] = 1 + 0.5 * (df["Days"] % 3)
    df["c2"] = 1 + 0.25 * ((pos - 1) % 4)
    df["x"] = np.cos(np.arange(len(df)))
    df["R2"] = df["Reaction"] + 5 * np.sin(np.arange(len(df)))
    df["R3"] = df["Reaction"] - 3 * np.cos(np.arange(len(df)))
    return df


@pytest.fixture(scope="module")
def single(sleep):
    return quiet_mix("Reaction ~ Days + (1 + Days | Subject)", sleep)


@pytest.fixture(scope="module")
def pooled(sleep):
    return quiet_mix("y ~ Days + (1 + Days | Subject)", sleep, plausible_values={"y": ["Reaction", "R2"]})


# --------------------------------------------------------------------------------- Call line

def test_call_line_shows_every_option_that_changes_the_model(sleep):
    res = quiet_mix("Reaction ~ Days + x + (1 | Subject)", sleep, weights=["c1", "c2"], cweights=True,
                    center_group={"Subject": ["Days"]}, center_grand=["x"], n_quad=7, scaling="A",
                    small_sample="none", max_iter=150)
    for piece in ["cweights = True", "center_group = {'Subject': ['Days']}", "center_grand = ['x']",
                  "n_quad = 7", "scaling = 'A'", "small_sample = 'none'", "max_iter = 150"]:
        assert piece in res.call
        assert piece in str(res.summary())
    assert res.call.startswith("mix(formula = 'Reaction ~ Days + x + (1 | Subject)', data = <DataFrame 180 x 8>, "
                               "weights = ['c1', 'c2'], ")
    pisa_like = sleep.rename(columns={"c1": "W_FSTUWT", "c2": "W_FSCHWT"})
    res = quiet_mix(FORMULA, pisa_like, survey="PISA", edsurvey_compat=True)
    assert "survey = 'PISA'" in res.call and "edsurvey_compat = True" in res.call


def test_call_line_leaves_out_defaults_and_options_that_do_not_change_the_model(sleep):
    res = quiet_mix(FORMULA, sleep, n_quad=13, small_sample="G/(G-1)", family="gaussian", dtype="float64",
                    device="cpu", deterministic=True)
    assert res.call == f"mix(formula = {FORMULA!r}, data = <DataFrame 180 x 8>)"


def test_call_mechanism_is_generic_for_new_keyword_arguments():
    from torchmix.report.call import NOT_IN_CALL, call_text, model_options

    def fit(formula, data, weights=None, *, cweights=False, se_type="sandwich", device="cpu", start=None):
        return model_options(fit, locals())

    assert fit("y ~ x", None) == {}
    assert fit("y ~ x", None, se_type="model", device="cuda", start=[1.0]) == {"se_type": "model"}
    assert {"device", "start", "progress", "deterministic"} == set(NOT_IN_CALL)
    frame = pd.DataFrame({"a": [1, 2]})
    assert call_text("y ~ x", frame, None, {"se_type": "model"}) == \
        "mix(formula = 'y ~ x', data = <DataFrame 2 x 1>, se_type = 'model')"
    # every keyword-only argument of mix() is either shown when changed or deliberately left out
    kw_only = [n for n, p in inspect.signature(tm.mix).parameters.items() if p.kind is p.KEYWORD_ONLY]
    assert {"center_group", "center_grand", "n_quad", "scaling", "survey", "small_sample", "edsurvey_compat",
            "cweights"} <= set(kw_only)


def test_summary_txt_of_the_command_line_shows_the_options(tmp_path):
    from torchmix import cli

    cfg = tmp_path / "run.toml"
    cfg.write_text('[data]\ndataset = "sleepstudy"\n[model]\nformula = "Reaction ~ Days + (1 | Subject)"\n'
                   'center_grand = ["Days"]\n[fit]\nsmall_sample = "none"\nprogress = false\n', encoding="utf-8")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli.main(["fit", str(cfg), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    text = (tmp_path / "out" / "summary.txt").read_text(encoding="utf-8")
    assert "center_grand = ['Days']" in text and "small_sample = 'none'" in text


# --------------------------------------------------------------------------------- HTML

class _Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.text, self.stack, self.errors = [], [], [], []
        self.tables = []  # per table: list of rows, each a list of cell texts
        self._cell = None

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag not in ("br", "meta"):
            self.stack.append(tag)
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"unbalanced </{tag}> (open: {self.stack[-3:]})")
            return
        self.stack.pop()
        if tag in ("td", "th"):
            self.tables[-1][-1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)


def _parse(markup: str) -> _Collector:
    p = _Collector()
    p.feed(markup)
    p.close()
    return p


@pytest.mark.parametrize("which", ["single", "pooled"])
def test_repr_html_is_escaped_tables(which, request):
    res = request.getfixturevalue(which)
    markup = res._repr_html_()
    p = _parse(markup)
    assert not p.errors and not p.stack
    assert set(p.tags) <= {"style", "div", "p", "strong", "code", "table", "caption", "thead", "tbody", "tr", "th",
                           "td"}
    text = "".join(p.text)
    assert "data = <DataFrame 180 x 8>" in text          # the call shows literally
    assert "&lt;DataFrame 180 x 8&gt;" in markup
    assert len(p.tables) == 4                               # variance terms, correlations, groups, fixed effects
    fixed = p.tables[-1]
    assert fixed[0] == ["", "Estimate", "Std. Error", "t value"]
    assert [r[0] for r in fixed[1:]] == ["(Intercept)", "Days"]
    np.testing.assert_allclose([float(r[1]) for r in fixed[1:]], res.coef.to_numpy(), rtol=1e-5)
    variance = p.tables[0]
    assert [r[2] for r in variance[1:]] == ["(Intercept)", "Days", ""]
    np.testing.assert_allclose(float(variance[3][3]), res.varcomp["Residual"], rtol=1e-5)
    if which == "pooled":
        assert "Plausible values:" in text and "Reaction, R2" in text


def test_html_escapes_every_cell():
    from torchmix.report.html import table_html

    frame = pd.DataFrame({"<b>col</b>": ["<script>x</script>", 1.5]}, index=["a&b", "<i>"])
    markup = table_html(frame, "caption <here>")
    assert "<script>" not in markup and "<b>" not in markup and "<i>" not in markup
    p = _parse(markup)
    assert p.tables[0] == [["", "<b>col</b>"], ["a&b", "<script>x</script>"], ["<i>", "1.5"]]


def test_summary_html_is_escaped(single):
    markup = single.summary()._repr_html_()
    assert "&lt;DataFrame 180 x 8&gt;" in markup and "<DataFrame" not in markup


# --------------------------------------------------------------------------------- arguments

def test_reml_true_is_a_config_error_that_says_why(sleep):
    with pytest.raises(ConfigError, match=r"REML is not offered.*pseudo-likelihood.*maximum"):
        tm.mix(FORMULA, sleep, REML=True, progress=False)
    res = quiet_mix(FORMULA, sleep, REML=False)   # what torchmix does anyway
    assert res.converged


def test_cweights_alias(sleep):
    a = quiet_mix(FORMULA, sleep, weights=["c1", "c2"], cWeights=True)
    b = quiet_mix(FORMULA, sleep, weights=["c1", "c2"], cweights=True)
    np.testing.assert_allclose(a.coef.to_numpy(), b.coef.to_numpy(), rtol=1e-10)
    np.testing.assert_allclose(a.lnl, b.lnl, rtol=1e-12)
    assert a.call == b.call
    with pytest.raises(ConfigError, match="cWeights"):
        tm.mix(FORMULA, sleep, weights=["c1", "c2"], cWeights=False, cweights=True, progress=False)


def test_weights_as_series_aligned_by_index(sleep):
    ref = quiet_mix(FORMULA, sleep, weights=["c1", "c2"], cweights=True)
    shuffled = sleep["c1"].sample(frac=1.0, random_state=3)     # same labels, another order
    a = quiet_mix(FORMULA, sleep, weights=[shuffled.rename("level1"), "c2"], cweights=True)
    np.testing.assert_allclose(a.coef.to_numpy(), ref.coef.to_numpy(), rtol=1e-10)
    np.testing.assert_allclose(a.lnl, ref.lnl, rtol=1e-12)
    assert "weights = [<Series 'level1'>, 'c2']" in str(a.summary())
    b = quiet_mix(FORMULA, sleep, weights=[pd.Series(sleep["c1"].to_numpy(), index=sleep.index), sleep["c2"]],
                  cweights=True)
    np.testing.assert_allclose(b.lnl, ref.lnl, rtol=1e-12)
    assert "weights = [<Series 'weights[0]'>, <Series 'c2'>]" in b.call
    assert list(sleep.columns) == ["Reaction", "Days", "Subject", "c1", "c2", "x", "R2", "R3"]  # data untouched


def test_weight_series_with_the_wrong_index_is_a_weight_error(sleep):
    short = sleep["c1"].iloc[:-5]
    with pytest.raises(WeightError, match=r"weights\[0\].*lacks 5"):
        tm.mix(FORMULA, sleep, weights=[short, "c2"], progress=False)
    moved = pd.Series(sleep["c1"].to_numpy(), index=sleep.index + 1000)
    with pytest.raises(WeightError, match="not aligned"):
        tm.mix(FORMULA, sleep, weights=[moved, "c2"], progress=False)


# --------------------------------------------------------------------------------- max_iter

def test_max_iter_bounds_the_gaussian_optimiser(sleep):
    # a start far from the optimum (the default moment start of a balanced design is the optimum itself)
    start = [0.0, 0.0, 1.0, 1.0, 0.0, 1.0]
    res, caught = recorded(tm.mix, "Reaction ~ Days + (1 + Days | Subject)", sleep, max_iter=1, start=start,
                           progress=False)
    assert not res.converged and res.iterations <= 1
    conv = [w for w in caught if issubclass(w.category, ConvergenceWarning)]
    assert len(conv) == 1 and "max_iter=1" in str(conv[0].message)
    assert conv[0].filename == __file__
    full = quiet_mix("Reaction ~ Days + (1 + Days | Subject)", sleep, start=start)
    assert full.converged and 1 < full.iterations <= 200


# --------------------------------------------------------------------------------- warnings

def test_warnings_point_at_the_callers_line(sleep):
    d = sleep.copy()
    d.loc[d.index[:4], "Days"] = np.nan
    d.loc[d.index[10:12], "c1"] = np.nan
    _, caught = recorded(tm.mix, FORMULA, d, weights=["c1", "c2"], n_quad=2.4, acc0=3, progress=False)
    kinds = {w.category for w in caught}
    assert {DataWarning, FutureWarning, TorchmixWarning} <= kinds
    assert all(w.filename == __file__ for w in caught), [(w.category, w.filename) for w in caught]
    dropped = [str(w.message) for w in caught if w.category is DataWarning][0]
    assert dropped.startswith("6 row(s)") and "'Days' 4" in dropped and "'c1' 2" in dropped
    assert "Reaction" not in dropped


def test_boundary_warning_points_at_the_caller():
    rng = np.random.default_rng(0)
    vals = np.array([1.0, 2.0, 3.0, 4.0])
    df = pd.DataFrame({"g": np.repeat(np.arange(10), 4),
                       "y": np.concatenate([rng.permutation(vals) for _ in range(10)])})
    res, caught = recorded(tm.mix, "y ~ 1 + (1 | g)", df, progress=False)
    bound = [w for w in caught if issubclass(w.category, BoundaryWarning)]
    assert len(bound) == 1 and bound[0].filename == __file__
    assert res.varcomp["g:(Intercept)"] == 0.0


@pytest.mark.slow
def test_glmm_warnings_point_at_the_caller(sleep):
    d = sleep.assign(slow=np.where(sleep["Reaction"] > 300, "Y", "N"))
    _, caught = recorded(tm.mix, "slow ~ Days + (1 | Subject)", d, family="binomial", n_quad=1, max_iter=1,
                         progress=False)
    kinds = {w.category for w in caught}
    assert {DataWarning, ConvergenceWarning} <= kinds
    assert all(w.filename == __file__ for w in caught)


# --------------------------------------------------------------------------------- progress bars

class _Bar:
    made = []

    def __init__(self, iterable=None, **kw):
        self.iterable, self.kw, self.updates, self.n = iterable, kw, [], 0
        _Bar.made.append(self)

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)

    def update(self, n=1):
        self.updates.append(n)
        self.n += n

    def set_postfix_str(self, *a, **k):
        pass

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_progress_bars_are_delayed_and_move_per_plausible_value(sleep, monkeypatch):
    from torchmix import progress as progress_module

    _Bar.made = []
    monkeypatch.setattr(progress_module, "tqdm", _Bar)
    quiet_mix("y ~ Days + (1 | Subject)", sleep, plausible_values={"y": ["Reaction", "R2", "R3"]},
              progress=True)
    pv = [b for b in _Bar.made if "plausible" in b.kw.get("desc", "")]
    assert len(pv) == 1
    assert pv[0].kw["total"] == 3 and pv[0].kw["delay"] >= 1.0 and not pv[0].kw["disable"]
    assert pv[0].updates[0] == 1 and sum(pv[0].updates) == 3      # moves after the first value
    assert all(b.kw.get("delay", 0) >= 1.0 for b in _Bar.made)


def test_a_quick_fit_prints_no_progress_bar(sleep, capsys):
    quiet_mix(FORMULA, sleep)                      # warm up
    capsys.readouterr()
    quiet_mix(FORMULA, sleep, progress=True)
    assert capsys.readouterr().err == ""


# --------------------------------------------------------------------------------- shared interface

def _public(obj) -> set:
    return {n for n in dir(obj) if not n.startswith("_")}


def test_single_and_pooled_results_share_one_interface(single, pooled):
    from torchmix.report.interface import POOLED_ONLY, SHARED_ATTRIBUTES

    assert isinstance(pooled, PooledResults)
    for name in SHARED_ATTRIBUTES:
        assert hasattr(single, name) and hasattr(pooled, name), name
    assert _public(single) - _public(pooled) == set()
    assert _public(pooled) - _public(single) <= set(POOLED_ONLY)


def test_pooled_members_are_means_or_none(single, pooled):
    fits = pooled.fits
    np.testing.assert_allclose(pooled.fitted().to_numpy(), (fits[0].fitted() + fits[1].fitted()).to_numpy() / 2,
                               rtol=1e-12)
    np.testing.assert_allclose(pooled.residuals().to_numpy(),
                               (fits[0].residuals() + fits[1].residuals()).to_numpy() / 2, rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(pooled.predict().to_numpy(), pooled.fitted().to_numpy(), rtol=1e-12)
    assert pooled.lnl is None and pooled.theta is None and pooled.u is None
    assert pooled.is_gaussian and abs(pooled.sigma ** 2 - pooled.varcomp["Residual"]) < 1e-9
    assert pooled.design is fits[0].design and pooled.iterations == sum(f.iterations for f in fits)
    assert pooled.message == "converged"
    # model-based covariance: Rubin's T with the model-based U_m
    est = np.stack([f.coef.to_numpy() for f in fits])
    ubar = (fits[0].vcov_model.to_numpy() + fits[1].vcov_model.to_numpy()) / 2
    dev = est - est.mean(0)
    np.testing.assert_allclose(pooled.vcov_model.to_numpy(), ubar + 1.5 * dev.T @ dev, rtol=1e-12)
    # a single fit's correlation
    vc = single.varcomp
    rho = vc["Subject:(Intercept):Days"] / np.sqrt(vc["Subject:(Intercept)"] * vc["Subject:Days"])
    assert single.correlations.to_dict() == pytest.approx({"Subject:(Intercept):Days": rho}, rel=1e-12)


# --------------------------------------------------------------------------------- documentation

def test_readme_comparison_table_and_claims():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    row = next(line for line in readme.splitlines() if line.startswith("| Levels, linear models"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2].startswith("any number")       # WeMix (NEWS 3.2.2)
    assert cells[3].startswith("2")                # EdSurvey mixed.sdf
    first_paragraph = readme.split("\n\n")[1]
    assert "EdSurvey (`mixed.sdf`)" not in first_paragraph and "numbers of the R package WeMix" in first_paragraph


def test_dataset_sources_speak_to_users():
    text = (ROOT / "torchmix" / "datasets" / "SOURCES.md").read_text(encoding="utf-8")
    for word in ["../shared", "tests/", "the project", "Copy what"]:
        assert word not in text
    assert "load_dataset" in text


def test_no_docstring_cites_a_missing_file():
    outputs = {"summary.txt", "estimates.csv", "random_effects.csv", "run.json", "sim3.csv"}
    missing = []
    for path in sorted((ROOT / "torchmix").rglob("*.py")):
        for name in re.findall(r"[\w./-]+\.(?:md|py|toml|csv)\b", path.read_text(encoding="utf-8")):
            base = name.split("/")[-1]
            if base in outputs or name.startswith("."):
                continue
            if not any((ROOT / d / name).exists() for d in ("", "docs", "torchmix", "configs")):
                missing.append(f"{path.relative_to(ROOT)}: {name}")
    assert missing == []
