"""Argument forms of :func:`torchmix.mix` beyond column names: WeMix spellings, weight Series.

* ``cWeights=`` (WeMix's name) is an alias of ``cweights=``; giving both with different values
  is an error.
* ``REML=True`` is refused with the reason (torchmix maximises a weighted pseudo-likelihood,
  as WeMix does); ``REML=False`` is what torchmix does and is accepted.
* A weight may be a pandas Series aligned with ``data`` by index, alone or in a list mixed with
  column names. It becomes a column of a copy of ``data`` (the caller's frame is untouched)
  named after the Series, or ``weights[i]`` for an unnamed one (``i`` its position in the list).
"""

from __future__ import annotations

import pandas as pd

from .errors import ConfigError, WeightError

__all__ = ["resolve_aliases", "attach_weight_series", "SeriesLabel"]

REML_MESSAGE = (
    "REML is not offered: with sampling weights torchmix maximises a weighted pseudo-likelihood "
    "(MATH.md 2.2), and restricted (REML) likelihood has no such weighted counterpart for "
    "multilevel designs, so every fit is by maximum (pseudo-)likelihood, as in WeMix. With unit "
    "weights the estimates equal lme4's lmer(REML = FALSE)."
)


def resolve_aliases(extra: dict, cweights):
    """Consume WeMix spellings from ``extra`` (the unknown keyword arguments of ``mix()``).

    Parameters
    ----------
    extra : dict of keyword arguments ``mix()`` did not name; ``cWeights``, ``REML`` and
        ``reml`` are removed from it.
    cweights : the ``cweights`` argument as given.

    Returns
    -------
    The ``cweights`` value to use.

    Raises
    ------
    ConfigError
        ``REML=True``, or ``cWeights`` and ``cweights`` both given with different values.
    """
    for key in ("REML", "reml"):
        if key in extra:
            if bool(extra.pop(key)):
                raise ConfigError(REML_MESSAGE)
    if "cWeights" in extra:
        alias = extra.pop("cWeights")
        if cweights not in (False, alias):
            raise ConfigError(f"cWeights={alias!r} and cweights={cweights!r} disagree; give one of them "
                              "(cWeights is WeMix's name for cweights)")
        return alias
    return cweights


class SeriesLabel(str):
    """The column name given to a weight Series; its ``repr`` says it came from a Series."""

    def __repr__(self) -> str:
        return f"<Series {str.__repr__(self)}>"


def _aligned(series: pd.Series, data: pd.DataFrame, position: int):
    """The Series' values in the row order of ``data``, matched by index labels."""
    what = f"weights[{position}] (a Series)"
    if series.index.equals(data.index):
        return series.to_numpy()
    if not series.index.is_unique:
        raise WeightError(f"{what} has duplicated index labels, so it cannot be aligned with data's rows")
    if not data.index.is_unique:
        raise WeightError(f"{what} does not have data's index and data's index has duplicated labels; "
                          "give a Series with exactly data's index")
    absent = data.index[~data.index.isin(series.index)]
    extra = series.index[~series.index.isin(data.index)]
    if len(absent) or len(extra):
        parts = []
        if len(absent):
            parts.append(f"it lacks {len(absent)} of data's row labels (e.g. {list(absent[:3])})")
        if len(extra):
            parts.append(f"it has {len(extra)} label(s) that are not rows of data (e.g. {list(extra[:3])})")
        raise WeightError(f"{what} is not aligned with data by index: {'; '.join(parts)}")
    return series.reindex(data.index).to_numpy()


def attach_weight_series(data: pd.DataFrame, weights):
    """Turn weight Series into columns of a copy of ``data``.

    Parameters
    ----------
    data : the caller's DataFrame (not modified).
    weights : None, a column name, a Series, or a list of names and Series (level 1 first).

    Returns
    -------
    ``(data, weights)``: unchanged when no Series is given; otherwise a copy of ``data`` with one
    column per Series and the list of column names, each Series' entry a :class:`SeriesLabel`.

    Raises
    ------
    WeightError
        A Series whose index labels are not exactly data's row labels.
    """
    items = [weights] if isinstance(weights, pd.Series) else weights
    if not isinstance(items, (list, tuple)) or not any(isinstance(w, pd.Series) for w in items):
        return data, weights
    taken = set(map(str, data.columns)) | {w for w in items if isinstance(w, str)}
    columns, names = {}, []
    for i, w in enumerate(items):
        if not isinstance(w, pd.Series):
            names.append(w)
            continue
        values = _aligned(w, data, i)
        name = str(w.name) if w.name is not None else f"weights[{i}]"
        if name in data.columns and pd.Series(values, index=data.index).equals(data[name]):
            names.append(SeriesLabel(name))  # the Series is that column
            continue
        if name in taken:
            name = f"weights[{i}]"
        while name in taken:
            name += "_"
        taken.add(name)
        columns[name] = values
        names.append(SeriesLabel(name))
    return data.assign(**columns), names
