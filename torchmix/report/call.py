"""The ``Call:`` line of a fit: ``mix(formula = ..., data = <DataFrame N x M>, ...)``.

Every keyword argument of ``mix()`` whose value differs from its default is shown, in the
order of the signature, except those that change how the fit is computed or displayed but not
the model: :data:`NOT_IN_CALL`. A new keyword argument therefore appears in the call (and in
``summary.txt``) as soon as it is given a value other than its default, with no change here.
"""

from __future__ import annotations

import inspect

import pandas as pd

__all__ = ["NOT_IN_CALL", "model_options", "call_text"]

NOT_IN_CALL = frozenset({"start", "device", "progress", "deterministic"})

_DTYPE_NAMES = {"double": "float64", "float": "float32"}


def _normalise(name: str, value):
    if name == "dtype":
        text = str(value).replace("torch.", "")
        return _DTYPE_NAMES.get(text, text)
    return value


def _same(a, b) -> bool:
    try:
        return bool(a == b)
    except Exception:  # arrays, frames and other values without a plain truth value
        return a is b


def model_options(fn, values: dict) -> dict:
    """The keyword-only arguments of ``fn`` that differ from their defaults.

    Parameters
    ----------
    fn : the function whose signature gives the defaults (``mix``).
    values : the arguments' values by name (``locals()`` of ``fn``); other names are ignored.

    Returns
    -------
    dict name -> value, in signature order, without :data:`NOT_IN_CALL`.
    """
    out = {}
    for name, par in inspect.signature(fn).parameters.items():
        if par.kind is not inspect.Parameter.KEYWORD_ONLY or name in NOT_IN_CALL or name not in values:
            continue
        value = values[name]
        if par.default is inspect.Parameter.empty or not _same(_normalise(name, value), _normalise(name, par.default)):
            out[name] = value
    return out


def _show(value) -> str:
    if isinstance(value, pd.DataFrame):
        return f"<DataFrame {value.shape[0]} x {value.shape[1]}>"
    if isinstance(value, pd.Series):
        return f"<Series {value.name!r} of {len(value)}>"
    if isinstance(value, (list, tuple)):
        inner = ", ".join(_show(v) for v in value)
        return f"[{inner}]" if isinstance(value, list) else f"({inner}{',' if len(value) == 1 else ''})"
    return repr(value)


def call_text(formula, data, weights, options: dict) -> str:
    """``mix(formula = '...', data = <DataFrame N x M>, weights = [...], key = value, ...)``."""
    parts = [f"formula = {formula!r}", f"data = {_show(data)}"]
    if weights is not None:
        parts.append(f"weights = {_show(weights)}")
    parts += [f"{k} = {_show(v)}" for k, v in options.items()]
    return "mix(" + ", ".join(parts) + ")"
