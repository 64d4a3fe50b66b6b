"""The ``torchmix`` command: outputs, exit codes, messages; every example config end to end."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import torchmix
from torchmix import cli
from torchmix.config import load_config, load_data
from torchmix.errors import DataError, DataWarning, NumericalError

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "configs").glob("*.toml"))
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}

SLEEP = """
[data]
dataset = "sleepstudy"
[model]
formula = "Reaction ~ Days + (1 + Days | Subject)"
"""


def write(folder: Path, text: str, name: str = "run.toml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- with mix() replaced


class FakeFit:
    """Stands in for MixedResults: the attributes the command reads."""

    def __init__(self, converged=True, ranef=True):
        self.converged = converged
        self.lnl = -12.5
        self.ranef = {"Subject": pd.DataFrame({"(Intercept)": [1.5, -1.5], "Days": [0.25, -0.25]},
                                              index=pd.Index(["308", "309"], name="Subject"))} if ranef else None

    def summary(self):
        return "FAKE SUMMARY\nsecond line"

    def to_frame(self):
        return pd.DataFrame({"term": ["(Intercept)", "Days"], "kind": ["fixed", "fixed"],
                             "estimate": [251.405104848, 10.467285959], "std_error": [6.6, 1.5]})


class FakePooled(FakeFit):
    def __init__(self):
        super().__init__(ranef=False)
        self.converged = None
        self.lnl = None
        self.fits = [FakeFit(), FakeFit()]


@pytest.fixture
def fake_mix(monkeypatch):
    calls = []

    def install(result=None, error=None, warn=None):
        def mix(formula, data, **kwargs):
            calls.append((formula, data, kwargs))
            if warn:
                warnings.warn(warn, DataWarning)
            if error is not None:
                raise error
            return FakeFit() if result is None else result
        monkeypatch.setattr(torchmix, "mix", mix, raising=False)
        return calls
    return install


def test_fit_writes_every_output(tmp_path, fake_mix, capsys):
    calls = fake_mix(warn="3 row(s) with a missing value were dropped")
    cfg = write(tmp_path, SLEEP + "[fit]\nmax_iter = 7\n")
    out = tmp_path / "out"
    assert cli.main(["fit", str(cfg), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.out == "FAKE SUMMARY\nsecond line\n"
    assert "torchmix: warning: DataWarning: 3 row(s)" in captured.err
    assert "Traceback" not in captured.err and "warnings.warn" not in captured.err

    assert len(calls) == 1
    formula, data, kwargs = calls[0]
    assert formula == "Reaction ~ Days + (1 + Days | Subject)" and kwargs["max_iter"] == 7
    assert len(data) == 180

    assert (out / "summary.txt").read_text() == "FAKE SUMMARY\nsecond line\n"
    est = pd.read_csv(out / "estimates.csv")
    pd.testing.assert_frame_equal(est, FakeFit().to_frame())
    re = pd.read_csv(out / "random_effects.csv", dtype={"id": str})
    assert list(re.columns) == ["level", "group", "id", "effect", "value"]
    assert len(re) == 4
    row = re[(re.id == "309") & (re.effect == "Days")]
    assert row.value.tolist() == [-0.25] and row.level.tolist() == [2] and row.group.tolist() == ["Subject"]

    run = json.loads((out / "run.json").read_text())
    assert run["converged"] is True and run["lnl"] == -12.5
    assert run["config"]["model"]["formula"] == formula
    assert run["config"]["model"]["n_quad"] == 13 and run["config"]["fit"]["max_iter"] == 7
    assert run["config"]["fit"]["dtype"] == "float64"
    assert run["config"]["output"]["folder"] == str(out)
    assert run["versions"]["torch"] and run["versions"]["python"]
    assert run["device"]["device"] == "cpu"
    assert set(run["timings_s"]) == {"config", "load_data", "fit", "write", "total"}
    assert run["warnings"] == ["DataWarning: 3 row(s) with a missing value were dropped"]
    assert set(run["files"]) == {"summary.txt", "estimates.csv", "random_effects.csv", "run.json"}


def test_quiet_device_and_json_tables(tmp_path, fake_mix, capsys):
    calls = fake_mix()
    cfg = write(tmp_path, SLEEP + "[output]\nformats = ['json']\nfolder = 'res'\n")
    assert cli.main(["fit", str(cfg), "--quiet", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert captured.out == ""
    assert calls[0][2]["progress"] is False and calls[0][2]["device"] == "cpu"
    out = tmp_path / "res"  # [output] folder is relative to the config's folder
    est = pd.read_json(out / "estimates.json", orient="records")
    assert est["estimate"].tolist() == FakeFit().to_frame()["estimate"].tolist()
    assert len(json.loads((out / "random_effects.json").read_text())) == 4
    assert not (out / "estimates.csv").exists()


def test_default_output_folder_is_results_in_working_folder(tmp_path, fake_mix, monkeypatch, capsys):
    fake_mix()
    cfg = write(tmp_path / "cfgs", SLEEP, "mine.toml")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["fit", str(cfg), "--quiet"]) == 0
    assert (tmp_path / "results" / "mine" / "run.json").is_file()


def test_pooled_random_effects_per_plausible_value(tmp_path, fake_mix, capsys):
    fake_mix(result=FakePooled())
    out = tmp_path / "o"
    assert cli.main(["fit", str(write(tmp_path, SLEEP)), "--out", str(out), "--quiet"]) == 0
    re = pd.read_csv(out / "random_effects.csv")
    assert list(re.columns) == ["plausible_value", "level", "group", "id", "effect", "value"]
    assert sorted(re.plausible_value.unique()) == [1, 2] and len(re) == 8
    assert json.loads((out / "run.json").read_text())["converged"] is True


def test_not_converged_is_recorded(tmp_path, fake_mix, capsys):
    fake_mix(result=FakeFit(converged=False))
    out = tmp_path / "o"
    assert cli.main(["fit", str(write(tmp_path, SLEEP)), "--out", str(out), "--quiet"]) == 0
    assert json.loads((out / "run.json").read_text())["converged"] is False


@pytest.mark.parametrize("error, code, piece", [
    (NumericalError("the likelihood is not finite"), 1, "numerical failure: the likelihood is not finite"),
    (DataError("column 'x' is not numeric"), 2, "column 'x' is not numeric"),
])
def test_errors_from_mix_give_exit_codes(tmp_path, fake_mix, capsys, error, code, piece):
    fake_mix(error=error)
    out = tmp_path / "o"
    assert cli.main(["fit", str(write(tmp_path, SLEEP)), "--out", str(out)]) == code
    captured = capsys.readouterr()
    assert piece in captured.err and captured.err.startswith("torchmix: error: ")
    assert "Traceback" not in captured.err and captured.out == ""
    assert not (out / "run.json").exists()


def test_bad_input_before_mix(tmp_path, fake_mix, capsys):
    calls = fake_mix()
    assert cli.main(["fit", str(tmp_path / "absent.toml")]) == 2
    assert "absent.toml" in capsys.readouterr().err
    assert cli.main(["fit", str(write(tmp_path, SLEEP)), "--device", "tpux"]) == 2
    assert "'tpux'" in capsys.readouterr().err
    assert cli.main(["fit"]) == 2  # usage error
    assert cli.main([]) == 2
    assert calls == []


def test_parquet_output(tmp_path, fake_mix, capsys):
    fake_mix()
    cfg = write(tmp_path, SLEEP + "[output]\nformats = ['parquet']\n")
    out = tmp_path / "o"
    if importlib.util.find_spec("pyarrow") is None:
        assert cli.main(["fit", str(cfg), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert "pyarrow" in err and "[output] formats" in err and str(cfg) in err
        assert not out.exists()  # checked before anything is fitted or written
    else:
        assert cli.main(["fit", str(cfg), "--out", str(out), "--quiet"]) == 0
        pd.testing.assert_frame_equal(pd.read_parquet(out / "estimates.parquet"), FakeFit().to_frame())


def test_datasets_command(capsys):
    assert cli.main(["datasets"]) == 0
    out = capsys.readouterr().out
    for name in torchmix.list_datasets():
        assert name in out


def test_validate_command(tmp_path, fake_mix, capsys):
    calls = fake_mix()
    assert cli.main(["validate", str(write(tmp_path, SLEEP))]) == 0
    out = capsys.readouterr().out
    assert "OK" in out and "180 of 180 rows" in out and "'Subject': 18 groups" in out
    bad = write(tmp_path, SLEEP.replace("Days +", "Dayz +"), "bad.toml")
    assert cli.main(["validate", str(bad)]) == 2
    assert "'Dayz'" in capsys.readouterr().err
    assert calls == []  # nothing is fitted


def test_ranef_long_layout():
    table = cli.ranef_long({"school:class": pd.DataFrame({"(Intercept)": [0.1, 0.2]}, index=["a:1", "a:2"])})
    assert table.to_dict("list") == {"level": [2] * 2, "group": ["school:class"] * 2, "id": ["a:1", "a:2"],
                                     "effect": ["(Intercept)"] * 2, "value": [0.1, 0.2]}
    assert list(cli.ranef_long({}).columns) == ["level", "group", "id", "effect", "value"]


# ----------------------------------------------------------------------------- malformed configs

MALFORMED = {
    "unknown_key": (SLEEP + "n_quads = 13\n", ["'n_quads'", "did you mean 'n_quad'"]),
    "wrong_type": (SLEEP + "[fit]\nmax_iter = 'many'\n", ["[fit] max_iter", "integer"]),
    "missing_formula": ("[data]\ndataset = 'sleepstudy'\n[model]\nfamily = 'gaussian'\n",
                        ["missing required key 'formula'"]),
    "missing_file": ("[data]\npath = 'absent.csv'\n[model]\nformula = 'y ~ x + (1 | g)'\n",
                     ["absent.csv", "not found"]),
    "bad_family": (SLEEP + "family = 'gama'\n", ["'gama'"]),
    "unknown_column": (SLEEP.replace("Days + (1", "Dayz + (1"), ["'Dayz'"]),
    "weights_wrong_length": (SLEEP + "weights = ['Reaction']\n", ["got 1", "expecting 2"]),
    "negative_n_quad": (SLEEP + "n_quad = -2\n", ["[model] n_quad", "-2"]),
    "unknown_survey": (SLEEP + "survey = 'PISSA'\n", ["'PISSA'"]),
    "bad_device": (SLEEP + "[fit]\ndevice = 'gpu'\n", ["[fit] device", "'gpu'"]),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_config_exits_2_naming_the_problem(name, tmp_path, capsys):
    """Through cli.main, the function the console script, ``python -m torchmix`` and scripts/fit.py
    call; test_commands_in_subprocesses checks the same in a real process."""
    text, pieces = MALFORMED[name]
    cfg = write(tmp_path, text, f"{name}.toml")
    out = tmp_path / "out"
    assert cli.main(["fit", str(cfg), "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err
    assert captured.err.startswith("torchmix: error: ") and captured.err.count("\n") == 1
    for piece in pieces:
        assert piece in captured.err, (piece, captured.err)
    assert not (out / "run.json").exists()


# ----------------------------------------------------------------------------- subprocesses


def _run_all(commands: dict) -> dict:
    """Run ``python ARGS...`` for every entry, at most as many at once as there are CPUs."""
    limit = max(2, os.cpu_count() or 2)
    pending, running, done = list(commands.items()), {}, {}
    while pending or running:
        while pending and len(running) < limit:
            key, args = pending.pop(0)
            running[key] = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                                            stderr=subprocess.PIPE, text=True)
        key = next(iter(running))
        stdout, stderr = running[key].communicate(timeout=600)
        done[key] = (running.pop(key).returncode, stdout, stderr)
    return done


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every example config through ``python -m torchmix fit``, plus the other entry points."""
    base = tmp_path_factory.mktemp("runs")
    commands = {p.stem: ["-m", "torchmix", "fit", str(p), "--out", str(base / p.stem)] for p in EXAMPLES}
    bad = write(base, MALFORMED["bad_family"][0], "bad_family.toml")
    commands["script-bad-family"] = [str(ROOT / "scripts" / "fit.py"), str(bad), "--out", str(base / "bad")]
    return base, _run_all(commands)


@pytest.mark.parametrize("config", EXAMPLES, ids=lambda p: p.stem)
def test_example_config_through_the_command(config, runs):
    base, done = runs
    code, stdout, stderr = done[config.stem]
    assert code == 0, stderr
    assert "Traceback" not in stderr
    out = base / config.stem
    run = json.loads((out / "run.json").read_text())
    assert run["converged"] is True
    estimates = pd.read_csv(out / "estimates.csv")
    ranef = pd.read_csv(out / "random_effects.csv")
    assert {"level", "group", "id", "effect", "value"} <= set(ranef.columns) and len(ranef) > 0
    summary = (out / "summary.txt").read_text()

    # the same fit through the Python API gives the printed estimates
    cfg = load_config(config)
    res = torchmix.mix(cfg.model.formula, load_data(cfg), **{**cfg.mix_kwargs(), "progress": False})
    expected = str(res.summary()).rstrip("\n")
    assert stdout.rstrip("\n") == expected
    assert summary.rstrip("\n") == expected
    frame = res.to_frame()
    assert list(estimates.columns) == list(frame.columns) and len(estimates) == len(frame)
    for col in frame.columns:
        if pd.api.types.is_numeric_dtype(frame[col]):
            np.testing.assert_allclose(estimates[col].to_numpy(float), frame[col].to_numpy(float),
                                       rtol=1e-8, atol=0, err_msg=col)
        else:  # CSV reads empty labels back as missing
            assert estimates[col].fillna("").astype(str).tolist() == frame[col].astype(str).tolist(), col


def test_fit_script_in_a_subprocess(runs):
    """scripts/fit.py (a real process): bad input exits 2 with one line on stderr, no traceback."""
    base, done = runs
    code, stdout, stderr = done["script-bad-family"]
    assert code == 2 and stdout == "", stderr
    assert stderr.startswith("torchmix: error: ") and "'gama'" in stderr and "Traceback" not in stderr
    assert not (base / "bad" / "run.json").exists()


def test_help(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "fit" in out and "validate" in out and "datasets" in out
    assert cli.main(["fit", "--help"]) == 0
    assert "--device" in capsys.readouterr().out
