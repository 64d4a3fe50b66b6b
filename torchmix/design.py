r"""From a DataFrame and a parsed formula to :class:`~torchmix.tensors.ModelTensors`.

Steps, in order (MATH.md 1.3, 2.1, 4.4, 9):

1. one joint missing-data mask over every column the model uses (warning with the count);
2. rows where any weight is :math:`\le 0` dropped (warning with the count);
3. grouping factors: one level per distinct factor, ordered by number of groups (most groups =
   level 2), nesting checked, ids never re-keyed;
4. weights per level checked (constant within groups above level 1) and converted;
5. optional level-1 weight scaling, then group- and grand-mean centering;
6. model matrices through formulaic (fixed part; each random term), rank check of X, evaluated
   in the restricted context of :func:`~torchmix.formula_safety.evaluation_context` (only the
   allowed transforms resolve).

The caller's DataFrame is never modified.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import formulaic
import numpy as np
import pandas as pd
import torch

from .centering import Centering, center_data
from .errors import DataError, DataWarning, FormulaError, WeightError
from .formula import ParsedFormula
from .offsets import OffsetSpec, offset_spec
from .formula_context import ContextSpec, evaluation_context
from .formula_safety import check_transforms, formula_columns
from .tensors import LevelTensors, ModelTensors
from .warn import warn
from .weights import group_constant, to_conditional, to_unconditional, weight_columns, weight_stats

__all__ = ["Design", "LevelInfo", "build_design", "group_keys", "INTERCEPT"]

INTERCEPT = "(Intercept)"


@dataclass
class LevelInfo:
    """Labels of one grouping level (level 2 first)."""

    name: str                 # grouping factor, e.g. "school" or "school:class"
    group_vars: tuple         # data columns defining it
    labels: pd.Index          # group ids in code order
    term_names: list          # per term, its column names
    term_specs: list          # per term, (expr, formulaic ModelSpec, column slice)
    weight_column: Optional[str] = None

    @property
    def effect_names(self) -> list[str]:
        return [n for names in self.term_names for n in names]

    @property
    def term_sizes(self) -> tuple:
        return tuple(len(n) for n in self.term_names)


@dataclass
class Design:
    """A cleaned model: tensors for the math plus the labels needed to report and predict."""

    tensors: ModelTensors
    parsed: ParsedFormula
    response: str
    fixed_names: list            # kept (non-aliased) fixed-effect names
    all_fixed_names: list        # every column of X, aliased included
    aliased: list                # names of dropped aliased columns
    fixed_spec: Any              # formulaic ModelSpec of the fixed part
    levels: list                 # LevelInfo per level, level 2 first
    row_index: pd.Index          # index labels of the rows kept, in data order
    n_dropped_missing: int
    n_dropped_weight: int
    weight_columns: Optional[list]
    weight_stats: list           # per level (level 1 first) dict(mean, sum, min, max)
    cweights: bool
    y_raw: np.ndarray            # response values as found (before family validation)
    notes: list = field(default_factory=list)  # human-readable notes (scaling applied, ...)
    centering: Centering = field(default_factory=Centering)  # training means, re-applied by predict
    offset: OffsetSpec = field(default_factory=OffsetSpec)   # offset terms, re-evaluated by predict
    context: dict = field(default_factory=dict)  # names formula terms may resolve (formula_safety)

    @property
    def n_levels(self) -> int:
        return len(self.levels) + 1


def group_keys(data: pd.DataFrame, group_vars: Sequence[str]) -> pd.Series:
    """Group identifier of every row: the column itself, or ``"a:b"`` strings for combinations."""
    if len(group_vars) == 1:
        return data[group_vars[0]]
    return data[list(group_vars)].astype(str).agg(":".join, axis=1)


def _rename_intercept(names: Sequence[str]) -> list[str]:
    return [INTERCEPT if n == "Intercept" else str(n) for n in names]


def _model_matrix(formula: str, data: pd.DataFrame, what: str, context: dict):
    """formulaic model matrix of a checked formula part, evaluated in ``context`` only."""
    try:
        mm = formulaic.model_matrix(formula, data, na_action="ignore", context=context)
    except Exception as exc:
        raise FormulaError(f"cannot build the {what} model matrix: {exc}") from exc
    return mm


def _aliased_columns(x: np.ndarray, w: np.ndarray, tol: float = 1e-9) -> list[int]:
    r"""Indices of columns of ``x`` linearly dependent on earlier ones under weights ``w``.

    Sequential (pivot-free, left to right) Gram-Schmidt on :math:`X^\top W X`: column
    :math:`j` is aliased when its residual sum of squares after projection on the kept earlier
    columns is below ``tol`` times its own.
    """
    g = x.T @ (x * w[:, None])
    kept, aliased = [], []
    for j in range(g.shape[0]):
        own = g[j, j]
        if own <= 0:
            aliased.append(j)
            continue
        if kept:
            gkk = g[np.ix_(kept, kept)]
            gkj = g[kept, j]
            resid = own - gkj @ np.linalg.solve(gkk, gkj)
        else:
            resid = own
        if resid <= tol * own:
            aliased.append(j)
        else:
            kept.append(j)
    return aliased


def build_design(parsed: ParsedFormula, data: pd.DataFrame, weights=None, *, cweights: bool = False,
                 center_group=None, center_grand=None, extra_columns: Sequence[str] = (),
                 scaler=None, dtype=torch.float64, device="cpu", offset=None, transforms=None) -> Design:
    """Clean the data and build the design of a mixed model.

    Parameters
    ----------
    parsed : the parsed formula.
    data : pandas DataFrame (never modified).
    weights : None (all ones) or column names, level 1 first (one per level).
    cweights : False when the weights are unconditional (WeMix default), True when conditional.
    center_group, center_grand : weighted centering (MATH.md 9), after cleaning.
    extra_columns : more columns that must be non-missing (plausible values).
    scaler : optional callable ``(w1, w2, codes2, conditional_input) -> conditional w1``
        applied to the level-1 weights after cleaning (survey scaling, MATH.md 3); when given,
        the level-1 weights become conditional.
    offset : optional column name whose values are added to the linear predictor (with any
        ``offset(...)`` terms of the formula; :mod:`torchmix.offsets`).
    transforms : optional ``{name: function}`` the formula may call besides the built-in
        transforms (:mod:`~torchmix.formula_safety`).

    Raises
    ------
    DataError, WeightError, FormulaError
    """
    if not isinstance(data, pd.DataFrame):
        raise DataError(f"data must be a pandas DataFrame, got {type(data).__name__}")
    wcols = weight_columns(weights, data)
    context = evaluation_context(transforms)
    needed = formula_columns(parsed, data.columns, tuple(check_transforms(transforms)))
    off_spec = offset_spec(parsed, offset)
    off_spec.context, off_spec.transforms = context, tuple(check_transforms(transforms))
    needed += [c for c in off_spec.required_columns() if c not in needed]
    unknown = [c for c in list(needed) + list(extra_columns) if c not in data.columns]
    if unknown:
        raise FormulaError(f"column(s) not found in data: {', '.join(map(repr, unknown))} "
                           f"(formula {parsed.formula!r})")
    used = list(dict.fromkeys(needed + list(extra_columns) + (wcols or [])))

    # 1. joint missing-data mask
    keep = data[used].notna().all(axis=1).to_numpy().copy()
    n_missing = int((~keep).sum())
    if n_missing:
        per_column = data[used].isna().sum()
        counts = ", ".join(f"{c!r} {int(k)}" for c, k in per_column[per_column > 0].items())
        warn(f"{n_missing} row(s) with a missing value in a model variable or weight were dropped "
             f"(missing values per column: {counts})", DataWarning)
    # 2. non-positive weights
    n_wdrop = 0
    if wcols:
        wvals = data.loc[keep, wcols].apply(pd.to_numeric, errors="coerce")
        if wvals.isna().any().any():
            bad = [c for c in wcols if wvals[c].isna().any()]
            raise WeightError(f"weight column(s) {', '.join(map(repr, bad))} are not numeric")
        pos = (wvals > 0).all(axis=1).to_numpy()
        n_wdrop = int((~pos).sum())
        if n_wdrop:
            warn(f"{n_wdrop} row(s) with a weight <= 0 were dropped", DataWarning)
        idx = np.flatnonzero(keep)
        keep[idx[~pos]] = False
    clean = data.loc[keep]
    if len(clean) == 0:
        raise DataError("no rows are left after dropping missing values and non-positive weights")
    n = len(clean)

    # 3. grouping factors and levels
    factors: dict[str, tuple] = {}
    for t in parsed.random:
        factors.setdefault(t.group, t.group_vars)
    coded = {}
    for name, gvars in factors.items():
        try:
            codes, labels = pd.factorize(group_keys(clean, gvars), sort=True)
        except TypeError as exc:  # values that cannot be ordered (mixed or arbitrary objects)
            raise DataError(f"grouping factor {name!r}: the ids in column(s) {', '.join(map(repr, gvars))} "
                            f"cannot be sorted ({exc}); use numbers or strings") from None
        coded[name] = (codes.astype(np.int64), pd.Index(labels, name=name))
    order = sorted(coded, key=lambda nm: -len(coded[nm][1]))
    for a, b in zip(order, order[1:]):
        if len(coded[a][1]) == len(coded[b][1]):
            raise FormulaError(f"grouping factors {a!r} and {b!r} have the same number of groups "
                               f"({len(coded[a][1])}); levels must be nested with fewer groups above")
    maps = []  # parent index: row -> level-2 group, then group -> parent group
    for a, b in zip(order, order[1:]):
        ca, cb = coded[a][0], coded[b][0]
        ga, gb = len(coded[a][1]), len(coded[b][1])
        pairs = np.unique(ca * gb + cb)
        if pairs.size != ga:
            counts = np.bincount(pairs // gb, minlength=ga)
            bad = coded[a][1][counts > 1][:5].tolist()
            raise FormulaError(
                f"grouping factors are not nested: groups of {a!r} (e.g. {bad}) appear in more than one "
                f"group of {b!r}; crossed factors are not supported, and ids that repeat across parents "
                f"must be written as '{b}/{a}' or '{b}:{a}'")
        parent = np.empty(ga, dtype=np.int64)
        parent[pairs // gb] = pairs % gb
        maps.append(parent)
    codes2 = coded[order[0]][0]
    row_maps = [codes2] + maps  # row -> level 2, level 2 -> level 3, ...
    n_levels = len(order) + 1

    # 4. weights
    if wcols is not None and len(wcols) != n_levels:
        raise WeightError(f"wrong number of weight columns: got {len(wcols)}, expecting {n_levels} "
                          f"(one per level, level 1 first: observations, {', '.join(order)})")
    per_level = [np.ones(n)] + [np.ones(len(coded[nm][1])) for nm in order]
    if wcols is not None:
        per_level[0] = clean[wcols[0]].to_numpy(dtype=float).copy()
        for l, nm in enumerate(order, start=1):
            codes, labels = coded[nm]
            per_level[l] = group_constant(clean[wcols[l]].to_numpy(dtype=float), codes, len(labels),
                                          wcols[l], nm, labels)
    notes = []
    if cweights:
        cond = per_level
        uncond = to_unconditional(cond, row_maps)
    else:
        uncond = per_level
        cond = to_conditional(uncond, row_maps)
    if scaler is not None:
        w1c, note = scaler(per_level[0], uncond[1], codes2, bool(cweights))
        cond = [np.asarray(w1c, dtype=float)] + list(cond[1:])
        uncond = to_unconditional(cond, row_maps)
        notes.append(note)

    # 5. centering
    off = off_spec.evaluate(clean)  # on the uncentred values
    groups = {nm: (coded[nm][0], coded[nm][1], factors[nm]) for nm in order}
    clean, centering = center_data(clean, uncond[0], center_group, center_grand, groups)

    # 6. model matrices
    fixed_mm = _model_matrix(parsed.fixed if parsed.fixed.strip() else "1", clean, "fixed-effect", context)
    all_names = _rename_intercept(fixed_mm.columns)
    x = np.array(fixed_mm, dtype=float)
    if not np.isfinite(x).all():
        bad = [all_names[j] for j in np.flatnonzero(~np.isfinite(x).all(axis=0))]
        raise DataError(f"fixed-effect column(s) {bad} have non-finite values")
    aliased = _aliased_columns(x, uncond[0])
    if aliased:
        names = [all_names[j] for j in aliased]
        warn(f"fixed-effect column(s) {names} are linearly dependent on earlier columns and were "
             "dropped; their coefficients are reported as NaN", DataWarning)
    kept = [j for j in range(x.shape[1]) if j not in aliased]
    x = x[:, kept]
    if x.shape[1] == 0:
        raise FormulaError(f"the fixed part {parsed.fixed!r} of formula {parsed.formula!r} has no usable column; "
                           "a model needs at least one fixed effect (e.g. the intercept, '1')")
    if parsed.response in clean.columns:
        y_raw = clean[parsed.response].to_numpy()
    else:
        try:
            lhs = formulaic.model_matrix(f"{parsed.response} ~ 1", clean, na_action="ignore", context=context).lhs
        except Exception as exc:
            raise FormulaError(f"cannot evaluate the response {parsed.response!r}: {exc}") from exc
        if lhs.shape[1] != 1:
            raise FormulaError(f"the response {parsed.response!r} must be one column, got {list(lhs.columns)}")
        y_raw = np.asarray(lhs).ravel()

    levels_info, level_tensors = [], []
    tkw = dict(dtype=dtype, device=device)
    for l, nm in enumerate(order, start=1):
        terms = [t for t in parsed.random if t.group == nm]
        mats, names, specs = [], [], []
        for t in terms:
            mm = _model_matrix(t.expr, clean, f"random-effect ({t.expr} | {nm})", context)
            spec = ContextSpec(mm.model_spec, context)
            cols = _rename_intercept(mm.columns)
            arr = np.array(mm, dtype=float)
            if arr.shape[1] == 0:
                raise FormulaError(f"random-effect term ({t.expr} | {nm}) of formula {parsed.formula!r} has no "
                                   "column (e.g. '(0 | g)'); write '(1 | g)' for a random intercept")
            if t.independent:
                for term, sl in mm.model_spec.term_slices.items():
                    mats.append(arr[:, sl])
                    names.append(cols[sl])
                    specs.append((t.expr, spec, sl))
            else:
                mats.append(arr)
                names.append(cols)
                specs.append((t.expr, spec, slice(0, arr.shape[1])))
        z = np.concatenate(mats, axis=1)
        if not np.isfinite(z).all():
            raise DataError(f"random-effect columns of {nm!r} have non-finite values")
        codes, labels = coded[nm]
        info = LevelInfo(name=nm, group_vars=factors[nm], labels=labels, term_names=names, term_specs=specs,
                         weight_column=wcols[l] if wcols else None)
        levels_info.append(info)
        top = np.arange(len(labels))
        for m in maps[l - 1:]:
            top = m[top]
        level_tensors.append(LevelTensors(
            Z=torch.as_tensor(z, **tkw), term_sizes=info.term_sizes,
            group=torch.as_tensor(codes, device=device),
            parent=torch.as_tensor(maps[l - 1], device=device) if l - 1 < len(maps) else None,
            n_groups=len(labels), w_cond=torch.as_tensor(cond[l], **tkw),
            w_uncond=torch.as_tensor(uncond[l], **tkw), top=torch.as_tensor(top, device=device)))

    y_num = np.full(n, np.nan)
    if np.issubdtype(np.asarray(y_raw).dtype, np.number) or np.asarray(y_raw).dtype == bool:
        y_num = np.array(y_raw, dtype=float)
    tensors = ModelTensors(X=torch.as_tensor(x, **tkw), y=torch.as_tensor(y_num, **tkw),
                           w1_cond=torch.as_tensor(cond[0], **tkw), w1_uncond=torch.as_tensor(uncond[0], **tkw),
                           levels=tuple(level_tensors),
                           offset=None if off is None else torch.as_tensor(off, **tkw))
    return Design(tensors=tensors, parsed=parsed, response=parsed.response,
                  fixed_names=[all_names[j] for j in kept], all_fixed_names=all_names,
                  aliased=[all_names[j] for j in aliased], fixed_spec=ContextSpec(fixed_mm.model_spec, context),
                  levels=levels_info,
                  row_index=clean.index, n_dropped_missing=n_missing, n_dropped_weight=n_wdrop,
                  weight_columns=wcols, weight_stats=weight_stats(uncond), cweights=bool(cweights),
                  y_raw=np.asarray(y_raw), notes=notes, centering=centering, offset=off_spec,
                  context=context)
