"""The run-configuration schema: frozen dataclasses (one per section, with the defaults of
:func:`torchmix.mix`) and :data:`SCHEMA`, the key -> checker table the parser walks.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Callable, Mapping, Optional, Union

from ..quadrature import MAX_N_QUAD
from .checks import (TABLE_FORMATS, _bool, _device, _df, _dtype, _float_list, _formats, _fpc, _int_at_least,
                     _int_between, _nonempty_str, _positive_float, _replicate_weights, _str_list,
                     _str_or_str_list, _table_of_str_lists, _unit_float)

__all__ = ["DataConfig", "ModelConfig", "FitConfig", "VarianceConfig", "OutputConfig", "DistributedConfig",
           "RunConfig", "SCHEMA", "TABLE_FORMATS"]


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
    offset: Optional[str] = None


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
    num_threads: Optional[int] = None


@dataclass(frozen=True)
class VarianceConfig:
    """The design-based variance keywords of :func:`torchmix.mix` (same names, same defaults)."""

    se_type: Optional[str] = None
    df: Union[str, float] = "cluster"
    strata: Optional[str] = None
    psu: Optional[str] = None
    fpc: Union[str, float, Mapping, None] = None
    lonely_psu: str = "error"
    replicate_weights: Union[str, tuple, Mapping, None] = None
    replicate_method: Optional[str] = None
    fay_rho: Optional[float] = None
    scale: Optional[float] = None
    rscales: Optional[tuple] = None
    mse: bool = True
    jk_zone: Optional[str] = None
    jk_rep: Optional[str] = None
    jk_both_halves: Optional[bool] = None
    replicate_pv: str = "all"


@dataclass(frozen=True)
class OutputConfig:
    """Where results go (``folder`` None: ``results/<config name>`` in the working folder)."""

    folder: Optional[Path] = None
    formats: tuple = ("csv",)


@dataclass(frozen=True)
class DistributedConfig:
    """Runs launched by ``torchrun``: seconds a process waits for the others before it fails."""

    timeout: float = 1800.0


@dataclass(frozen=True)
class RunConfig:
    """A parsed run configuration: one :func:`torchmix.mix` call and where to write its results."""

    data: DataConfig
    model: ModelConfig
    fit: FitConfig = field(default_factory=FitConfig)
    variance: VarianceConfig = field(default_factory=VarianceConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    source: Optional[Path] = None
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

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
        kw.update({k: _plain(v) for k, v in _fields(self.variance).items()})
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
            "variance": {k: _plain(v) for k, v in _fields(self.variance).items()},
            "output": {"folder": str(self.output_folder()), "formats": list(self.output.formats)},
            "distributed": {k: _plain(v) for k, v in _fields(self.distributed).items()},
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
        "n_quad": _Key(_int_between(1, MAX_N_QUAD), doc="quadrature points per random effect"),
        "center_group": _Key(_table_of_str_lists, doc="group-mean centering"),
        "center_grand": _Key(_str_list, doc="grand-mean centering"),
        "scaling": _Key(_nonempty_str, doc="level-1 weight scaling"),
        "survey": _Key(_nonempty_str, doc="survey preset"),
        "edsurvey_compat": _Key(_bool, doc="EdSurvey compatibility"),
        "plausible_values": _Key(_table_of_str_lists, doc="outcome -> plausible-value columns"),
        "offset": _Key(_nonempty_str, doc="column added to the linear predictor with coefficient 1"),
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
        "num_threads": _Key(_int_at_least(1), doc="torch intra-op threads for the fit (absent: by problem size)"),
    }),
    "variance": MappingProxyType({
        "se_type": _Key(_nonempty_str, doc="sandwich, model, linearization or replicate"),
        "df": _Key(_df, doc='degrees of freedom: "cluster", "normal" or a number'),
        "strata": _Key(_nonempty_str, doc="stratum column"),
        "psu": _Key(_nonempty_str, doc="primary sampling unit column"),
        "fpc": _Key(_fpc, doc="finite-population correction: column, number or table per stratum"),
        "lonely_psu": _Key(_nonempty_str, doc="strata with one PSU: error, remove, certainty, adjust, average"),
        "replicate_weights": _Key(_replicate_weights, doc="replicate weight columns or pattern"),
        "replicate_method": _Key(_nonempty_str, doc="JK1, JK2, BRR, Fay or bootstrap"),
        "fay_rho": _Key(_unit_float, doc="Fay's rho"),
        "scale": _Key(_positive_float, doc="replicate variance scale"),
        "rscales": _Key(_float_list, doc="per-replicate scales"),
        "mse": _Key(_bool, doc="deviations from the full-sample estimate"),
        "jk_zone": _Key(_nonempty_str, doc="jackknife zone column"),
        "jk_rep": _Key(_nonempty_str, doc="jackknife replicate indicator column"),
        "jk_both_halves": _Key(_bool, doc="two replicates per zone"),
        "replicate_pv": _Key(_nonempty_str, doc="replicate variance from 'all' plausible values or the 'first'"),
    }),
    "output": MappingProxyType({
        "folder": _Key(_nonempty_str, doc="output folder, relative to the config's folder"),
        "formats": _Key(_formats, doc="table formats"),
    }),
    "distributed": MappingProxyType({
        "timeout": _Key(_positive_float, doc="seconds a process waits for the others under torchrun"),
    }),
})
