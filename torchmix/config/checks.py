"""Value checkers of the run-configuration schema.

Each checker gets ``(value, where)``, where ``value`` is what the TOML parser returned and
``where`` reads like ``"[model] n_quad"`` (the caller prefixes the file name), and returns the
frozen value (tuples and read-only mappings instead of lists and tables) or raises
:class:`~torchmix.errors.ConfigError`.
"""

from __future__ import annotations

import difflib
import math
from types import MappingProxyType
from typing import Callable

from ..errors import ConfigError

#: Table formats ``[output] formats`` may list.
TABLE_FORMATS = ("csv", "json", "parquet")
_DTYPES = ("float64", "float32")


def _typename(value) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "an array", dict: "a table"}.get(type(value), type(value).__name__)


def _short_repr(value, limit: int = 80) -> str:
    """``repr(value)``, cut to about ``limit`` characters (a value may be huge or deeply nested)."""
    try:
        text = repr(value)
    except RecursionError:
        text = "..."
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _bad(where: str, expected: str, value) -> ConfigError:
    return ConfigError(f"{where} must be {expected}, got {_typename(value)} ({_short_repr(value)})")


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


def _int_between(low: int, high: int) -> Callable:
    def check(value, where):
        value = _int_at_least(low)(value, where)
        if value > high:
            raise ConfigError(f"{where} must be an integer between {low} and {high}, got {value}")
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


def _unit_float(value, where):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 <= value < 1):
        raise _bad(where, "a number in [0, 1)", value)
    return float(value)


def _fpc(value, where):
    """A column name, a non-negative number, or a table stratum -> number."""
    if isinstance(value, str) and value:
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0:
        return float(value)
    if isinstance(value, dict) and value and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value.values()):
        return MappingProxyType({k: float(v) for k, v in value.items()})
    raise _bad(where, "a column name, a number, or a table stratum -> number", value)


def _replicate_weights(value, where):
    """A regular expression, an array of column names, or a table weight column -> array."""
    if isinstance(value, str) and value:
        return value
    if isinstance(value, list):
        return _str_list(value, where)
    if isinstance(value, dict):
        return _table_of_str_lists(value, where)
    raise _bad(where, "a pattern, an array of column names, or a table weight column -> array", value)


def _df(value, where):
    """``"cluster"``, ``"normal"`` or a positive number of degrees of freedom."""
    if isinstance(value, str) and value in ("cluster", "normal"):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0:
        return float(value)
    raise _bad(where, '"cluster", "normal" or a positive number', value)


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
