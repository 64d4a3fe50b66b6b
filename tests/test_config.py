"""Run configurations: TOML parsing, validation messages, and the single mix() call they make."""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import json
from pathlib import Path

import pandas as pd
import pytest
import torch

import torchmix
from torchmix.config import (SCHEMA, FitConfig, ModelConfig, RunConfig, VarianceConfig, check_device, check_run,
                             load_config, load_data, parse_config, run_config)
from torchmix.errors import ConfigError, DataError, FormulaError, WeightError

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
EXAMPLES = sorted(CONFIGS.glob("*.toml"))


def write(tmp_path: Path, text: str, name: str = "run.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


MINIMAL = """
[data]
dataset = "sleepstudy"
[model]
formula = "Reaction ~ Days + (1 | Subject)"
"""


# ----------------------------------------------------------------------------- the shipped examples


def test_examples_exist():
    names = {p.stem for p in EXAMPLES}
    assert {"sleepstudy", "hsb82", "contraception", "sim3"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_configs_parse_and_their_data_load(path):
    cfg = load_config(path)
    assert cfg.source == path.resolve()
    data = load_data(cfg)
    assert len(data) > 0
    json.dumps(cfg.to_dict())  # the resolved config is JSON-ready


def test_simulated_data_are_what_the_script_writes():
    spec = importlib.util.spec_from_file_location("make_sim3", CONFIGS.parent / "scripts" / "make_sim3.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    shipped = pd.read_csv(CONFIGS / "data" / "sim3.csv")
    fresh = module.simulate()
    pd.testing.assert_frame_equal(shipped, fresh.astype(shipped.dtypes.to_dict()), check_exact=False, rtol=1e-12)
    assert len(shipped) == 2400
    assert shipped.groupby("school")["class"].nunique().eq(4).all()


# ----------------------------------------------------------------------------- parsing


def test_minimal_config_takes_mix_defaults(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL))
    assert cfg.model == ModelConfig(formula="Reaction ~ Days + (1 | Subject)")
    assert cfg.fit == FitConfig()
    assert cfg.data.dataset == "sleepstudy" and cfg.data.path is None
    kw = cfg.mix_kwargs()
    assert kw["weights"] is None and kw["family"] == "gaussian" and kw["n_quad"] == 13
    assert kw["dtype"] is torch.float64 and kw["device"] == "cpu" and kw["small_sample"] == "G/(G-1)"
    assert cfg.output_folder() == Path("results") / "run"


def test_every_key_is_read(tmp_path):
    text = """
[data]
path = "d/x.csv"
[model]
formula = "y ~ x + (1 | g)"
weights = ["w1", "w2"]
cweights = true
family = "binomial"
link = "probit"
n_quad = 7
center_group = { g = ["x"], h = "z" }
center_grand = ["x"]
scaling = "A"
survey = "PISA"
edsurvey_compat = true
plausible_values = { y = ["p1", "p2"] }
offset = "lexp"
[fit]
max_iter = 50
tol = 1
small_sample = "none"
device = "cpu"
dtype = "float32"
progress = false
deterministic = true
start = [1, 2.5]
num_threads = 2
[variance]
se_type = "replicate"
df = "normal"
strata = "st"
psu = "ps"
fpc = { a = 0.1, b = 0.2 }
lonely_psu = "adjust"
replicate_weights = { w1 = ["r1", "r2"] }
replicate_method = "Fay"
fay_rho = 0.5
scale = 0.05
rscales = [1, 1]
mse = false
jk_zone = "z"
jk_rep = "r"
jk_both_halves = true
replicate_pv = "first"
[output]
folder = "out"
formats = ["json", "csv", "json"]
"""
    path = write(tmp_path, text)
    cfg = load_config(path)
    assert cfg.data.path == tmp_path / "d" / "x.csv"  # relative to the config's folder
    assert cfg.output_folder() == tmp_path / "out"
    assert cfg.output.formats == ("json", "csv")
    kw = cfg.mix_kwargs()
    assert kw == {
        "weights": ["w1", "w2"], "cweights": True, "family": "binomial", "link": "probit", "n_quad": 7,
        "center_group": {"g": ["x"], "h": ["z"]}, "center_grand": ["x"], "scaling": "A", "survey": "PISA",
        "edsurvey_compat": True, "plausible_values": {"y": ["p1", "p2"]}, "offset": "lexp", "max_iter": 50,
        "tol": 1.0,
        "small_sample": "none", "device": "cpu", "dtype": torch.float32, "progress": False, "deterministic": True,
        "start": [1.0, 2.5], "num_threads": 2, "se_type": "replicate", "df": "normal", "strata": "st", "psu": "ps", "fpc": {"a": 0.1, "b": 0.2},
        "lonely_psu": "adjust", "replicate_weights": {"w1": ["r1", "r2"]}, "replicate_method": "Fay",
        "fay_rho": 0.5, "scale": 0.05, "rscales": [1.0, 1.0], "mse": False, "jk_zone": "z", "jk_rep": "r",
        "jk_both_halves": True, "replicate_pv": "first",
    }
    assert type(kw["tol"]) is float
    resolved = cfg.to_dict()
    assert resolved["model"]["center_group"] == {"g": ["x"], "h": ["z"]}
    assert resolved["fit"]["dtype"] == "float32"
    json.dumps(resolved)


def test_single_weight_string_is_kept(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL + 'weights = "w"\n'))
    assert cfg.mix_kwargs()["weights"] == "w"


def test_config_is_frozen(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model.formula = "y ~ 1"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.fit = FitConfig()


def test_overrides(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL + "[fit]\nprogress = true\n"))
    new = cfg.with_overrides(device="cpu", folder="elsewhere", progress=False)
    assert new.output_folder() == Path("elsewhere")
    assert new.fit.progress is False and cfg.fit.progress is True
    assert cfg.with_overrides() == cfg
    with pytest.raises(ConfigError, match="--device"):
        cfg.with_overrides(device="gpu")


def test_absolute_data_path_is_kept(tmp_path):
    data = tmp_path / "abs.csv"
    cfg = load_config(write(tmp_path / "", f'[data]\npath = "{data.as_posix()}"\n[model]\nformula = "y ~ (1|g)"\n'))
    assert cfg.data.path == data


def test_parse_config_from_a_mapping(tmp_path):
    cfg = parse_config({"data": {"path": "x.csv"}, "model": {"formula": "y ~ (1 | g)"}}, base_dir=tmp_path)
    assert cfg.data.path == tmp_path / "x.csv" and cfg.source is None
    with pytest.raises(ConfigError, match="<config>"):
        parse_config({"data": {"path": "x.csv"}, "model": {}})


# ----------------------------------------------------------------------------- bad configs


@pytest.mark.parametrize("text, pieces", [
    # unknown key, with the closest valid one suggested
    (MINIMAL + "n_quads = 5\n", ["'n_quads'", "[model]", "did you mean 'n_quad'"]),
    (MINIMAL + "weigths = ['a', 'b']\n", ["'weigths'", "did you mean 'weights'"]),
    (MINIMAL + "[fit]\nmaxiter = 5\n", ["'maxiter'", "[fit]", "did you mean 'max_iter'"]),
    (MINIMAL + "[output]\nfolders = 'x'\n", ["'folders'", "did you mean 'folder'"]),
    (MINIMAL.replace("dataset", "datset"), ["'datset'", "[data]", "did you mean 'dataset'"]),
    # a key in the wrong section, a section misspelt, a bare key outside its section
    (MINIMAL + "device = 'cpu'\n", ["'device'", "belongs in [fit]"]),
    (MINIMAL + "[fitt]\ntol = 1e-6\n", ["[fitt]", "did you mean 'fit'"]),
    ("formula = 'y ~ (1|g)'\n" + MINIMAL, ["'formula'", "inside the [model] section"]),
    # wrong types
    (MINIMAL + "n_quad = '13'\n", ["[model] n_quad", "integer", "'13'"]),
    (MINIMAL + "n_quad = 2.0\n", ["[model] n_quad", "integer"]),
    (MINIMAL + "n_quad = true\n", ["[model] n_quad", "integer", "boolean"]),
    (MINIMAL + "n_quad = -3\n", ["[model] n_quad", ">= 1", "-3"]),
    (MINIMAL + "n_quad = 0\n", ["[model] n_quad", ">= 1"]),
    (MINIMAL + "cweights = 1\n", ["[model] cweights", "true or false"]),
    (MINIMAL + "weights = 3\n", ["[model] weights", "string"]),
    (MINIMAL + "weights = ['a', 2]\n", ["[model] weights", "array of strings"]),
    (MINIMAL + "weights = []\n", ["[model] weights", "empty"]),
    (MINIMAL + "family = 3\n", ["[model] family", "string"]),
    (MINIMAL + "center_group = ['x']\n", ["[model] center_group", "table"]),
    (MINIMAL + "center_group = { Subject = [1] }\n", ["[model] center_group.Subject", "array of strings"]),
    (MINIMAL + "plausible_values = 'PV1'\n", ["[model] plausible_values", "table"]),
    ("[data]\ndataset = 'x'\n[model]\nformula = ' '\n", ["[model] formula", "empty"]),
    (MINIMAL + "[fit]\ntol = -1e-8\n", ["[fit] tol", "positive"]),
    (MINIMAL + "[fit]\ntol = 'small'\n", ["[fit] tol", "number"]),
    (MINIMAL + "[fit]\nmax_iter = 0\n", ["[fit] max_iter", ">= 1"]),
    (MINIMAL + "[fit]\ndtype = 'float16'\n", ["[fit] dtype", "float64"]),
    (MINIMAL + "[fit]\ndevice = 'gpu'\n", ["[fit] device", "'gpu'", "cuda"]),
    (MINIMAL + "[fit]\ndevice = 0\n", ["[fit] device", "string"]),
    (MINIMAL + "[fit]\nprogress = 'yes'\n", ["[fit] progress", "true or false"]),
    (MINIMAL + "[fit]\nstart = ['a']\n", ["[fit] start", "numbers"]),
    (MINIMAL + "[output]\nformats = ['xlsx']\n", ["[output] formats", "'xlsx'", "csv"]),
    (MINIMAL + "[output]\nformats = ['jsn']\n", ["did you mean 'json'"]),
    # missing or contradictory pieces
    ("[data]\ndataset = 'sleepstudy'\n[model]\nweights = 'w'\n", ["missing required key 'formula'", "[model]"]),
    ("[data]\ndataset = 'sleepstudy'\n", ["missing section [model]"]),
    ("[model]\nformula = 'y ~ (1|g)'\n", ["missing section [data]"]),
    ("[data]\n[model]\nformula = 'y ~ (1|g)'\n", ["exactly one of 'path' and 'dataset'"]),
    (MINIMAL + "[data]\n", ["not valid TOML"]),
    ("[data\n", ["not valid TOML"]),
    ("data = 3\n[model]\nformula = 'y ~ (1|g)'\n", ["[data]", "must be a table"]),
])
def test_bad_config_names_key_and_file(tmp_path, text, pieces):
    path = write(tmp_path, text, "bad.toml")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message
    for piece in pieces:
        assert piece in message, (piece, message)


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.toml"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="not a file"):
        load_config(tmp_path)


# ----------------------------------------------------------------------------- data


def test_csv_data_relative_to_the_config(tmp_path):
    (tmp_path / "sub").mkdir()
    frame = pd.DataFrame({"y": [1.0, 2.0], "g": ["a", "b"]})
    frame.to_csv(tmp_path / "sub" / "d.csv", index=False)
    cfg = load_config(write(tmp_path / "sub", '[data]\npath = "d.csv"\n[model]\nformula = "y ~ (1|g)"\n'))
    pd.testing.assert_frame_equal(load_data(cfg), frame)


def test_missing_data_file_names_it(tmp_path):
    cfg = load_config(write(tmp_path, '[data]\npath = "none.csv"\n[model]\nformula = "y ~ (1|g)"\n'))
    with pytest.raises(FileNotFoundError) as info:
        load_data(cfg)
    assert "none.csv" in str(info.value) and "[data] path" in str(info.value)


def test_parquet_needs_pyarrow(tmp_path):
    frame = pd.DataFrame({"y": [1.0, 2.0], "g": ["a", "b"]})
    cfg = load_config(write(tmp_path, '[data]\npath = "d.parquet"\n[model]\nformula = "y ~ (1|g)"\n'))
    if importlib.util.find_spec("pyarrow") is None:
        (tmp_path / "d.parquet").write_bytes(b"PAR1")
        with pytest.raises(ConfigError, match="pyarrow"):
            load_data(cfg)
    else:
        frame.to_parquet(tmp_path / "d.parquet")
        pd.testing.assert_frame_equal(load_data(cfg), frame)


def test_unknown_file_type_and_unreadable_csv(tmp_path):
    (tmp_path / "d.xlsx").write_bytes(b"x")
    cfg = load_config(write(tmp_path, '[data]\npath = "d.xlsx"\n[model]\nformula = "y ~ (1|g)"\n'))
    with pytest.raises(ConfigError, match="unknown file type '.xlsx'"):
        load_data(cfg)
    (tmp_path / "e.csv").write_text("")
    cfg = load_config(write(tmp_path, '[data]\npath = "e.csv"\n[model]\nformula = "y ~ (1|g)"\n'))
    with pytest.raises(DataError, match="e.csv"):
        load_data(cfg)


def test_unknown_dataset(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL.replace("sleepstudy", "sleepstudie")))
    with pytest.raises(DataError, match="sleepstudie"):
        load_data(cfg)


def test_device_availability():
    check_device("cpu")
    if torch.cuda.is_available():
        check_device("cuda")
        with pytest.raises(ConfigError, match="cuda:99"):
            check_device("cuda:99")
    else:
        with pytest.raises(ConfigError, match="CUDA is not available"):
            check_device("cuda")


# ----------------------------------------------------------------------------- checks without fitting


def _cfg(tmp_path, model: str, dataset: str = "sleepstudy") -> RunConfig:
    return load_config(write(tmp_path, f'[data]\ndataset = "{dataset}"\n[model]\n{model}\n'))


def test_check_run_reports_levels(tmp_path):
    cfg = _cfg(tmp_path, 'formula = "Reaction ~ Days + (1 + Days | Subject)"')
    text = check_run(cfg, load_data(cfg))
    assert "180 of 180 rows" in text and "'Subject': 18 groups" in text and "unweighted" in text


@pytest.mark.parametrize("model, error, pieces", [
    ('formula = "Reaction ~ Dayz + (1 | Subject)"', FormulaError, ["'Dayz'", "did you mean 'Days'"]),
    ('formula = "Reaction ~ Days + (1 | Subjekt)"', FormulaError, ["'Subjekt'", "grouping factor"]),
    ('formula = "Reaction ~ Days + (1 | Subject)"\nweights = ["w1", "w2"]', WeightError, ["'w1'", "'w2'"]),
    ('formula = "Reaction ~ Days + (1 | Subject)"\nweights = "Reaction"', WeightError, ["got 1", "expecting 2"]),
    ('formula = "Reaction ~ Days + (1 | Subject)"\ncenter_group = { Days = ["Days"] }', ConfigError,
     ["center_group", "'Days' is not a grouping factor"]),
    ('formula = "Reaction ~ Days + (1 | Subject)"\ncenter_grand = ["Day"]', DataError, ["'Day'", "center_grand"]),
    ('formula = "math ~ Days + (1 | Subject)"\nplausible_values = { mth = ["Reaction"] }', ConfigError,
     ["plausible_values", "'math'"]),
    ('formula = "math ~ Days + (1 | Subject)"\nplausible_values = { math = ["Reaction", "R2"] }', DataError,
     ["'R2'", "plausible_values.math"]),
])
def test_check_run_names_the_problem(tmp_path, model, error, pieces):
    cfg = _cfg(tmp_path, model)
    with pytest.raises(error) as info:
        check_run(cfg, load_data(cfg))
    for piece in pieces:
        assert piece in str(info.value), (piece, str(info.value))


def test_check_run_plausible_values_ok(tmp_path):
    cfg = _cfg(tmp_path, 'formula = "math ~ Days + (1 | Subject)"\nplausible_values = { math = ["Reaction"] }')
    assert "180 of 180 rows" in check_run(cfg, load_data(cfg))


# ----------------------------------------------------------------------------- the one mix() call


def test_run_config_makes_exactly_one_mix_call(tmp_path, monkeypatch):
    calls = []

    def fake_mix(formula, data, **kwargs):
        calls.append((formula, data, kwargs))
        return "result"

    monkeypatch.setattr(torchmix, "mix", fake_mix, raising=False)
    cfg = load_config(write(tmp_path, MINIMAL + 'weights = "Days"\n[fit]\nmax_iter = 9\n'))
    assert run_config(cfg) == "result"
    assert len(calls) == 1
    formula, data, kwargs = calls[0]
    assert formula == "Reaction ~ Days + (1 | Subject)"
    pd.testing.assert_frame_equal(data, torchmix.load_dataset("sleepstudy"))
    assert kwargs["max_iter"] == 9 and kwargs["weights"] == "Days"
    assert set(kwargs) == (set(SCHEMA["model"]) | set(SCHEMA["fit"]) | set(SCHEMA["variance"])) - {"formula"}


def test_schema_keys_are_mix_keywords():
    """Every config key of [model], [fit] and [variance] is a keyword of torchmix.mix with the same default."""
    params = {name: p for name, p in inspect.signature(torchmix.mix).parameters.items()
              if p.kind is not inspect.Parameter.VAR_KEYWORD}
    keys = set(SCHEMA["model"]) | set(SCHEMA["fit"]) | set(SCHEMA["variance"])
    assert keys == set(params) - {"data", "transforms"}  # functions cannot come from a config file
    defaults = {**{f.name: f.default for f in dataclasses.fields(ModelConfig)},
                **{f.name: f.default for f in dataclasses.fields(FitConfig)},
                **{f.name: f.default for f in dataclasses.fields(VarianceConfig)}}
    for key, default in defaults.items():
        if key == "formula":
            continue
        expected = params[key].default
        if key == "dtype":
            expected = str(expected).replace("torch.", "")
        assert default == expected, key
