"""Running a configuration: loading its data, checking the device, the output formats and the
columns it names, and making its single :func:`torchmix.mix` call.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
from typing import Union

from ..errors import ConfigError, DataError
from .schema import DataConfig, RunConfig, _fields

__all__ = ["load_data", "check_device", "check_output", "run_config", "check_run"]

_PARQUET_SUFFIXES = (".parquet", ".pq")


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
        from ..data import load_dataset

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

    from ..errors import FormulaError

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
    from ..errors import FormulaError, WeightError
    from ..formula import parse_formula

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

    from .. import api

    from ..design_variance import resolve_design_variance

    all_kwargs = cfg.mix_kwargs()
    variance = {k: all_kwargs.pop(k) for k in _fields(cfg.variance)}
    kwargs = {k: v for k, v in all_kwargs.items() if k not in ("start", "num_threads")}
    kwargs["progress"] = False
    prepared = api._prepare(model.formula, data, **kwargs, call="validate")
    design = prepared.design
    dv = resolve_design_variance(data, design, prepared.plan,
                                 {**variance, "survey": model.survey})
    levels = ", ".join(f"level {l} {info.name!r}: {len(info.labels)} groups"
                       for l, info in enumerate(design.levels, start=2))
    used = design.weight_columns
    wtxt = "unweighted" if not used else f"weights {', '.join(used)}"
    notes = "".join(f"; {n}" for n in design.notes if n)
    se = "" if dv is None else f"; standard errors: {dv.description}"
    return f"{len(design.row_index)} of {len(data)} rows used; {levels}; {wtxt}{notes}{se}"
