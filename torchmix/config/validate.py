"""Reading and validating a TOML run configuration: every message names the file, the section
and the key, and suggests the closest valid name.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from ..errors import ConfigError
from .checks import _typename
from .schema import (SCHEMA, DataConfig, DistributedConfig, FitConfig, ModelConfig, OutputConfig, RunConfig,
                     VarianceConfig)

try:  # Python >= 3.11
    import tomllib as _toml
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    try:
        import tomli as _toml
    except ModuleNotFoundError:
        _toml = None

__all__ = ["parse_config", "load_config"]


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
    var_cfg = VarianceConfig(**_parse_section(raw, "variance", where_file))
    out = _parse_section(raw, "output", where_file)
    if "folder" in out:
        out["folder"] = _resolve(out["folder"], base_dir)
    out_cfg = OutputConfig(**out)
    dist_cfg = DistributedConfig(**_parse_section(raw, "distributed", where_file))
    return RunConfig(data=data_cfg, model=model_cfg, fit=fit_cfg, variance=var_cfg, output=out_cfg,
                     source=source.resolve() if source is not None else None, distributed=dist_cfg)


def load_config(path: Union[str, Path]) -> RunConfig:
    """Read and validate a TOML run configuration.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ConfigError
        If the file is not UTF-8 text, not valid TOML (nesting too deep to parse included) or not a
        valid configuration (see :func:`parse_config`).
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
    raw = _read_toml(path)
    return parse_config(raw, source=path)


def _read_toml(path: Path) -> dict:
    """Decode (UTF-8, as TOML requires) and parse a TOML file; every failure is a ConfigError."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"{path} is not UTF-8 text, which TOML requires: byte 0x{data[exc.start]:02x} on "
                          f"line {line} is not valid UTF-8 (save the file with UTF-8 encoding)") from None
    try:
        return _toml.loads(text)
    except _toml.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    except RecursionError:  # the parser recurses once per nested array or inline table
        raise ConfigError(f"{path}: arrays or tables are nested too deeply to read (a run configuration "
                          "nests them at most two deep)") from None
