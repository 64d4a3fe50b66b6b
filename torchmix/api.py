"""``mix()``: the one public entry point. Orchestration only; the math lives elsewhere.

formula -> :mod:`~torchmix.formula`; data and weights -> :mod:`~torchmix.design` (with
:mod:`~torchmix.surveys` for presets and scaling); family -> :mod:`~torchmix.families`;
fit -> :mod:`~torchmix.fit`; labels -> :mod:`~torchmix.results`; plausible values ->
:mod:`~torchmix.plausible`.
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Optional

import numpy as np
import pandas as pd
import torch

from .arguments import attach_weight_series, resolve_aliases
from .checks import check_identifiable, check_start
from .design import Design, build_design
from .design_variance import resolve_design_variance
from .distributed import is_main
from .distributed.context import warnings_on_main, world
from .distributed.data_parallel import fit_data_parallel
from .distributed.tasks import spread_plausible_values
from .errors import ConfigError, DataError, FormulaError, TorchmixWarning
from .families import get_family
from .fit.gaussian import fit_gaussian
from .fit.gaussian_many import fit_gaussian_many
from .fit.glmm import fit_glmm
from .fit.glmm_many import fit_glmm_many
from .formula import parse_formula
from .plausible import fit_plausible_values
from .quadrature import check_n_quad
from .replication import apply_design_variance
from .report.call import call_text, model_options
from .report.se_type import check_df_rule, warn_few_clusters
from .results import MixedResults
from .surveys import resolve_survey
from .warn import warn
from .threads import check_num_threads, choose_threads, fit_threads, problem_work
from .weights import check_weight_values

__all__ = ["mix", "Prepared"]

_DEPRECATED = ("acc0", "fast", "keepAdapting", "run", "keep_adapting")
_DTYPES = {"float64": torch.float64, "double": torch.float64, "float32": torch.float32, "float": torch.float32}


@dataclass
class Prepared:
    """A model ready to fit: design built once, shared by every plausible value."""

    design: Design
    family: object
    options: dict
    call: str
    responses: Optional[dict] = None     # plausible values: column -> (N,) tensor
    response_name: Optional[str] = None  # the formula's response when plausible values are used
    plan: object = None
    extra: dict = field(default_factory=dict)

    @property
    def is_gaussian(self) -> bool:
        return bool(self.family.is_gaussian_identity)


def _resolve_device(device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"device {device!r} is not a valid torch device (use 'cpu' or 'cuda')") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} was requested but CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {device!r} is not supported (use 'cpu' or 'cuda')")
    return dev


def _resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.replace("torch.", "") in _DTYPES:
        return _DTYPES[dtype.replace("torch.", "")]
    raise ConfigError(f"dtype {dtype!r} is not supported (use 'float64' or 'float32')")


def _resolve_n_quad(n_quad) -> int:
    if isinstance(n_quad, bool) or not isinstance(n_quad, (int, float, np.integer, np.floating)):
        raise ConfigError(f"n_quad must be a positive integer, got {n_quad!r}")
    if not math.isfinite(float(n_quad)) or round(float(n_quad)) <= 0:
        raise ConfigError(f"n_quad must be a positive integer, got {n_quad!r}")
    if float(n_quad) != round(float(n_quad)):
        warn(f"n_quad={n_quad} is not an integer; rounded to {round(float(n_quad))}", TorchmixWarning)
    return check_n_quad(n_quad)


def _validate_response(fam, y_raw: np.ndarray, name: str, gaussian: bool) -> np.ndarray:
    if gaussian:
        arr = np.asarray(y_raw)
        if arr.dtype == bool:
            arr = arr.astype(float)
        if not np.issubdtype(arr.dtype, np.number):
            raise DataError(f"the response {name!r} must be numeric for the gaussian family "
                            f"(found values such as {list(pd.unique(arr))[:3]})")
        arr = arr.astype(float)
        if not np.isfinite(arr).all():
            raise DataError(f"the response {name!r} has non-finite values")
        return arr
    return np.asarray(fam.validate(np.asarray(y_raw)), dtype=float)


def _prepare(formula, data, weights=None, *, cweights=False, family="gaussian", link=None, n_quad=13,
             center_group=None, center_grand=None, scaling=None, survey=None, edsurvey_compat=False,
             plausible_values=None, max_iter=200, tol=1e-8, small_sample="G/(G-1)", device="cpu",
             dtype=torch.float64, progress=True, deterministic=False, call="", offset=None, se_type=None,
             df="cluster", transforms=None) -> Prepared:
    """Check arguments, resolve the family and the weighting plan, and build the design once."""
    if not isinstance(data, pd.DataFrame):
        raise DataError(f"data must be a pandas DataFrame, got {type(data).__name__}")
    parsed = parse_formula(formula, transforms=transforms)
    dev, dt = _resolve_device(device), _resolve_dtype(dtype)
    n_quad = _resolve_n_quad(n_quad)
    se_type, df = ("model" if se_type == "model" else "sandwich"), check_df_rule(df)
    if small_sample not in ("G/(G-1)", "none"):
        raise ConfigError(f"small_sample must be 'G/(G-1)' or 'none', got {small_sample!r}")
    if not isinstance(max_iter, (int, np.integer)) or isinstance(max_iter, bool) or max_iter <= 0:
        raise ConfigError(f"max_iter must be a positive integer, got {max_iter!r}")
    if not isinstance(tol, (int, float)) or isinstance(tol, bool) or not tol > 0:
        raise ConfigError(f"tol must be a positive number, got {tol!r}")

    fam = get_family(family, link)
    gaussian = bool(fam.is_gaussian_identity)

    pv_cols, response_name = None, None
    if plausible_values is not None:
        if not isinstance(plausible_values, dict) or len(plausible_values) != 1:
            raise ConfigError("plausible_values must map the formula's response to a list of columns, "
                              f"e.g. {{'math': ['PV1MATH', 'PV2MATH']}}, got {plausible_values!r}")
        response_name, pv_cols = next(iter(plausible_values.items()))
        if response_name != parsed.response:
            raise ConfigError(f"plausible_values names {response_name!r} but the formula's response is "
                              f"{parsed.response!r}")
        if isinstance(pv_cols, str) or not pv_cols or not all(isinstance(c, str) for c in pv_cols):
            raise ConfigError(f"plausible_values[{response_name!r}] must be a non-empty list of column names")
        dups = sorted({c for c in pv_cols if pv_cols.count(c) > 1})
        if dups:
            raise ConfigError(f"plausible_values[{response_name!r}] lists {', '.join(map(repr, dups))} more than once")
        missing = [c for c in pv_cols if c not in data.columns]
        if missing:
            raise DataError(f"plausible value column(s) not found in data: {', '.join(map(repr, missing))}")
        parsed = replace(parsed, response=pv_cols[0])

    plan = resolve_survey(survey, list(data.columns), weights=weights, cweights=cweights, scaling=scaling,
                          edsurvey_compat=edsurvey_compat)
    if plan.scaling is not None and not plan.weights:
        raise ConfigError(f"scaling={scaling!r} rescales the level-1 weights, but no weights were given "
                          "(pass weights=[level-1 column, level-2 column, ...] or a survey)")
    data_w = plan.materialise(data)
    check_weight_values(data_w, plan.weights)
    scaler = plan.scaler()
    # the design is built on positional row labels (the caller's may repeat); its row_index is
    # then mapped back to the caller's labels, and extra columns are taken by position
    positional = data_w.set_axis(pd.RangeIndex(len(data_w)), axis=0)
    design = build_design(parsed, positional, list(plan.weights) if plan.weights else None, cweights=plan.cweights,
                          center_group=center_group, center_grand=center_grand,
                          extra_columns=list(pv_cols or []), scaler=scaler, dtype=dt, device=dev, offset=offset,
                          transforms=transforms)
    rows = design.row_index.to_numpy()
    design.row_index = data.index[rows]
    if plan.scaling is None and (survey is not None or edsurvey_compat) and plan.note:
        design.notes.append(plan.note)
    y = _validate_response(fam, design.y_raw, parsed.response, gaussian)
    design.tensors = design.tensors.with_response(torch.as_tensor(y, dtype=dt, device=dev))
    check_identifiable(design, getattr(fam, "name", ""), design.tensors.y)
    responses = None
    if pv_cols is not None:
        responses = {}
        for col in pv_cols:
            raw = positional[col].to_numpy()[rows]
            responses[col] = torch.as_tensor(_validate_response(fam, raw, col, gaussian), dtype=dt, device=dev)
    options = dict(n_quad=n_quad, max_iter=int(max_iter), tol=float(tol), small_sample=small_sample,
                   device=str(dev), dtype=str(dt).replace("torch.", ""), progress=bool(progress),
                   deterministic=bool(deterministic), se_type=se_type, df=df)
    return Prepared(design=design, family=fam, options=options, call=call, responses=responses,
                    response_name=response_name, plan=plan)


@contextmanager
def _deterministic(on: bool):
    """Switch torch's deterministic algorithms on for the block (CUDA ``index_add``), then restore."""
    previous = torch.are_deterministic_algorithms_enabled()
    if not on or previous:  # nothing to change (and torch's setter imports its compiler stack)
        yield
        return
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def _fit_many(prepared: Prepared, ys: list, advance=None, first: Optional[MixedResults] = None) -> list:
    """Fit a model to several responses at once (plausible values): the first as usual, with its
    warnings (unless its fit is given as ``first``); the others batched over values
    (:mod:`~torchmix.fit.gaussian_many`, :mod:`~torchmix.fit.glmm_many`). ``advance(n)`` (a
    progress bar's ``update``) is called as values are done."""
    if first is None:
        first = _fit_one(prepared, ys[0])
        if advance is not None:
            advance(1)
    stacked = torch.stack(ys, dim=1)
    o = prepared.options
    with _deterministic(o["deterministic"]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        meat = prepared.extra.get("meat") or o["small_sample"]
        if prepared.is_gaussian:
            outs = fit_gaussian_many(prepared.design.tensors, stacked, max_iter=o["max_iter"], tol=o["tol"],
                                     small_sample=meat, progress=False, first=first._out,
                                     newton_steps=min(20, o["max_iter"]))
        else:
            outs = fit_glmm_many(prepared.design.tensors, prepared.family, stacked, n_quad=o["n_quad"],
                                 max_iter=o["max_iter"], tol=o["tol"], small_sample=meat, progress=False,
                                 first=first._out)
    fits = [first]
    for y, out in zip(ys[1:], outs[1:]):
        design = replace(prepared.design, tensors=prepared.design.tensors.with_response(y))
        fits.append(MixedResults(out, design, prepared.family, prepared.call, o))
    return fits


def _fit_tensors(prepared: Prepared, tensors, start=None, progress=None):
    """Fit the prepared model to ``tensors`` (its design, or the design with other weights or response)."""
    o = prepared.options
    meat = prepared.extra.get("meat") or o["small_sample"]
    show = o["progress"] if progress is None else progress
    with _deterministic(o["deterministic"]):
        if world() is not None:  # a process group: this fit is spread over its processes
            return fit_data_parallel(tensors, prepared.family, world(), gaussian=prepared.is_gaussian,
                                     n_quad=o["n_quad"], start=start, max_iter=o["max_iter"], tol=o["tol"],
                                     small_sample=meat, progress=show)
        if prepared.is_gaussian:
            return fit_gaussian(tensors, start=start, max_iter=o["max_iter"], tol=o["tol"], small_sample=meat,
                                progress=show)
        return fit_glmm(tensors, prepared.family, n_quad=o["n_quad"], start=start, max_iter=o["max_iter"],
                        tol=o["tol"], small_sample=meat, progress=show)


def _fit_one(prepared: Prepared, y: Optional[torch.Tensor] = None, start=None) -> MixedResults:
    """Fit the prepared model once (optionally with another response vector ``y``)."""
    tensors = prepared.design.tensors if y is None else prepared.design.tensors.with_response(y)
    o = prepared.options
    out = _fit_tensors(prepared, tensors, start)
    design = prepared.design
    if y is not None:
        design = replace(design, tensors=tensors)
    return MixedResults(out, design, prepared.family, prepared.call, o)


@warnings_on_main
def mix(formula: str, data: pd.DataFrame, weights=None, *, cweights: bool = False, family="gaussian",
        link=None, n_quad: int = 13, center_group: Optional[dict] = None, center_grand=None, scaling=None,
        survey: Optional[str] = None, edsurvey_compat: bool = False, plausible_values: Optional[dict] = None,
        start=None, max_iter: int = 200, tol: float = 1e-8, small_sample: str = "G/(G-1)", device="cpu",
        dtype=torch.float64, progress: bool = True, deterministic: bool = False, se_type: Optional[str] = None,
        strata: Optional[str] = None, psu: Optional[str] = None, fpc=None, lonely_psu: str = "error",
        replicate_weights=None, replicate_method: Optional[str] = None, fay_rho: Optional[float] = None,
        scale: Optional[float] = None, rscales=None, mse: bool = True, jk_zone: Optional[str] = None,
        jk_rep: Optional[str] = None, jk_both_halves: Optional[bool] = None, replicate_pv: str = "all",
        num_threads: Optional[int] = None,
        offset: Optional[str] = None, df="cluster", transforms: Optional[dict] = None,
        **deprecated):
    """Fit a survey-weighted multilevel (mixed-effects) model.

    Parameters
    ----------
    formula : lme4-style formula, e.g. ``"mAch ~ meanses + cses + (1 + cses | school)"``.
    data : pandas DataFrame (never modified).
    weights : weight column names, level 1 first (one per level); None = all ones. A weight may
        also be a pandas Series aligned with ``data`` by index (alone, or in the list among
        column names); it is named after the Series (``weights[i]`` when unnamed) in the call.
    cweights : False (default) when the weights are unconditional (inverse overall inclusion
        probabilities), True when each level's weight is conditional on its parent being sampled.
        WeMix's spelling ``cWeights=`` is accepted as an alias.
    family, link : ``"gaussian"`` (closed form), ``"binomial"``, ``"poisson"`` or a Family
        instance; link name or instance (canonical default).
    n_quad : Gauss-Hermite points per random effect (non-gaussian families; 1 = Laplace).
    center_group : ``{"school": ["ses"]}``: weighted group-mean centering.
    center_grand : ``["ses"]``: weighted grand-mean centering.
    scaling : level-1 weight scaling ``None | "A" | "B" | "timss"`` (MATH.md 3).
    survey : survey preset (``"PISA"``, ``"TIMSS"``, ...) choosing weight columns and scaling.
    edsurvey_compat : reproduce EdSurvey ``mixed.sdf`` quirks (MATH.md 3, E1-E3).
    plausible_values : ``{"math": ["PV1MATH", ...]}``: fit once per column and pool (Rubin).
    start : starting values ``(beta, variance components)`` in reporting order.
    max_iter : iteration budget. Gaussian family: L-BFGS iterations plus Newton polish steps
        together (``res.iterations`` counts both). Other families: L-BFGS iterations of each of
        the two stages (Laplace start, then the ``n_quad`` fit); the Newton polish after them has
        its own bound. A fit that stops on the budget has ``converged=False`` and warns.
    tol : gradient tolerance of the convergence test (normalised objective).
    small_sample : ``"G/(G-1)"`` (default) or ``"none"``: factor of the sandwich meat.
    device, dtype : where and in which precision to compute (float64 recommended).
    progress : show progress bars.
    deterministic : use deterministic algorithms (CUDA ``index_add`` is otherwise
        nondeterministic in its last bits).
    se_type : ``"sandwich"`` (default; cluster-robust at the top level, warns below 30 clusters),
        ``"model"`` (inverse observed information; lme4's ``vcov()`` with unit weights),
        ``"linearization"`` or ``"replicate"``; giving
        ``strata``/``psu``/``fpc`` selects linearization and ``replicate_weights``/``jk_zone``
        selects replicates without naming it.
    strata, psu : columns of the sampling strata and primary sampling units (a PSU holds whole
        top-level groups; PSU ids are taken within strata; default PSU: the top-level groups).
    fpc : finite-population correction per stratum: a column, a number or a dict stratum -> value;
        sampling fractions (all <= 1) or population numbers of PSUs (any > 1).
    lonely_psu : strata with one PSU: ``"error"`` (default), ``"remove"``, ``"certainty"``,
        ``"adjust"`` or ``"average"`` (the R ``survey`` package's rules).
    replicate_weights : level-1 replicate weight columns (a list or a regular expression such as
        ``"W_FSTR\\d+"``), or ``{weight column: [replicate columns]}`` for the level-1 or the top-level
        weight column.
    replicate_method, fay_rho, scale, rscales, mse : ``"JK1" | "JK2" | "BRR" | "Fay" | "bootstrap"``,
        Fay's rho, the variance constants (defaults by method, as in ``survey::svrepdesign``), and
        whether deviations are taken from the full-sample estimate (default) or the replicate mean.
    jk_zone, jk_rep, jk_both_halves : jackknife zones and replicate indicator columns (TIMSS/PIRLS
        ``JKZONE``, ``JKREP``); both halves forms two replicates per zone (scale 1/2 for JK2).
    replicate_pv : with plausible values, replicate variance from ``"all"`` values (default) or the
        ``"first"`` only.
    num_threads : torch intra-op threads for the fit (restored afterwards); None = chosen by
        the size of the problem (one thread for small and medium problems, see
        :mod:`~torchmix.threads`). Results do not depend on it.
    offset : name of a numeric column added to the linear predictor with coefficient 1 (as
        ``offset(...)`` terms of the formula, e.g. ``offset(log(n))``; several offsets add up).
    df : reference distribution of p-values and intervals: ``"cluster"`` (default; t with
        top-level clusters - 1 degrees of freedom, or the design degrees of freedom of
        linearization/replicates; Barnard-Rubin for plausible values), ``"normal"`` (z) or a
        positive number.
    transforms : ``{"logit": f}``: functions the formula may call besides the built-in
        allow-list (:mod:`~torchmix.formula_safety`); a formula can call nothing else.

    Returns
    -------
    :class:`~torchmix.results.MixedResults`, or ``PooledResults`` with plausible values.

    Notes
    -----
    Fits are by maximum (pseudo-)likelihood; ``REML=True`` is refused with the reason
    (:mod:`torchmix.arguments`). WeMix's ``acc0``, ``fast``, ``keepAdapting`` and ``run`` are
    accepted and ignored with a ``FutureWarning``.
    """
    for name in list(deprecated):
        if name in _DEPRECATED:
            warn(f"argument {name!r} is accepted for WeMix compatibility and ignored", FutureWarning)
            deprecated.pop(name)
    cweights = resolve_aliases(deprecated, cweights)
    if deprecated:
        raise TypeError(f"mix() got unexpected keyword argument(s) {sorted(deprecated)}")
    kwargs = model_options(mix, locals())
    if not isinstance(formula, str):
        raise FormulaError(f"formula must be a string such as 'y ~ x + (1 | g)', got {type(formula).__name__}")
    if not isinstance(data, pd.DataFrame):
        raise DataError(f"data must be a pandas DataFrame, got {type(data).__name__}")
    frame, (data, weights) = data, attach_weight_series(data, weights)
    call = call_text(formula, frame, weights, kwargs)
    if isinstance(weights, list):
        weights = [str(w) if isinstance(w, str) else w for w in weights]
    num_threads = check_num_threads(num_threads)
    progress = bool(progress) and is_main()  # under a process group, rank 0 alone shows progress
    start = check_start(start)
    # the design step is many small operations too: threads chosen by its size, as for the fit
    with fit_threads(choose_threads(problem_work(len(data), 1, 0), num_threads)):
        prepared = _prepare(formula, data, weights, cweights=cweights, family=family, link=link, n_quad=n_quad,
                            center_group=center_group, center_grand=center_grand, scaling=scaling, survey=survey,
                            edsurvey_compat=edsurvey_compat, plausible_values=plausible_values, max_iter=max_iter,
                            tol=tol, small_sample=small_sample, device=device, dtype=dtype, progress=progress,
                            deterministic=deterministic, call=call, offset=offset, se_type=se_type, df=df,
                            transforms=transforms)
    design_args = dict(se_type=se_type, strata=strata, psu=psu, fpc=fpc, lonely_psu=lonely_psu,
                       replicate_weights=replicate_weights, replicate_method=replicate_method, fay_rho=fay_rho,
                       scale=scale, rscales=rscales, mse=mse, jk_zone=jk_zone, jk_rep=jk_rep,
                       jk_both_halves=jk_both_halves, replicate_pv=replicate_pv, survey=survey)
    dv = resolve_design_variance(data, prepared.design, prepared.plan, design_args)
    if dv is not None and dv.kind == "linearization":
        prepared.extra["meat"] = dv.meat
    top = prepared.design.levels[-1] if prepared.design.levels else None
    if top is not None and dv is None:
        warn_few_clusters(len(top.labels), top.name, se_type or "sandwich")
    with fit_threads(choose_threads(_work(prepared), num_threads)):
        if prepared.responses is not None:
            res = fit_plausible_values(prepared, prepared.responses, _fit_one, progress,
                                       fit_many=spread_plausible_values(_fit_many, _fit_one))
        else:
            res = _fit_one(prepared, start=start)
        if dv is None:
            return res
        return apply_design_variance(res, dv, lambda t, s: _fit_tensors(prepared, t, s, progress=False),
                                     progress)


def _work(prepared: Prepared) -> float:
    """Size of the fit for the choice of threads (:func:`~torchmix.threads.problem_work`)."""
    t = prepared.design.tensors
    q = sum(lv.q for lv in t.levels)
    nodes = 1.0 if prepared.is_gaussian else float(prepared.options["n_quad"]) ** q
    return problem_work(t.X.shape[0], t.n_fixed, q, nodes)
