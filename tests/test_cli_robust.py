"""The ``torchmix`` command under failure: all-or-nothing results folders, interrupts (SIGINT,
SIGTERM), exit statuses without tracebacks, unreadable TOML, ``--version``, ``--debug``, and the
level numbering of the output tables."""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import time
import tomllib
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import torchmix
from torchmix import cli, outputs
from torchmix.config import load_config
from torchmix.errors import ConfigError, NumericalError, WeightError

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}

SLEEP = """
[data]
dataset = "sleepstudy"
[model]
formula = "Reaction ~ Days + (1 + Days | Subject)"
"""


def write(folder: Path, text, name: str = "run.toml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


class FakeFit:
    """Stands in for MixedResults; ``tag`` marks which run wrote a file."""

    def __init__(self, tag: str = "A", converged: bool = True):
        self.tag, self.converged, self.lnl = tag, converged, -12.5
        self.ranef = {"Subject": pd.DataFrame({"(Intercept)": [1.5, -1.5]}, index=["308", "309"])}

    def summary(self):
        return f"SUMMARY OF RUN {self.tag}"

    def to_frame(self):
        return pd.DataFrame({"term": ["(Intercept)"], "kind": ["fixed"], "estimate": [1.0 if self.tag == "A" else 2.0]})


@pytest.fixture
def fake_mix(monkeypatch):
    calls = []

    def install(result=None, error=None, action=None):
        def mix(formula, data, **kwargs):
            calls.append(formula)
            if action is not None:
                action()
            if error is not None:
                raise error
            return FakeFit() if result is None else result
        monkeypatch.setattr(torchmix, "mix", mix, raising=False)
        return calls
    return install


def snapshot(folder: Path) -> dict:
    """Every file of a folder and its bytes."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def hidden_leftovers(parent: Path) -> list:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.fixture
def earlier_run(tmp_path, fake_mix, capsys):
    """A results folder written by a complete run ``A``; returns (config, folder, its files)."""
    fake_mix(result=FakeFit("A"))
    cfg = write(tmp_path, SLEEP)
    out = tmp_path / "res" / "sleep"
    assert cli.main(["fit", str(cfg), "--out", str(out), "--quiet"]) == 0
    files = snapshot(out)
    assert json.loads(files["run.json"])["converged"] is True and b"RUN A" in files["summary.txt"]
    capsys.readouterr()
    return cfg, out, files


# ----------------------------------------------------------------------------- all or nothing


def test_first_run_creates_missing_parents_and_leaves_nothing_else(tmp_path, fake_mix, capsys):
    fake_mix()
    out = tmp_path / "a" / "b" / "c"
    assert cli.main(["fit", str(write(tmp_path, SLEEP)), "--out", str(out), "--quiet"]) == 0
    assert set(snapshot(out)) == {"summary.txt", "estimates.csv", "random_effects.csv", "run.json"}
    assert hidden_leftovers(out.parent) == []


def test_a_new_run_replaces_every_file(earlier_run, fake_mix, capsys):
    cfg, out, _ = earlier_run
    fake_mix(result=FakeFit("B"))
    text = cfg.read_text() + "[output]\nformats = ['json']\n"
    cfg.write_text(text)
    assert cli.main(["fit", str(cfg), "--out", str(out), "--quiet"]) == 0
    # the csv tables of run A are gone: nothing of the earlier run survives beside run B's run.json
    assert set(snapshot(out)) == {"summary.txt", "estimates.json", "random_effects.json", "run.json"}
    assert "RUN B" in (out / "summary.txt").read_text()
    assert json.loads((out / "run.json").read_text())["files"] == ["summary.txt", "estimates.json",
                                                                   "random_effects.json", "run.json"]
    assert hidden_leftovers(out.parent) == []


def test_failed_write_keeps_the_earlier_results(earlier_run, fake_mix, monkeypatch, capsys):
    cfg, out, before = earlier_run
    fake_mix(result=FakeFit("B"))
    real = outputs._write_table

    def failing(table, folder, stem, formats):
        if stem == "random_effects":  # summary.txt and estimates.csv of run B are written by now
            assert (folder / "summary.txt").is_file() and (folder / "estimates.csv").is_file()
            raise OSError(28, "No space left on device", str(folder / "random_effects.csv"))
        return real(table, folder, stem, formats)

    monkeypatch.setattr(outputs, "_write_table", failing)
    assert cli.main(["fit", str(cfg), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "Traceback" not in err
    assert snapshot(out) == before
    assert hidden_leftovers(out.parent) == []


@pytest.mark.parametrize("how, status, word", [
    ("sigterm", 143, "terminated"),
    ("sigint", 130, "interrupted"),
    ("keyboard", 130, "interrupted"),
])
def test_interrupt_while_writing_keeps_the_earlier_results(earlier_run, fake_mix, monkeypatch, capsys,
                                                          how, status, word):
    cfg, out, before = earlier_run
    fake_mix(result=FakeFit("B"))
    real = outputs._write_table

    def interrupted(table, folder, stem, formats):
        real(table, folder, stem, formats)
        if how == "keyboard":
            raise KeyboardInterrupt
        os.kill(os.getpid(), signal.SIGTERM if how == "sigterm" else signal.SIGINT)
        time.sleep(5)  # the handler raises here
        raise AssertionError("the signal did not interrupt the run")

    monkeypatch.setattr(outputs, "_write_table", interrupted)
    t0 = time.perf_counter()
    assert cli.main(["fit", str(cfg), "--out", str(out)]) == status
    assert time.perf_counter() - t0 < 4
    err = capsys.readouterr().err
    assert err == f"torchmix: error: {word}\n"
    # no run.json of run B, no file of run B: the folder is run A's, whole
    assert snapshot(out) == before
    assert hidden_leftovers(out.parent) == []


def test_signal_handlers_are_restored(tmp_path, fake_mix, capsys):
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    fake_mix()
    assert cli.main(["fit", str(write(tmp_path, SLEEP)), "--out", str(tmp_path / "o"), "--quiet"]) == 0
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_interrupt_while_fitting_writes_nothing(tmp_path, fake_mix, capsys):
    def term():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)

    fake_mix(action=term)
    out = tmp_path / "o"
    assert cli.main(["fit", str(write(tmp_path, SLEEP)), "--out", str(out)]) == 143
    assert capsys.readouterr().err == "torchmix: error: terminated\n"
    assert not out.exists() and hidden_leftovers(tmp_path) == []


def test_failed_rename_restores_the_earlier_folder(earlier_run, fake_mix, monkeypatch, capsys):
    cfg, out, before = earlier_run
    fake_mix(result=FakeFit("B"))
    real, calls = os.rename, []

    def rename(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == 2:  # old folder moved away, new one about to move in
            raise OSError(5, "Input/output error")
        return real(src, dst)

    monkeypatch.setattr(outputs.os, "rename", rename)
    assert cli.main(["fit", str(cfg), "--out", str(out), "--quiet"]) == 2
    assert calls[0][0] == "sleep" and calls[1][1] == "sleep" and calls[2] == (calls[0][1], "sleep")
    assert snapshot(out) == before
    assert hidden_leftovers(out.parent) == []


def test_interrupt_during_the_swap_is_held_until_it_is_complete(earlier_run, fake_mix, monkeypatch, capsys):
    cfg, out, _ = earlier_run
    fake_mix(result=FakeFit("B"))
    real = outputs._swap_in

    def swap(new, target):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)  # a handler that raised would raise here
        real(new, target)

    monkeypatch.setattr(outputs, "_swap_in", swap)
    assert cli.main(["fit", str(cfg), "--out", str(out), "--quiet"]) == 130
    # the swap finished: the folder is run B's, whole and consistent
    assert "RUN B" in (out / "summary.txt").read_text()
    assert json.loads((out / "run.json").read_text())["converged"] is True
    assert hidden_leftovers(out.parent) == []


# ----------------------------------------------------------------------------- the folder, before fitting


def test_output_folder_problems_are_found_before_fitting(tmp_path, fake_mix, monkeypatch, capsys):
    calls = fake_mix()
    cfg = write(tmp_path, SLEEP)
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    user = tmp_path / "project"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    (user / "run.json").write_text("{}")
    cases = {
        str(afile): "exists and is not a folder",
        str(afile / "sub"): "is not a folder",
        str(user): "holds files torchmix did not write ('notes.txt')",
    }
    for target, piece in cases.items():
        assert cli.main(["fit", str(cfg), "--out", target]) == 2, target
        err = capsys.readouterr().err
        assert err.startswith("torchmix: error: --out: ") and piece in err and "Traceback" not in err, err
    assert afile.read_text() == "keep me" and (user / "notes.txt").read_text() == "mine"

    real_mkdir = Path.mkdir

    def no_permission(self, *a, **k):
        if ".probe-" in self.name:
            raise PermissionError(13, "Permission denied", str(self))
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", no_permission)
    assert cli.main(["fit", str(cfg), "--out", str(tmp_path / "new" / "folder")]) == 2
    err = capsys.readouterr().err
    assert "cannot write results under" in err and "Permission denied" in err
    monkeypatch.chdir(tmp_path)
    assert cli.main(["validate", str(cfg)]) == 2  # validate checks the (default) folder too
    assert "output folder: cannot write results under" in capsys.readouterr().err
    capsys.readouterr()
    assert calls == []  # nothing was fitted
    assert not (tmp_path / "new").exists()


def test_output_folder_from_the_config_is_named(tmp_path, fake_mix, capsys):
    fake_mix()
    (tmp_path / "taken").write_text("x")
    cfg = write(tmp_path, SLEEP + "[output]\nfolder = 'taken'\n")
    for command in (["fit", str(cfg)], ["validate", str(cfg)]):
        assert cli.main(command) == 2
        err = capsys.readouterr().err
        assert f"[output] folder in {cfg}" in err and "is not a folder" in err


# ----------------------------------------------------------------------------- TOML that cannot be read


@pytest.mark.parametrize("content, pieces", [
    (b"[data]\ndataset = \"sleep\xe9study\"\n", ["not UTF-8", "byte 0xe9 on line 2"]),
    (b"\xff\xfe[\x00d\x00a\x00t\x00a\x00]\x00", ["not UTF-8", "line 1"]),
    (b"[model]\nstart = " + b"[" * 20000 + b"]" * 20000 + b"\n", ["nested too deeply"]),
    (b"[model]\nx = " + b"{a = " * 20000 + b"1" + b"}" * 20000 + b"\n", ["nested too deeply"]),
])
def test_unreadable_toml_is_a_config_error(tmp_path, content, pieces, capsys):
    cfg = write(tmp_path, content)
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    for piece in pieces:
        assert piece in str(info.value)
    for command in ("fit", "validate"):
        assert cli.main([command, str(cfg), *(["--out", str(tmp_path / "o")] if command == "fit" else [])]) == 2
        err = capsys.readouterr().err
        assert err.startswith("torchmix: error: ") and err.count("\n") == 1 and "Traceback" not in err
        assert all(p in err for p in pieces)


def test_long_wrong_values_are_shortened_in_messages(tmp_path):
    cfg = write(tmp_path, SLEEP + "[fit]\nmax_iter = [" + ", ".join(["1"] * 10000) + "]\n")
    with pytest.raises(ConfigError, match=r"\[fit\] max_iter must be an integer >= 1") as info:
        load_config(cfg)
    assert len(str(info.value)) < 300


def test_tomli_is_used_before_python_311(monkeypatch):
    """On Python < 3.11 (no tomllib) the config reader takes tomli, a dependency there."""
    import torchmix.config.validate as validate

    fake = types.ModuleType("tomli")
    fake.loads, fake.TOMLDecodeError = tomllib.loads, tomllib.TOMLDecodeError
    monkeypatch.setitem(sys.modules, "tomllib", None)  # import tomllib fails
    monkeypatch.setitem(sys.modules, "tomli", fake)
    try:
        importlib.reload(validate)
        assert validate._toml is fake
    finally:
        monkeypatch.undo()
        importlib.reload(validate)
    assert validate._toml is tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert 'tomli>=1.1; python_version < "3.11"' in deps


# ----------------------------------------------------------------------------- exit statuses and --debug


@pytest.mark.parametrize("error, status, piece", [
    (NumericalError("the likelihood is not finite"), 1, "numerical failure: the likelihood is not finite"),
    (WeightError("weight column 'w' is not numeric"), 2, "weight column 'w' is not numeric"),
    (ConfigError("n_quad must be a positive integer"), 2, "n_quad must be a positive integer"),
    (KeyboardInterrupt(), 130, "interrupted"),
    (RuntimeError("boom"), 1, "unexpected error (RuntimeError: boom); run again with --debug"),
    (RecursionError("maximum recursion depth exceeded"), 1, "unexpected error (RecursionError"),
])
def test_exit_statuses_without_traceback(tmp_path, fake_mix, capsys, error, status, piece):
    fake_mix(error=error)
    out = tmp_path / "o"
    assert cli.main(["fit", str(write(tmp_path, SLEEP)), "--out", str(out)]) == status
    captured = capsys.readouterr()
    assert captured.err.startswith("torchmix: error: ") and piece in captured.err
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err and captured.out == ""
    assert not out.exists()


def test_non_convergence_is_a_success_recorded_in_run_json(tmp_path, fake_mix, capsys):
    fake_mix(result=FakeFit(converged=False))
    out = tmp_path / "o"
    assert cli.main(["fit", str(write(tmp_path, SLEEP)), "--out", str(out), "--quiet"]) == 0
    assert json.loads((out / "run.json").read_text())["converged"] is False


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_prints_the_traceback(tmp_path, fake_mix, capsys, where):
    fake_mix(error=RuntimeError("boom"))
    args = ["fit", str(write(tmp_path, SLEEP)), "--out", str(tmp_path / "o")]
    args = ["--debug", *args] if where == "before" else [*args, "--debug"]
    assert cli.main(args) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "RuntimeError: boom" in err
    assert err.rstrip("\n").splitlines()[-1] == "torchmix: error: unexpected error (RuntimeError: boom)"


def test_version(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out == f"torchmix {torchmix.__version__}\n"
    assert torchmix.__version__ == tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


@pytest.mark.slow
def test_sigterm_from_outside_a_real_process(tmp_path):
    """A separate process fitting (a stand-in fit that waits) gets SIGTERM: exit 143, one line on
    stderr, no traceback, the earlier results folder untouched."""
    out = tmp_path / "o"
    out.mkdir()
    (out / "run.json").write_text('{"converged": true}')
    cfg = write(tmp_path, SLEEP)
    script = (
        "import sys, time, torchmix\n"
        "from torchmix import cli\n"
        "def mix(*a, **k):\n"
        "    print('fitting', file=sys.stderr, flush=True)\n"
        "    time.sleep(60)\n"
        "torchmix.mix = mix\n"
        f"sys.exit(cli.main(['fit', {str(cfg)!r}, '--out', {str(out)!r}]))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr.readline() == "fitting\n"
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 143
    assert stderr == "torchmix: error: terminated\n" and stdout == ""
    assert snapshot(out) == {"run.json": b'{"converged": true}'} and hidden_leftovers(tmp_path) == []


# ----------------------------------------------------------------------------- levels in the tables


def three_level_data(seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    school = np.repeat(np.arange(8), 12)
    klass = school * 10 + np.tile(np.repeat(np.arange(3), 4), 8)
    x = rng.normal(size=school.size)
    y = 1 + 0.5 * x + rng.normal(size=8)[school] + 0.7 * rng.normal(size=80)[klass % 80] + rng.normal(size=school.size)
    return pd.DataFrame({"y": y, "x": x, "school": school, "class": klass})


def test_level_numbers_agree_two_levels(tmp_path, capsys):
    cfg = write(tmp_path, SLEEP + "[fit]\nprogress = false\n")
    out = tmp_path / "o"
    assert cli.main(["fit", str(cfg), "--out", str(out), "--quiet"]) == 0
    est = pd.read_csv(out / "estimates.csv", keep_default_na=False)
    ranef = pd.read_csv(out / "random_effects.csv", dtype={"id": str})
    variances = est[est["kind"] == "variance"]
    assert dict(zip(variances["group"], variances["level"])) == {"Subject": 2, "Residual": 1}
    assert set(zip(ranef["level"], ranef["group"])) == {(2, "Subject")}
    assert len(ranef) == 36 and ranef["id"].nunique() == 18


@pytest.mark.slow
def test_level_numbers_agree_between_estimates_and_random_effects(tmp_path, capsys):
    """level 1 = observations, 2 = the lowest grouping (classes), 3 = schools, in both tables."""
    three_level_data().to_csv(tmp_path / "d.csv", index=False)
    cfg = write(tmp_path, "[data]\npath = 'd.csv'\n[model]\nformula = 'y ~ x + (1 | school/class)'\n"
                          "[fit]\nprogress = false\n")
    out = tmp_path / "o"
    assert cli.main(["fit", str(cfg), "--out", str(out), "--quiet"]) == 0
    est = pd.read_csv(out / "estimates.csv", keep_default_na=False)
    ranef = pd.read_csv(out / "random_effects.csv", dtype={"id": str})
    variances = est[est["kind"] == "variance"]
    assert dict(zip(variances["group"], variances["level"])) == {"school:class": 2, "school": 3, "Residual": 1}
    pairs = set(zip(ranef["level"], ranef["group"]))
    assert pairs == {(2, "school:class"), (3, "school")}
    assert ranef.groupby("level")["id"].nunique().to_dict() == {2: 24, 3: 8}


# ----------------------------------------------------------------------------- a repeated row index


def test_plausible_values_with_a_repeated_row_index():
    """A repeated row index is valid input: the fit equals the one with a fresh RangeIndex."""
    data = torchmix.load_dataset("sleepstudy")
    rng = np.random.default_rng(3)
    for k in range(1, 4):
        data[f"pv{k}"] = data["Reaction"] + rng.normal(scale=20.0, size=len(data))
    data.loc[5, "Days"] = np.nan  # one row dropped, so kept rows and labels must be matched by position
    repeated = data.set_axis(np.repeat(np.arange(len(data) // 2), 2), axis=0)
    assert not repeated.index.is_unique
    kw = dict(plausible_values={"r": ["pv1", "pv2", "pv3"]}, progress=False)
    with pytest.warns(torchmix.errors.DataWarning):
        a = torchmix.mix("r ~ Days + (1 + Days | Subject)", repeated, **kw)
    with pytest.warns(torchmix.errors.DataWarning):
        b = torchmix.mix("r ~ Days + (1 + Days | Subject)", data.reset_index(drop=True), **kw)
    for fa, fb in zip(a.fits, b.fits):
        np.testing.assert_allclose(fa.coef.to_numpy(), fb.coef.to_numpy(), rtol=1e-10)
        np.testing.assert_allclose(fa.se.to_numpy(), fb.se.to_numpy(), rtol=1e-8)
        np.testing.assert_allclose(fa.varcomp.to_numpy(), fb.varcomp.to_numpy(), rtol=1e-8)
    np.testing.assert_allclose(a.coef.to_numpy(), b.coef.to_numpy(), rtol=1e-10)
    np.testing.assert_allclose(a.se.to_numpy(), b.se.to_numpy(), rtol=1e-8)
    # each plausible value is the response of its own fit, row for row
    with pytest.warns(torchmix.errors.DataWarning):
        single = torchmix.mix("pv3 ~ Days + (1 + Days | Subject)", data.reset_index(drop=True), progress=False)
    np.testing.assert_allclose(a.fits[2].coef.to_numpy(), single.coef.to_numpy(), rtol=1e-6)
    # fitted values carry the caller's (repeated) labels of the rows kept
    assert list(a.fits[0].fitted().index) == [i for j, i in enumerate(repeated.index) if j != 5]
