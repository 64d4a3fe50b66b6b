r"""Design-based variance from data columns: strata, PSUs and FPC, or replicate weights.

The pandas-facing edge of :mod:`torchmix.variance`. :func:`resolve_design_variance` reads the
columns named in ``mix(strata=, psu=, fpc=, replicate_weights=, jk_zone=, jk_rep=, ...)`` for the
rows the model kept, checks that each is constant where it must be (a PSU contains whole
top-level groups; a stratum, zone or replicate indicator is constant within a top-level group;
an FPC is constant within a stratum), and returns a :class:`DesignVariance`:

* ``"linearization"``: a :class:`~torchmix.variance.StratifiedMeat` replacing the sandwich's meat;
* ``"replicate"``: a :class:`~torchmix.variance.ReplicateScheme` with factors for the top-level units.

Replicate factors of a top-level group :math:`k` from level-1 replicate columns
:math:`w^{(r)}_i` are :math:`a_{rk}=\sum_{i\in k}w^{(r)}_i/\sum_{i\in k}w_i` with :math:`w_i` the
full-sample unconditional level-1 weight (the weighted mean of the per-row ratios); a warning
names the groups where the per-row ratios differ by more than 1e-3 relative (they should be
constant up to rounding).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pandas as pd
import torch

from .errors import ConfigError, DataError, TorchmixWarning
from .replicate_presets import replicate_preset
from .surveys import find_columns
from .variance import LONELY_PSU_RULES, REPLICATE_METHODS, ReplicateScheme, StratifiedMeat, zone_factors
from .warn import warn

__all__ = ["SE_TYPES", "DesignVariance", "resolve_design_variance"]

SE_TYPES = ("sandwich", "model", "linearization", "replicate")
RATIO_TOL = 1e-3


@dataclass(frozen=True)
class DesignVariance:
    """How standard errors are estimated, resolved against the data."""

    kind: str                                  # "linearization" or "replicate"
    meat: Optional[StratifiedMeat] = None
    scheme: Optional[ReplicateScheme] = None
    replicate_pv: str = "all"
    description: str = ""

    @property
    def df(self) -> int:
        """Design degrees of freedom (PSUs minus strata, or the replicates' rank)."""
        return self.meat.df if self.kind == "linearization" else self.scheme.df


def _rows(data: pd.DataFrame, design, column: str) -> np.ndarray:
    """Values of ``column`` on the rows the model kept, in design order."""
    positions = getattr(design, "row_positions", None)
    if positions is not None:
        return data[column].to_numpy()[np.asarray(positions)]
    return data.loc[design.row_index, column].to_numpy()


def _frame_rows(data: pd.DataFrame, design, columns: list) -> pd.DataFrame:
    """:func:`_rows` for several columns at once (one selection), as a frame with those columns."""
    positions = getattr(design, "row_positions", None)
    if positions is not None:
        return data[columns].iloc[np.asarray(positions)]
    return data.loc[design.row_index, columns]


def _column(data: pd.DataFrame, name, what: str) -> str:
    if not isinstance(name, str):
        raise ConfigError(f"{what} must be a column name, got {name!r}")
    if name not in data.columns:
        raise DataError(f"{what} column {name!r} not found in data")
    return name


def _per_top(data, design, column: str, what: str) -> np.ndarray:
    """One value per top-level group (error naming a group where ``column`` varies)."""
    values = _rows(data, design, column)
    if pd.isna(values).any():
        raise DataError(f"{what} column {column!r} has missing values in rows used by the model")
    top = design.tensors.row_top.cpu().numpy()
    frame = pd.DataFrame({"top": top, "v": values})
    counts = frame.groupby("top")["v"].nunique()
    if (counts > 1).any():
        label = design.levels[-1].labels[int(counts.index[counts.to_numpy() > 1][0])]
        raise DataError(f"{what} column {column!r} takes several values within top-level group {label!r} of "
                        f"{design.levels[-1].name!r}; {what} must contain whole top-level groups")
    return frame.groupby("top")["v"].first().sort_index().to_numpy()


def _codes(values: np.ndarray) -> tuple[np.ndarray, pd.Index]:
    codes, uniques = pd.factorize(values, sort=True)
    return codes.astype(np.int64), pd.Index(uniques)


def _fractions(fpc, data, design, strata_codes_top, strata_labels, n_h: np.ndarray) -> np.ndarray:
    """Sampling fraction :math:`f_h` per stratum from ``fpc`` (fractions, or population PSU counts)."""
    n_strata = len(n_h)
    if fpc is None:
        return np.zeros(n_strata)
    if isinstance(fpc, str):
        col = _column(data, fpc, "fpc")
        per_top = _per_top(data, design, col, "fpc").astype(float)
        values = np.full(n_strata, np.nan)
        for h in range(n_strata):
            v = np.unique(per_top[strata_codes_top == h])
            if len(v) > 1:
                raise DataError(f"fpc column {col!r} varies within stratum {strata_labels[h]!r}")
            values[h] = v[0]
    elif isinstance(fpc, dict):
        missing = [s for s in strata_labels if s not in fpc]
        if missing:
            raise ConfigError(f"fpc has no value for stratum {missing[0]!r}")
        values = np.array([float(fpc[s]) for s in strata_labels])
    elif isinstance(fpc, (int, float)) and not isinstance(fpc, bool):
        values = np.full(n_strata, float(fpc))
    else:
        raise ConfigError(f"fpc must be a column name, a number or a dict stratum -> value, got {fpc!r}")
    if not np.isfinite(values).all() or (values < 0).any():
        raise ConfigError("fpc values must be finite and non-negative")
    if (values > 1).any():                      # population counts of PSUs (R survey's rule)
        if (values < n_h).any():
            h = int(np.nonzero(values < n_h)[0][0])
            raise ConfigError(f"fpc: stratum {strata_labels[h]!r} has {int(n_h[h])} sampled PSUs but a "
                              f"population of {values[h]:g}")
        return n_h / values
    return values                                # sampling fractions


def _linearization(data, design, strata, psu, fpc, lonely_psu) -> DesignVariance:
    if lonely_psu not in LONELY_PSU_RULES:
        raise ConfigError(f"lonely_psu must be one of {LONELY_PSU_RULES}, got {lonely_psu!r}")
    g = design.levels[-1].labels.size
    top_name = design.levels[-1].name
    if strata is None:
        s_codes, s_labels = np.zeros(g, dtype=np.int64), pd.Index(["(all)"])
    else:
        s_codes, s_labels = _codes(_per_top(data, design, _column(data, strata, "strata"), "strata"))
    if psu is None:
        p_values = np.arange(g)
    else:
        p_values = _per_top(data, design, _column(data, psu, "psu"), "psu")
    # a PSU is identified within its stratum
    pairs = pd.MultiIndex.from_arrays([s_codes, p_values])
    psu_codes, uniq = pd.factorize(pairs, sort=True)
    psu_stratum = np.asarray(uniq.get_level_values(0), dtype=np.int64)
    n_h = np.bincount(psu_stratum, minlength=len(s_labels)).astype(float)
    fractions = _fractions(fpc, data, design, s_codes, s_labels, n_h)
    meat = StratifiedMeat(psu=torch.as_tensor(psu_codes, dtype=torch.int64),
                          stratum=torch.as_tensor(psu_stratum, dtype=torch.int64),
                          fraction=torch.as_tensor(fractions, dtype=torch.float64), lonely_psu=lonely_psu,
                          stratum_names=tuple(s_labels))
    what = f"{meat.n_psu} PSUs" if psu is not None else f"{meat.n_psu} PSUs = groups of {top_name!r}"
    text = (f"linearization (Taylor series), {what} in {meat.n_strata} strat{'um' if meat.n_strata == 1 else 'a'}"
            + (", with finite-population correction" if fpc is not None else "") + f", df = {meat.df}")
    return DesignVariance("linearization", meat=meat, description=text)


def _replicate_columns(data: pd.DataFrame, spec) -> list:
    if isinstance(spec, str):
        pattern = re.compile(spec, flags=re.IGNORECASE)
        cols = [c for c in data.columns if isinstance(c, str) and pattern.fullmatch(c)]
        key = [int(m.group()) if (m := re.search(r"\d+$", c)) else 0 for c in cols]
        cols = [c for _, c in sorted(zip(key, cols))]
        if len(cols) < 2:
            raise DataError(f"replicate_weights pattern {spec!r} matches {len(cols)} column(s); at least 2 needed")
        return cols
    if isinstance(spec, (list, tuple)) and spec and all(isinstance(c, str) for c in spec):
        missing = [c for c in spec if c not in data.columns]
        if missing:
            raise DataError(f"replicate weight column(s) not found in data: {', '.join(map(repr, missing[:5]))}")
        return list(spec)
    raise ConfigError("replicate_weights must be a list of column names, a regular expression, or a dict "
                      f"weight column -> list of replicate columns, got {spec!r}")


def _ratio_factors(data, design, full: np.ndarray, columns: list, what: str) -> np.ndarray:
    """``(R, G)`` factors :math:`\\sum_{i\\in k} w^{(r)}_i / \\sum_{i\\in k} w_i`, with a constancy check."""
    top = design.tensors.row_top.cpu().numpy()
    g = design.levels[-1].labels.size
    denom = np.bincount(top, weights=full, minlength=g)
    out, uneven = np.empty((len(columns), g)), set()
    block = _frame_rows(data, design, columns)     # every column's kept rows in one take
    for r, col in enumerate(columns):
        rep = pd.to_numeric(block[col], errors="coerce").to_numpy(dtype=float)
        if not np.isfinite(rep).all() or (rep < 0).any():
            raise DataError(f"replicate weight column {col!r} has missing, negative or non-numeric values in rows "
                            "used by the model")
        out[r] = np.bincount(top, weights=rep, minlength=g) / denom
        dev = np.abs(rep / full - out[r][top]) > RATIO_TOL * np.maximum(out[r][top], 1e-12)
        uneven.update(np.unique(top[dev]).tolist())
    if uneven:
        labels = [str(design.levels[-1].labels[k]) for k in sorted(uneven)[:5]]
        warn(f"{what}: the ratio replicate/full weight is not constant within {len(uneven)} top-level "
                      f"group(s) ({', '.join(labels)}{', ...' if len(uneven) > 5 else ''}); their replicate factor "
                      "is the weighted mean of the ratios", TorchmixWarning)
    return out


def _full_level1_weight(data, design, plan) -> np.ndarray:
    cols = list(plan.weights) if plan is not None and plan.weights else None
    if not cols:
        raise ConfigError("replicate weights need the full-sample weights: give weights= (or a survey preset)")
    data = plan.materialise(data)   # product weight columns of some presets
    if plan.cweights:
        return np.prod([_rows(data, design, c).astype(float) for c in cols], axis=0)
    return _rows(data, design, cols[0]).astype(float)


def _replicate(data, design, plan, a) -> DesignVariance:
    preset = replicate_preset(a.get("survey"))
    spec, zone, rep = a.get("replicate_weights"), a.get("jk_zone"), a.get("jk_rep")
    method, fay_rho, scale = a.get("replicate_method"), a.get("fay_rho"), a.get("scale")
    both = a.get("jk_both_halves")
    if spec is None and zone is None:
        if preset is None:
            raise ConfigError("se_type='replicate' needs replicate_weights= (columns or a pattern) or jk_zone= and "
                              "jk_rep=, or a survey= with a replicate preset (PISA, TIMSS, PIRLS, NAEP, TALIS)")
        method = method or preset.method
        fay_rho = preset.fay_rho if fay_rho is None and method == "Fay" else fay_rho
        scale = preset.scale if scale is None else scale
        if preset.pattern is not None:
            spec = preset.pattern
        else:
            if not _has_columns(data, [preset.jk_zone, preset.jk_rep]):
                raise DataError(f"the {preset.name} replicate preset needs the columns {preset.jk_zone.upper()} and "
                                f"{preset.jk_rep.upper()} (jackknife zone and replicate indicator)")
            zone, rep = find_columns(list(data.columns), [preset.jk_zone, preset.jk_rep], "jackknife")
            both = preset.jk_both_halves if both is None else both
    if zone is not None:
        if rep is None:
            raise ConfigError("jk_zone needs jk_rep (the replicate indicator column, 0 or 1)")
        z_codes, _ = _codes(_per_top(data, design, _column(data, zone, "jk_zone"), "jk_zone"))
        r_values = pd.to_numeric(pd.Series(_per_top(data, design, _column(data, rep, "jk_rep"), "jk_rep")),
                                 errors="coerce").to_numpy()
        if not np.isin(r_values, [0, 1]).all():
            raise DataError(f"jk_rep column {rep!r} must be 0 or 1 for every top-level group")
        method = method or "JK2"
        both = bool(both)
        factors = zone_factors(torch.as_tensor(z_codes), torch.as_tensor(r_values.astype(np.int64)),
                               int(z_codes.max()) + 1, both_halves=both)
        if scale is None and method == "JK2" and both:
            scale = 0.5
        source = f"jackknife zones {zone!r}/{rep!r}" + (" (both halves)" if both else "")
    else:
        if method is None:
            raise ConfigError(f"replicate_method is required with replicate_weights (one of {REPLICATE_METHODS})")
        if isinstance(spec, dict):
            blocks = []
            for key, cols in spec.items():
                cols = _replicate_columns(data, cols)
                top_col = design.levels[-1].weight_column
                if plan is not None and plan.weights and key == list(plan.weights)[0]:
                    blocks.append(_ratio_factors(data, design, _full_level1_weight(data, design, plan), cols,
                                                 "replicate_weights"))
                elif key == top_col:
                    full = _rows(plan.materialise(data), design, key).astype(float)
                    blocks.append(_ratio_factors(data, design, full, cols, "replicate_weights"))
                else:
                    raise ConfigError(f"replicate_weights: {key!r} is not the level-1 or the top-level weight "
                                      "column; a replicate changes the weights of the top-level units only")
            if len(blocks) != 1:
                raise ConfigError("replicate_weights: give replicate columns for one weight column")
            factors_np = blocks[0]
            source = f"{factors_np.shape[0]} replicate weight columns of {list(spec)[0]!r}"
        else:
            cols = _replicate_columns(data, spec)
            factors_np = _ratio_factors(data, design, _full_level1_weight(data, design, plan), cols,
                                        "replicate_weights")
            source = f"{len(cols)} level-1 replicate weight columns ({cols[0]} .. {cols[-1]})"
        factors = torch.as_tensor(factors_np, dtype=torch.float64)
    if method not in REPLICATE_METHODS:
        raise ConfigError(f"replicate_method must be one of {REPLICATE_METHODS}, got {method!r}")
    scheme = ReplicateScheme.build(factors, method, fay_rho=fay_rho, scale=scale, rscales=a.get("rscales"),
                                   mse=a.get("mse", True), source=source)
    pv = a.get("replicate_pv", "all")
    if pv not in ("all", "first"):
        raise ConfigError(f"replicate_pv must be 'all' or 'first', got {pv!r}")
    text = (f"replicate weights, {method}" + (f" (rho = {scheme.fay_rho:g})" if method == "Fay" else "")
            + f", {scheme.n_replicates} replicates from {source}, scale {scheme.scale:.6g}"
            + ("" if scheme.mse else ", centred at the replicate mean") + f", df = {scheme.df}")
    return DesignVariance("replicate", scheme=scheme, replicate_pv=pv, description=text)


def _has_columns(data, names) -> bool:
    lower = {str(c).lower() for c in data.columns}
    return all(n.lower() in lower for n in names)


_LIN_KEYS = ("strata", "psu", "fpc")
_REP_KEYS = ("replicate_weights", "jk_zone", "jk_rep", "replicate_method", "fay_rho", "scale", "rscales",
             "jk_both_halves")


def resolve_design_variance(data: pd.DataFrame, design, plan, args: dict) -> Optional[DesignVariance]:
    """Decide the variance estimator from ``se_type`` and the design arguments of ``mix()``.

    Parameters
    ----------
    data : the caller's DataFrame; design : the built :class:`~torchmix.design.Design`;
    plan : the weighting plan (its weight columns, materialised only where replicate factors need
        the full-sample weights); args : the ``mix()`` keywords
        ``se_type, strata, psu, fpc, lonely_psu, replicate_weights, replicate_method, fay_rho, scale,
        rscales, mse, jk_zone, jk_rep, jk_both_halves, replicate_pv, survey``.

    Returns
    -------
    :class:`DesignVariance`, or None for the sandwich or model-based standard errors.
    """
    se_type = args.get("se_type")
    lin = [k for k in _LIN_KEYS if args.get(k) is not None]
    rep = [k for k in _REP_KEYS if args.get(k) is not None]
    if se_type is not None and se_type not in SE_TYPES:
        raise ConfigError(f"se_type must be one of {SE_TYPES}, got {se_type!r}")
    if lin and rep:
        raise ConfigError(f"give either {', '.join(lin)} (linearization) or {', '.join(rep)} (replicate "
                          "weights), not both")
    if se_type is None:
        se_type = "linearization" if lin else "replicate" if rep else None
    if se_type in (None, "sandwich", "model"):
        if lin or rep:
            raise ConfigError(f"se_type={se_type!r} does not use {', '.join(lin + rep)}; "
                              "use se_type='linearization' or 'replicate'")
        return None
    if se_type == "linearization":
        if rep:
            raise ConfigError(f"se_type='linearization' does not use {', '.join(rep)}")
        return _linearization(data, design, args.get("strata"), args.get("psu"), args.get("fpc"),
                              args.get("lonely_psu", "error"))
    if lin:
        raise ConfigError(f"se_type='replicate' does not use {', '.join(lin)}")
    return _replicate(data, design, plan, args)
