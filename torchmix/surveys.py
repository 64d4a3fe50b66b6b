r"""Level-1 weight scaling and survey presets (MATH.md section 3; EdSurvey ``mixed.sdf``).

Two layers:

* :func:`apply_scaling` -- pure NumPy on arrays plus integer group codes: scales the level-1
  weights inside each level-2 group and returns **conditional** level-1 weights
  :math:`w^*_{i\mid j}`.
* :func:`resolve_survey` -- turns ``survey=``, ``weights=``, ``cweights=``, ``scaling=`` and
  ``edsurvey_compat=`` into a :class:`SurveyPlan`: which weight columns to use (looked up
  case-insensitively in the data), whether they are conditional, which scaling to apply,
  and a one-line note for the printed summary. Nothing here touches a DataFrame except
  :meth:`SurveyPlan.materialise`, which adds product columns some presets need.

The scaling methods themselves are in :mod:`~torchmix.weight_scaling`.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import numpy as np

from .errors import ConfigError, TorchmixWarning, WeightError
from .warn import warn
from .weight_scaling import (SCALING_METHODS, _sentence, apply_scaling, describe_scaling,  # noqa: F401
                             normalise_scaling)

__all__ = [
    "SCALING_METHODS",
    "SURVEYS",
    "SurveyPreset",
    "SurveyPlan",
    "normalise_scaling",
    "apply_scaling",
    "find_columns",
    "lookup_survey",
    "resolve_survey",
    "describe_scaling",
]

# ---------------------------------------------------------------------------------------------
# column lookup
# ---------------------------------------------------------------------------------------------

def find_columns(columns: Iterable[str], wanted: Sequence[str], what: str = "weight") -> list[str]:
    """Resolve names case-insensitively against the data's columns (an exact match wins).

    Returns
    -------
    list of the data's own spelling of each wanted name.

    Raises
    ------
    WeightError
        Naming **all** missing columns at once, or a name that matches several columns.
    """
    cols = [str(c) for c in columns]
    exact = set(cols)
    by_fold: dict[str, list[str]] = {}
    for c in cols:
        by_fold.setdefault(c.casefold(), []).append(c)
    found, missing, ambiguous = [], [], []
    for name in wanted:
        if name in exact:
            found.append(name)
            continue
        hits = by_fold.get(name.casefold(), [])
        if len(hits) == 1:
            found.append(hits[0])
        elif hits:
            ambiguous.append(f"{name} ({', '.join(hits)})")
        else:
            missing.append(name)
    if missing:
        raise WeightError(f"{what} column(s) not found in the data (case-insensitive): {', '.join(missing)}")
    if ambiguous:
        raise WeightError(f"{what} column name(s) match several columns that differ only in case: "
                          f"{'; '.join(ambiguous)}")
    return found


# ---------------------------------------------------------------------------------------------
# survey presets (seed vignette, Table 1)
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SurveyPreset:
    """What the seed's Table 1 recommends for one survey.

    Attributes
    ----------
    name : canonical display name.
    weights : per level (level 1 first), the columns whose product is that level's weight;
        None when the survey has no recommendation.
    cweights : whether those weights are conditional.
    scaling : recommended level-1 scaling (canonical name).
    edsurvey_scaling : what EdSurvey ``mixed.sdf`` actually applies (quirks E1, E2).
    edsurvey_implemented : whether EdSurvey applies a transformation for this survey at all.
    guidance : the recommendation in words (used in notes and errors).
    """

    name: str
    weights: Optional[tuple]
    cweights: bool
    scaling: Optional[str]
    edsurvey_scaling: Optional[str]
    edsurvey_implemented: bool
    guidance: str


_TIMSS_GUIDANCE = ("TIMSS method: level-1 weight TOTWGT/SCHWGT, level-2 weight SCHWGT, "
                   "no further scaling (Koretz, McCaffrey & Sullivan 2001; TIMSS 2015)")
_IEA_PRODUCT = ("level-1 weight = product of the within-school weighting factors, level-2 weight = "
                "WGTFAC1 x WGTADJ1S; torchmix takes TOTWGTS (the product of all factors) as the "
                "unconditional level-1 weight and WGTFAC1 x WGTADJ1S as the level-2 weight, so the "
                "conditional level-1 weight is exactly the product of the within-school factors")

SURVEYS: dict[str, SurveyPreset] = {p.name: p for p in (
    SurveyPreset("PISA", (("w_fstuwt",), ("w_fschwt",)), False, "A", "B", True,
                 "method A for the level-1 weights, no scaling of the level-2 weights "
                 "(Rabe-Hesketh & Skrondal 2006)"),
    SurveyPreset("TIMSS", (("totwgt",), ("schwgt",)), False, "timss", "timss", True, _TIMSS_GUIDANCE),
    SurveyPreset("TIMSS Advanced", (("totwgt",), ("schwgt",)), False, "timss", "timss", True, _TIMSS_GUIDANCE),
    SurveyPreset("PIRLS", (("totwgt",), ("schwgt",)), False, "timss", None, False, _TIMSS_GUIDANCE),
    SurveyPreset("TALIS", (("tchwgt",), ("schwgt",)), False, "A", None, False,
                 "teacher weight divided by the school weight, then method A (Carstens 2009)"),
    SurveyPreset("ICCS", (("totwgts",), ("wgtfac1", "wgtadj1s")), False, None, None, False,
                 _IEA_PRODUCT + " (Koehler et al. 2016)"),
    SurveyPreset("ICILS", (("totwgts",), ("wgtfac1", "wgtadj1s")), False, None, None, False,
                 _IEA_PRODUCT + " (Jung & Carstens 2015)"),
    SurveyPreset("NAEP", None, False, None, None, False,
                 "no widely used scaling method for multilevel models"),
    SurveyPreset("ECLS-K", None, False, None, None, False, "no suggestions for multilevel models"),
    SurveyPreset("ELS", None, False, None, None, False, "no suggestions for multilevel models"),
    SurveyPreset("CIVED", None, False, None, None, False,
                 "the user guide gives no suggestion for multilevel models but says the sample design "
                 "and weighting are the same as TIMSS (Schulz & Sibberns 2004)"),
    SurveyPreset("PIAAC", None, False, None, None, False, "no suggestions for multilevel models"),
)}


def _key(name: str) -> str:
    return re.sub(r"[\s_\-]+", "", name.casefold())


_BY_KEY = {_key(n): n for n in SURVEYS}


def lookup_survey(survey: str) -> SurveyPreset:
    """The preset of a survey name (case-, space-, '-' and '_'-insensitive: "timss_advanced").

    Raises
    ------
    ConfigError
        For an unknown name, with the closest known names and the full list.
    """
    if not isinstance(survey, str):
        raise ConfigError(f"survey must be a string naming a survey; got {survey!r}")
    hit = _BY_KEY.get(_key(survey))
    if hit is None:
        close = difflib.get_close_matches(_key(survey), list(_BY_KEY), n=2, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(_BY_KEY[c]) for c in close)}?" if close else ""
        raise ConfigError(f"unknown survey {survey!r}.{hint} Known surveys: {', '.join(SURVEYS)}")
    return SURVEYS[hit]


@dataclass(frozen=True)
class SurveyPlan:
    """How to weight one fit: the output of :func:`resolve_survey`.

    Attributes
    ----------
    survey : canonical survey name, or None.
    weights : weight column names as the fitter should receive them (level 1 first), or None
        (unweighted). A product of several columns gets the name ``"A*B"``; call
        :meth:`materialise` to add such columns to the data.
    factors : per level, the data columns whose product is that weight (one column when no
        product is needed).
    cweights : whether ``weights`` are conditional.
    scaling : None, "A", "B" or "timss": the level-1 scaling to apply after row cleaning
        with :func:`apply_scaling`.
    scaled_as_unconditional : EdSurvey quirk E3 (``edsurvey_compat=True`` with a scaling):
        pass to :func:`apply_scaling`.
    note : one or two sentences for the printed summary (which scaling, and why).
    """

    survey: Optional[str]
    weights: Optional[tuple]
    factors: Optional[tuple]
    cweights: bool
    scaling: Optional[str]
    scaled_as_unconditional: bool = False
    note: str = ""
    edsurvey_compat: bool = False

    def materialise(self, data):
        """Return ``data`` with any product weight column added (a new DataFrame; the
        input is not modified), or ``data`` itself when no product is needed."""
        if not self.factors:
            return data
        extra = {}
        for name, cols in zip(self.weights, self.factors):
            if len(cols) > 1 and name not in data.columns:
                prod = data[cols[0]].astype("float64")
                for c in cols[1:]:
                    prod = prod * data[c].astype("float64")
                extra[name] = prod
        return data.assign(**extra) if extra else data

    def apply(self, w1, w2, group_codes) -> np.ndarray:
        """:func:`apply_scaling` with this plan's method, input type and compat flag
        (``w2``: per-row unconditional level-2 weight)."""
        return apply_scaling(w1, w2, group_codes, self.scaling, conditional_input=self.cweights,
                             scaled_as_unconditional=self.scaled_as_unconditional)

    def scaler(self):
        """A callable for :func:`torchmix.design.build_design` (``scaler=``), or None when
        there is nothing to scale.

        The callable takes ``(w1, w2_groups, codes2, conditional_input)`` -- the cleaned
        level-1 weights ``(N,)``, the unconditional level-2 weight of each level-2 group
        ``(G2,)``, the level-2 code of each row ``(N,)`` and whether ``w1`` is conditional -- and
        returns ``(conditional w1 (N,), note)``.
        """
        if self.scaling is None:
            return None
        method, e3, note = self.scaling, self.scaled_as_unconditional, self.note

        def scale(w1, w2_groups, codes2, conditional_input):
            codes = np.asarray(codes2)
            w2_rows = np.asarray(w2_groups, dtype=np.float64)[codes]
            out = apply_scaling(w1, w2_rows, codes, method, conditional_input=bool(conditional_input),
                                scaled_as_unconditional=e3)
            return out, note

        return scale


def _user_weights(weights) -> Optional[tuple]:
    if weights is None:
        return None
    if isinstance(weights, str):
        return (weights,)
    try:
        out = tuple(weights)
    except TypeError:
        raise WeightError(f"weights must be a column name or a list of column names; got {weights!r}") from None
    if not all(isinstance(w, str) for w in out):
        raise WeightError(f"weights must be column names (strings); got {weights!r}")
    return out


def resolve_survey(survey: Optional[str] = None, columns: Optional[Iterable[str]] = None, *,
                   weights=None, cweights: bool = False, scaling=None,
                   edsurvey_compat: bool = False) -> SurveyPlan:
    """Decide weight columns, their type and the level-1 scaling for one fit.

    Rules
    -----
    * No ``survey``: ``weights``/``cweights`` pass through unchanged; ``scaling`` is
      normalised (None = no scaling).
    * ``survey`` given and ``weights`` None: the preset's columns are looked up in ``columns``
      case-insensitively (a :class:`~torchmix.errors.WeightError` names every missing one). A
      survey with no recommendation (NAEP, ECLS-K, ELS, CIVED, PIAAC) raises
      :class:`~torchmix.errors.ConfigError` explaining how to pass weights yourself.
    * ``survey`` and ``weights`` given: the user's columns are used as given (with the user's
      ``cweights``) and the survey only chooses the scaling.
    * ``scaling=None`` takes the survey's recommendation; ``scaling="none"`` turns scaling off
      (EdSurvey ``weightTransformation=FALSE``); an explicit method always wins.
    * ``edsurvey_compat=True`` reproduces EdSurvey ``mixed.sdf``: PISA gets method B (quirk E1);
      only PISA, TIMSS and TIMSS Advanced are transformed, any other survey (PIRLS: quirk E2)
      uses raw weights with a warning; a scaled level-1 weight is treated as unconditional
      (quirk E3).

    Parameters
    ----------
    survey : survey name (see :data:`SURVEYS`), case-insensitive, or None.
    columns : the data's column names (needed when a preset picks the columns).
    weights, cweights, scaling, edsurvey_compat : as in ``torchmix.mix``.

    Returns
    -------
    :class:`SurveyPlan`
    """
    user_w = _user_weights(weights)
    requested = normalise_scaling(scaling, allow_unset=True)
    compat = bool(edsurvey_compat)

    if survey is None:
        method = None if requested == "unset" else requested
        parts = [_sentence(describe_scaling(method))]
        if compat and method is not None:
            parts.append("EdSurvey-compatible: the scaled level-1 weight is used as unconditional (quirk E3)")
        return SurveyPlan(survey=None, weights=user_w, factors=None if user_w is None else tuple((w,) for w in user_w),
                          cweights=bool(cweights), scaling=method, scaled_as_unconditional=compat and method is not None,
                          note="; ".join(parts) + ".", edsurvey_compat=compat)

    preset = lookup_survey(survey)
    notes = []
    if user_w is not None:
        names, factors, is_cond = user_w, tuple((w,) for w in user_w), bool(cweights)
        notes.append(f"{preset.name}: user-supplied weights {', '.join(names)}")
    else:
        if preset.weights is None:
            raise ConfigError(
                f"survey {preset.name!r} has no recommended weights for multilevel models ({preset.guidance}); "
                f"pass them yourself, level 1 first, e.g. weights=['<student weight>', '<school weight>'] "
                f"(add cweights=True if the level-1 weight is already conditional on the school) and, if you "
                f"want one, scaling='A' or 'B'")
        if cweights:
            raise ConfigError(f"cweights=True conflicts with survey={preset.name!r}: its preset weights are "
                              f"{'conditional' if preset.cweights else 'unconditional'}; pass weights yourself "
                              f"to use conditional ones")
        if columns is None:
            raise ConfigError(f"survey={preset.name!r} needs the data's column names to find its weights")
        wanted = [c for level in preset.weights for c in level]
        resolved = iter(find_columns(columns, wanted, what=f"{preset.name} weight"))
        factors = tuple(tuple(next(resolved) for _ in level) for level in preset.weights)
        names = tuple("*".join(f) for f in factors)
        is_cond = preset.cweights
        kind = "conditional" if is_cond else "unconditional"
        notes.append(f"{preset.name} preset: weights {', '.join(names)} ({kind})")

    if requested != "unset":
        method, why = requested, "as requested"
    elif compat:
        method = preset.edsurvey_scaling
        if method is None:
            warn(f"EdSurvey does not specify weight transformation rules for {preset.name}; raw weights "
                 f"are used (edsurvey_compat=True; the recommendation is: {preset.guidance})",
                 TorchmixWarning)
            why = "EdSurvey-compatible: no transformation for this survey"
        elif method != preset.scaling:
            why = f"EdSurvey-compatible (EdSurvey applies method {method} to {preset.name}, quirk E1)"
        else:
            why = "EdSurvey-compatible"
    else:
        method, why = preset.scaling, f"recommended for {preset.name}"
        if method is None and preset.weights is None:
            why = f"no recommendation for {preset.name}"
    notes.append(f"{describe_scaling(method)} ({why})")
    e3 = compat and method is not None
    if e3:
        notes.append("the scaled level-1 weight is used as unconditional (EdSurvey quirk E3)")
    elif method is not None:
        notes.append("level-2 weights not scaled")
    return SurveyPlan(survey=preset.name, weights=names, factors=factors, cweights=is_cond, scaling=method,
                      scaled_as_unconditional=e3, note="; ".join(notes) + ".", edsurvey_compat=compat)
