"""Run configurations: one TOML file describes exactly one :func:`torchmix.mix` call.

Schema
------
Every key below is optional unless marked *required*; an absent key takes the default of
:func:`torchmix.mix` (TOML has no null: leave a key out to get ``None``). Keys under
``[model]`` and ``[fit]`` are spelled exactly like the keyword arguments of ``mix()``.
Relative paths written in the file are relative to the folder that holds the file.

.. code-block:: toml

    [data]                       # exactly one of `path` and `dataset`
    path    = "data/sim3.csv"    # CSV (.csv, .csv.gz, ...) or Parquet (.parquet, .pq; needs pyarrow)
    dataset = "sleepstudy"       # a dataset shipped with torchmix (`torchmix datasets` lists them)

    [model]
    formula          = "y ~ x + (1 + x | g)"   # required, lme4 syntax
    weights          = ["w1", "w2"]            # one column per level, level 1 first; a single
                                               #   string is one column; absent: unweighted
    cweights         = false                   # true: the weights are conditional
    family           = "gaussian"              # "binomial", "poisson", or any registered name
    link             = "logit"                 # absent: the family's default link
    n_quad           = 13                      # Gauss-Hermite points per random effect (>= 1)
    center_group     = { g = ["x"] }           # weighted group-mean centering per grouping factor
    center_grand     = ["x"]                   # weighted grand-mean centering
    scaling          = "A"                     # "A", "B" or "timss"; absent: no scaling
    survey           = "PISA"                  # survey preset (weight columns and scaling)
    edsurvey_compat  = false                   # reproduce EdSurvey's own behaviour
    plausible_values = { math = ["PV1MATH", "PV2MATH", "PV3MATH"] }

    [fit]
    max_iter     = 200
    tol          = 1e-8
    small_sample = "G/(G-1)"                   # or "none"
    device       = "cpu"                       # "cuda", "cuda:1", ...
    dtype        = "float64"                   # or "float32"
    progress     = true                        # progress bars on stderr
    deterministic = false                      # true: bitwise reproducible on CUDA (slower)
    start        = [250.0, 10.0, 600.0, 30.0]  # optional starting values (beta, then tau)

    [output]
    folder  = "results/sleepstudy"             # absent: results/<config name> in the working folder
    formats = ["csv"]                          # table formats: "csv", "json", "parquet" (pyarrow)

An unknown section or key, a value of the wrong type or a missing required key raises a
:class:`~torchmix.errors.ConfigError` that names the file, the section and the key, and suggests
the closest valid key. :func:`load_config` parses a file into frozen dataclasses;
:func:`run_config` makes the single ``torchmix.mix`` call.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping, Optional, Union

from .errors import ConfigError, DataError

try:  # Python >= 3.11
    import tomllib as _toml
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    try:
        import tomli as _toml
    except ModuleNotFoundError:
        _toml = None

__all__ = [
    "DataConfig",
    "ModelConfig",
    "FitConfig",
    "OutputConfig",
    "RunConfig",
    "SCHEMA",
    "TABLE_FORMATS",
    "load_config",
    "parse_config",
    "load_data",
    "check_device",
    "check_run",
    "check_output",
    "run_config",
]

#: Table formats ``[output] formats`` may list.
TABLE_FORMATS = ("csv", "json", "parquet")
_DTYPES = ("float64", "float32")
_PARQUET_SUFFIXES = (".parquet", ".pq")


# ----------------------------------------------------------------------------- dataclasses


@dataclass(frozen=True)
class DataConfig:
    """Where the data come from: a file ``path`` (resolved, absolute) or a shipped ``dataset``."""

    path: Optional[Path] = None
    dataset: Optional[str] = None


@dataclass(frozen=True)
class ModelConfig:
    """The model keywords of :func:`torchmix.mix` (same names, same defaults)."""

    formula: str
    weights: Union[tuple, str, None] = None
    cweights: bool = False
    family: str = "gaussian"
    link: Optional[str] = None
    n_quad: int = 13
    center_group: Optional[Mapping[str, tuple]] = None
    center_grand: Optional[tuple] = None
    scaling: Optional[str] = None
    survey: Optional[str] = None
    edsurvey_compat: bool = False
    plausible_values: Optional[Mapping[str, tuple]] = None


@dataclass(frozen=True)
class FitConfig:
    """The optimiser and device keywords of :func:`torchmix.mix` (same names, same defaults)."""

    max_iter: int = 200
    tol: float = 1e-8
    small_sample: str = "G/(G-1)"
    device: str = "cpu"
    dtype: str = "float64"
    progress: bool = True
    deterministic: bool = False
    start: Optional[tuple] = None


@dataclass(frozen=True)
class OutputConfig:
    """Where results go (``folder`` None: ``results/<config name>`` in the working folder)."""

    folder: Optional[Path] = None
    formats: tuple = ("csv",)


@dataclass(frozen=True)
class RunConfig:
    """A parsed run configuration: one :func:`torchmix.mix` call and where to write its results."""

    data: DataConfig
    model: ModelConfig
    fit: FitConfig = field(default_factory=FitConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    source: Optional[Path] = None

    @property
    def name(self) -> str:
        """Short name of the run: the config file's stem, else the dataset or data file name."""
        if self.source is not None:
            return self.source.stem
        if self.data.dataset is not None:
            return self.data.dataset
        return self.data.path.stem if self.data.path is not None else "run"

    def output_folder(self) -> Path:
        """The folder results are written to."""
        if self.output.folder is not None:
            return self.output.folder
        return Path("results") / self.name

    def with_overrides(self, *, device: Optional[str] = None, folder: Optional[Union[str, Path]] = None,
                       progress: Optional[bool] = None) -> "RunConfig":
        """A copy with command-line overrides applied (``None`` keeps the file's value).

        ``folder`` is taken relative to the working folder, like any command-line path.
        """
        fit, out = self.fit, self.output
        if device is not None:
            fit = dataclasses.replace(fit, device=_device(device, "--device on the command line"))
        if progress is not None:
            fit = dataclasses.replace(fit, progress=bool(progress))
        if folder is not None:
            out = dataclasses.replace(out, folder=Path(folder))
        return dataclasses.replace(self, fit=fit, output=out)

    def mix_kwargs(self) -> dict:
        """Keyword arguments of :func:`torchmix.mix` other than ``formula`` and ``data``.

        Lists and tables are handed over as plain ``list`` / ``dict`` objects and ``dtype`` as a
        ``torch.dtype``.
        """
        import torch

        kw = {k: _plain(v) for k, v in _fields(self.model).items() if k != "formula"}
        kw.update({k: _plain(v) for k, v in _fields(self.fit).items()})
        kw["dtype"] = getattr(torch, self.fit.dtype)
        return kw

    def to_dict(self) -> dict:
        """The resolved configuration (every key, defaults filled in) as JSON-ready values."""
        data = {"path": None if self.data.path is None else str(self.data.path), "dataset": self.data.dataset}
        return {
            "source": None if self.source is None else str(self.source),
            "data": data,
            "model": {k: _plain(v) for k, v in _fields(self.model).items()},
            "fit": {k: _plain(v) for k, v in _fields(self.fit).items()},
            "output": {"folder": str(self.output_folder()), "formats": list(self.output.formats)},
        }


def _fields(obj) -> dict:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


def _plain(value):
    """Frozen containers back to plain ``list`` / ``dict`` (for ``mix`` and for JSON)."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


# ----------------------------------------------------------------------------- value checkers
# Each checker gets (value, where) and returns the frozen value or raises ConfigError.
# ``where`` reads like "[model] n_quad"; the caller prefixes the file name.


def _typename(value) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "an array", dict: "a table"}.get(type(value), type(value).__name__)


def _bad(where: str, expected: str, value) -> ConfigError:
    return ConfigError(f"{where} must be {expected}, got {_typename(value)} ({value!r})")


def _str(value, where):
    if not isinstance(value, str):
        raise _bad(where, "a string", value)
    return value


def _nonempty_str(value, where):
    value = _str(value, where)
    if not value.strip():
        raise ConfigError(f"{where} must not be empty")
    return value


def _bool(value, where):
    if not isinstance(value, bool):
        raise _bad(where, "true or false", value)
    return value


def _int_at_least(low: int) -> Callable:
    def check(value, where):
        if isinstance(value, bool) or not isinstance(value, int):
            raise _bad(where, f"an integer >= {low}", value)
        if value < low:
            raise ConfigError(f"{where} must be an integer >= {low}, got {value}")
        return value
    return check


def _positive_float(value, where):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(where, "a positive number", value)
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{where} must be a positive number, got {value!r}")
    return float(value)


def _str_list(value, where):
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _bad(where, "an array of strings", value)
    if not value:
        raise ConfigError(f"{where} must not be an empty array")
    return tuple(value)


def _str_or_str_list(value, where):
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise _bad(where, "a string or an array of strings", value)
    return _str_list(value, where)


def _table_of_str_lists(value, where):
    if not isinstance(value, dict):
        raise _bad(where, 'a table of string arrays (e.g. { school = ["ses"] })', value)
    if not value:
        raise ConfigError(f"{where} must not be an empty table")
    out = {}
    for k, v in value.items():
        if isinstance(v, str):
            v = [v]
        out[k] = _str_list(v, f"{where}.{k}")
    return MappingProxyType(out)


def _float_list(value, where):
    if not isinstance(value, list) or not value or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
    ):
        raise _bad(where, "a non-empty array of numbers", value)
    return tuple(float(v) for v in value)


def _dtype(value, where):
    value = _str(value, where)
    if value not in _DTYPES:
        raise ConfigError(f"{where} must be one of {', '.join(_DTYPES)}, got {value!r}")
    return value


def _device(value, where):
    """Syntax check of a torch device string (``cpu``, ``cuda``, ``cuda:1``, ``mps``...)."""
    value = _str(value, where)
    import torch

    try:
        torch.device(value)
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(
            f"{where}: {value!r} is not a device torch knows; use 'cpu', 'cuda' or 'cuda:N'"
        ) from None
    return value


def _formats(value, where):
    formats = _str_list(value, where)
    for f in formats:
        if f not in TABLE_FORMATS:
            close = difflib.get_close_matches(f, TABLE_FORMATS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{where}: unknown table format {f!r} (valid: {', '.join(TABLE_FORMATS)}){hint}")
    return tuple(dict.fromkeys(formats))


@dataclass(frozen=True)
class _Key:
    check: Callable
    required: bool = False
    doc: str = ""


#: Section -> key -> checker. The keys of ``model`` and ``fit`` are keyword names of ``mix()``.
SCHEMA: Mapping[str, Mapping[str, _Key]] = MappingProxyType({
    "data": MappingProxyType({
        "path": _Key(_nonempty_str, doc="CSV or Parquet file, relative to the config's folder"),
        "dataset": _Key(_nonempty_str, doc="name of a dataset shipped with torchmix"),
    }),
    "model": MappingProxyType({
        "formula": _Key(_nonempty_str, required=True, doc="lme4-style model formula"),
        "weights": _Key(_str_or_str_list, doc="weight columns, level 1 first"),
        "cweights": _Key(_bool, doc="weights are conditional"),
        "family": _Key(_nonempty_str, doc="response family"),
        "link": _Key(_nonempty_str, doc="link function"),
        "n_quad": _Key(_int_at_least(1), doc="quadrature points per random effect"),
        "center_group": _Key(_table_of_str_lists, doc="group-mean centering"),
        "center_grand": _Key(_str_list, doc="grand-mean centering"),
        "scaling": _Key(_nonempty_str, doc="level-1 weight scaling"),
        "survey": _Key(_nonempty_str, doc="survey preset"),
        "edsurvey_compat": _Key(_bool, doc="EdSurvey compatibility"),
        "plausible_values": _Key(_table_of_str_lists, doc="outcome -> plausible-value columns"),
    }),
    "fit": MappingProxyType({
        "max_iter": _Key(_int_at_least(1), doc="optimiser iterations"),
        "tol": _Key(_positive_float, doc="convergence tolerance"),
        "small_sample": _Key(_nonempty_str, doc="sandwich small-sample factor"),
        "device": _Key(_device, doc="torch device"),
        "dtype": _Key(_dtype, doc="floating-point type"),
        "progress": _Key(_bool, doc="progress bars"),
        "deterministic": _Key(_bool, doc="deterministic algorithms (bitwise reproducible on CUDA)"),
        "start": _Key(_float_list, doc="starting values"),
    }),
    "output": MappingProxyType({
        "folder": _Key(_nonempty_str, doc="output folder, relative to the config's folder"),
        "formats": _Key(_formats, doc="table formats"),
    }),
})


# ----------------------------------------------------------------------------- parsing


def _suggest(name: str, candidates) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _section_of(key: str) -> Optional[str]:
    for section, keys in SCHEMA.items():
        if key in keys:
            return section
    return None


def _unknown_key(section: str, key: str, where_file: str) -> ConfigError:
    home = _section_of(key)
    if home is not None:
        return ConfigError(f"key {key!r} in {where_file} belongs in [{home}], not [{section}]")
    hint = _suggest(key, SCHEMA[section])
    if not hint:  # maybe a misspelling of a key of another section
        every = {k: s for s, keys in SCHEMA.items() for k in keys}
        close = difflib.get_close_matches(key, list(every), n=1, cutoff=0.6)
        if close:
            hint = f"; did you mean {close[0]!r} (in [{every[close[0]]}])?"
    valid = ", ".join(SCHEMA[section])
    return ConfigError(f"unknown key {key!r} in [{section}] of {where_file}{hint} (valid keys: {valid})")


def _parse_section(raw: Mapping, section: str, where_file: str) -> dict:
    """Check the keys and values of one section; returns checked values of the keys present."""
    table = raw.get(section, {})
    if not isinstance(table, dict):
        raise ConfigError(f"[{section}] in {where_file} must be a table, got {_typename(table)}")
    spec = SCHEMA[section]
    out = {}
    for key, value in table.items():
        if key not in spec:
            raise _unknown_key(section, key, where_file)
        try:
            out[key] = spec[key].check(value, f"[{section}] {key}")
        except ConfigError as exc:
            raise ConfigError(f"{where_file}: {exc}") from None
    for key, k in spec.items():
        if k.required and key not in out:
            raise ConfigError(f"missing required key {key!r} in [{section}] of {where_file}")
    return out


def _resolve(path: str, base_dir: Path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else (base_dir / p)


def parse_config(raw: Mapping[str, Any], *, source: Optional[Union[str, Path]] = None,
                 base_dir: Optional[Union[str, Path]] = None) -> RunConfig:
    """Validate a parsed TOML document and freeze it into a :class:`RunConfig`.

    Parameters
    ----------
    raw : mapping
        The document, as ``tomllib.load`` returns it.
    source : path, optional
        The file it came from (named in every error message; recorded in the result).
    base_dir : path, optional
        Folder relative paths are resolved against; default: ``source``'s folder, else the
        working folder.

    Raises
    ------
    ConfigError
        Unknown section or key (with the closest valid name), wrong type, missing required key,
        both or neither of ``[data] path`` and ``[data] dataset``.
    """
    source = None if source is None else Path(source)
    where_file = str(source) if source is not None else "<config>"
    if base_dir is None:
        base_dir = source.parent if source is not None else Path.cwd()
    base_dir = Path(base_dir)

    for name, value in raw.items():
        if name in SCHEMA:
            continue
        home = _section_of(name)
        if home is not None and not isinstance(value, dict):
            raise ConfigError(f"key {name!r} in {where_file} must be inside the [{home}] section")
        raise ConfigError(
            f"unknown section [{name}] in {where_file}{_suggest(name, SCHEMA)} "
            f"(valid sections: {', '.join(f'[{s}]' for s in SCHEMA)})"
        )
    if "model" not in raw:
        raise ConfigError(f"missing section [model] in {where_file} (it needs at least 'formula')")
    if "data" not in raw:
        raise ConfigError(f"missing section [data] in {where_file} (give 'path' or 'dataset')")

    data = _parse_section(raw, "data", where_file)
    if ("path" in data) == ("dataset" in data):
        raise ConfigError(f"[data] in {where_file} needs exactly one of 'path' and 'dataset'")
    data_cfg = DataConfig(
        path=_resolve(data["path"], base_dir) if "path" in data else None,
        dataset=data.get("dataset"),
    )
    model_cfg = ModelConfig(**_parse_section(raw, "model", where_file))
    fit_cfg = FitConfig(**_parse_section(raw, "fit", where_file))
    out = _parse_section(raw, "output", where_file)
    if "folder" in out:
        out["folder"] = _resolve(out["folder"], base_dir)
    out_cfg = OutputConfig(**out)
    return RunConfig(data=data_cfg, model=model_cfg, fit=fit_cfg, output=out_cfg,
                     source=source.resolve() if source is not None else None)


def load_config(path: Union[str, Path]) -> RunConfig:
    """Read and validate a TOML run configuration.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ConfigError
        If the file is not valid TOML or not a valid configuration (see :func:`parse_config`).
    """
    path = Path(path)
    if _toml is None:  # pragma: no cover - Python 3.10 without tomli
        raise ConfigError(
            f"cannot read {path}: reading TOML needs Python >= 3.11 (tomllib) or, on Python 3.10, "
            "the 'tomli' package (pip install tomli)"
        )
    if not path.is_file():
        if path.exists():
            raise ConfigError(f"config {path} is not a file")
        raise FileNotFoundError(f"config file not found: {path}")
    with open(path, "rb") as fh:
        try:
            raw = _toml.load(fh)
        except _toml.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    return parse_config(raw, source=path)


# ----------------------------------------------------------------------------- running


def load_data(cfg: Union[RunConfig, DataConfig]):
    """Read the data a configuration names, as a pandas DataFrame.

    Raises
    ------
    FileNotFoundError
        If the data file does not exist.
    ConfigError
        For a Parquet file without pyarrow installed, or an unknown file type.
    DataError
        For an unknown shipped dataset name.
    """
    import pandas as pd

    data = cfg.data if isinstance(cfg, RunConfig) else cfg
    where = "[data] path"
    if isinstance(cfg, RunConfig) and cfg.source is not None:
        where += f" in {cfg.source}"
    if data.dataset is not None:
        from .data import load_dataset

        return load_dataset(data.dataset)
    path = data.path
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path} ({where})")
    suffix = path.suffix.lower()
    if suffix in _PARQUET_SUFFIXES:
        if importlib.util.find_spec("pyarrow") is None:
            raise ConfigError(
                f"{where}: {path} is a Parquet file; reading it needs the optional package "
                "pyarrow, which is not installed (pip install pyarrow, or convert the file to CSV)"
            )
        reader = pd.read_parquet
    elif ".csv" in [s.lower() for s in path.suffixes]:
        reader = pd.read_csv
    else:
        raise ConfigError(
            f"{where}: {path}: unknown file type {suffix or '(none)'!r}; use a .csv file "
            "(optionally compressed, e.g. .csv.gz) or a .parquet file"
        )
    try:
        return reader(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read data file {path}: {exc}") from None


def check_device(device: str) -> None:
    """Check that a device is usable on this machine (CUDA present when asked for).

    Raises
    ------
    ConfigError
        If ``device`` names CUDA (or MPS) and torch cannot use it here.
    """
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} requested but CUDA is not available on this machine "
                              "(torch.cuda.is_available() is False); use device = \"cpu\"")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device {device!r} requested but only {torch.cuda.device_count()} "
                              "CUDA device(s) are present")
    elif dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ConfigError(f"device {device!r} requested but MPS is not available on this machine")
    elif dev.type != "cpu":
        raise ConfigError(f"device {device!r} is not supported; use 'cpu' or 'cuda'")


def check_output(cfg: RunConfig) -> None:
    """Check that the requested output formats can be written here.

    Raises
    ------
    ConfigError
        If ``[output] formats`` lists ``"parquet"`` and pyarrow is not installed.
    """
    if "parquet" in cfg.output.formats and importlib.util.find_spec("pyarrow") is None:
        where = "[output] formats" + (f" in {cfg.source}" if cfg.source is not None else "")
        raise ConfigError(f"{where} lists 'parquet', which needs the optional package pyarrow "
                          "(not installed; pip install pyarrow, or use 'csv' or 'json')")


def run_config(cfg: RunConfig, data=None):
    """Make the single :func:`torchmix.mix` call a configuration describes.

    Parameters
    ----------
    cfg : RunConfig
    data : pandas.DataFrame, optional
        The data, if already loaded (default: :func:`load_data`).

    Returns
    -------
    MixedResults or PooledResults
        Whatever ``torchmix.mix`` returns.
    """
    import torchmix

    if data is None:
        data = load_data(cfg)
    check_device(cfg.fit.device)
    return torchmix.mix(cfg.model.formula, data, **cfg.mix_kwargs())


def _formula_variables(expr: str) -> set:
    """Data columns a formulaic right-hand side refers to (functions such as ``np.log`` excluded)."""
    from formulaic import Formula

    from .errors import FormulaError

    try:
        return set(Formula(expr).required_variables)
    except Exception as exc:  # formulaic raises its own exception types
        raise FormulaError(f"cannot read formula part {expr!r}: {exc}") from None


def check_run(cfg: RunConfig, data) -> str:
    """Check, without fitting, that ``data`` hold what the configuration names.

    Checks that the columns the formula, weights, plausible values and centering name exist
    (suggesting close names), then cleans the data and builds the design exactly as a fit would
    (family and link, survey preset and scaling, missing values, weights per level and their
    count, constancy within groups, nesting, centering, model matrices, response domain).

    Returns
    -------
    str
        A one-line description: rows used, levels with their group counts, weights.

    Raises
    ------
    FormulaError, DataError, WeightError, ConfigError
        Naming the offending column, key or argument.
    """
    from .errors import FormulaError, WeightError
    from .formula import parse_formula

    model = cfg.model
    parsed = parse_formula(model.formula)
    columns = set(map(str, data.columns))

    def need(names, what: str, error=DataError):
        missing = [n for n in names if n not in columns]
        if missing:
            close = {m: difflib.get_close_matches(m, sorted(columns), n=1) for m in missing}
            hints = "; ".join(f"{m!r}: did you mean {c[0]!r}?" for m, c in close.items() if c)
            raise error(f"column(s) {', '.join(map(repr, missing))} named in {what} not found in the data"
                        + (f" ({hints})" if hints else ""))

    pv = model.plausible_values
    if pv is not None:
        if parsed.response not in pv:
            raise ConfigError(f"[model] plausible_values has no entry for the formula's response "
                              f"{parsed.response!r} (entries: {', '.join(map(repr, pv))})")
        for name, cols in pv.items():
            need(cols, f"[model] plausible_values.{name}")
        parsed = dataclasses.replace(parsed, response=pv[parsed.response][0])
    else:
        need(_formula_variables(parsed.response), "the formula's response", FormulaError)
    need(_formula_variables(parsed.fixed), "the formula's fixed part", FormulaError)
    for term in parsed.random:
        need(_formula_variables(term.expr), f"random term ({term.expr} | {term.group})", FormulaError)
        need(term.group_vars, f"grouping factor {term.group!r}", FormulaError)
    weights = model.weights
    wcols = None if weights is None else ([weights] if isinstance(weights, str) else list(weights))
    if wcols is not None:
        need(wcols, "[model] weights", WeightError)
    if model.center_group is not None:
        groups = parsed.group_names
        for name, cols in model.center_group.items():
            if name not in groups:
                raise ConfigError(f"[model] center_group: {name!r} is not a grouping factor of the "
                                  f"formula (grouping factors: {', '.join(map(repr, groups))})")
            need(cols, f"[model] center_group.{name}")
    if model.center_grand is not None:
        need(model.center_grand, "[model] center_grand")

    from . import api

    kwargs = {k: v for k, v in cfg.mix_kwargs().items() if k != "start"}
    kwargs["progress"] = False
    design = api._prepare(model.formula, data, **kwargs, call="validate").design
    levels = ", ".join(f"level {l} {info.name!r}: {len(info.labels)} groups"
                       for l, info in enumerate(design.levels, start=2))
    used = design.weight_columns
    wtxt = "unweighted" if not used else f"weights {', '.join(used)}"
    notes = "".join(f"; {n}" for n in design.notes if n)
    return f"{len(design.row_index)} of {len(data)} rows used; {levels}; {wtxt}{notes}"
