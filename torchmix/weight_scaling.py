r"""Level-1 weight scaling inside level-2 groups (MATH.md section 3; EdSurvey ``mixed.sdf``).

:func:`apply_scaling` is pure NumPy on arrays plus integer group codes: it scales the level-1
weights inside each level-2 group and returns **conditional** level-1 weights
:math:`w^*_{i\mid j}`.

Scaling methods, with :math:`a_i` the level-1 weight of row :math:`i` in level-2 group
:math:`j` (conditional or unconditional: methods A and B are invariant to multiplying all
:math:`a_i` of a group by one constant, so both give the same result), :math:`n_j` the
number of rows of :math:`j`:

========  ===============================================================================
None      :math:`w^*_{i\mid j}=w_{i\mid j}` (no scaling; unconditional inputs are divided by
          the level-2 weight)
``"A"``   :math:`w^*_{i\mid j}=a_i\,n_j/\sum_{i'\in j}a_{i'}` (sums to :math:`n_j`)
``"B"``   :math:`w^*_{i\mid j}=a_i\sum_{i'\in j}a_{i'}/\sum_{i'\in j}a_{i'}^2` (sums to the
          effective size :math:`(\sum a)^2/\sum a^2`)
"timss"   :math:`w^*_{i\mid j}=\mathrm{TOTWGT}_i/\mathrm{SCHWGT}_j`, i.e. exactly the
          unconditional-to-conditional conversion (no rescaling at all)
========  ===============================================================================

Level-2 and higher weights are never scaled. Apply scaling after row cleaning.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from .errors import ConfigError, WeightError

__all__ = ["SCALING_METHODS", "normalise_scaling", "describe_scaling", "apply_scaling"]

#: Canonical scaling names accepted by :func:`apply_scaling` (``None`` = no scaling).
SCALING_METHODS = (None, "A", "B", "timss")

_SCALING_ALIASES = {"none": None, "a": "A", "b": "B", "timss": "timss"}


def normalise_scaling(scaling, *, allow_unset: bool = False):
    """Canonical scaling name: ``None``, ``"A"``, ``"B"`` or ``"timss"`` (case-insensitive).

    ``"none"`` (or ``False``) means "explicitly no scaling". With ``allow_unset=True`` a
    plain ``None`` is returned as the string ``"unset"`` so that a survey preset may fill it in.

    Raises
    ------
    ConfigError
        For any other value; the message names ``scaling`` and the valid values.
    """
    if scaling is None:
        return "unset" if allow_unset else None
    if scaling is False:
        return None
    if isinstance(scaling, str):
        key = scaling.strip().lower()
        if key in _SCALING_ALIASES:
            return _SCALING_ALIASES[key]
    raise ConfigError(f"scaling={scaling!r} is not a weight-scaling method; use None, 'none', 'A', 'B' or 'timss'")


def describe_scaling(method) -> str:
    """One phrase describing a (canonical) scaling method, for summaries."""
    return {
        None: "no scaling of the level-1 weights",
        "A": "level-1 weights scaled with method A (they sum to the group size)",
        "B": "level-1 weights scaled with method B (they sum to the effective group size)",
        "timss": "TIMSS method (level-1 weight = total weight / school weight, no rescaling)",
    }[method]


def _sentence(phrase: str) -> str:
    """Upper-case the first letter only (``str.capitalize`` would lower-case "method A")."""
    return phrase[:1].upper() + phrase[1:]


# ---------------------------------------------------------------------------------------------
# pure array scaling
# ---------------------------------------------------------------------------------------------

def _as_weight(x, name: str, n: Optional[int] = None) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1:
        raise WeightError(f"{name} must be one-dimensional (one value per row); got shape {a.shape}")
    if n is not None and a.shape[0] != n:
        raise WeightError(f"{name} has {a.shape[0]} rows, expected {n} (one per row of the data)")
    bad = ~np.isfinite(a) | (a <= 0)
    if bad.any():
        first = np.flatnonzero(bad)[:5].tolist()
        raise WeightError(f"{name} must be finite and positive (clean rows first); {int(bad.sum())} "
                          f"value(s) are not, at rows {first}")
    return a


def apply_scaling(w1, w2, group_codes, method, conditional_input: bool = False,
                  scaled_as_unconditional: bool = False) -> np.ndarray:
    r"""Scale level-1 weights within level-2 groups; return **conditional** level-1 weights.

    Parameters
    ----------
    w1 : array ``(N,)``
        Level-1 weights: unconditional :math:`w^{(1)}_i` (``conditional_input=False``) or
        conditional :math:`w_{i\mid j}` (``conditional_input=True``).
    w2 : array ``(N,)`` or None
        The **unconditional** level-2 weight :math:`w^{(2)}_{j(i)}` of each row's group (for
        3-level models: the product of the conditional level-2 and level-3 weights). Needed for
        ``method`` None/"timss" with unconditional input and when ``scaled_as_unconditional``.
    group_codes : int array ``(N,)``
        Level-2 group of each row, values in ``[0, G)``.
    method : None, "A", "B" or "timss" (see :func:`normalise_scaling`).
    conditional_input : bool
        Whether ``w1`` is already conditional.
    scaled_as_unconditional : bool
        EdSurvey quirk E3: the scaled weight is handed on as if it were *unconditional*, so the
        conditional weight actually used is :math:`w^*_{i\mid j}/w^{(2)}_j`. Applies only
        when a scaling method (A, B, timss) is used.

    Returns
    -------
    array ``(N,)`` float64 conditional level-1 weights :math:`w^*_{i\mid j}`. Multiply by
    ``w2`` to get the matching unconditional level-1 weights.

    Notes
    -----
    Group sums are ``np.bincount`` segment sums; there is no loop over groups. Methods A and B
    depend on ``w1`` only through within-group ratios, so conditional and unconditional inputs
    give identical output (MATH.md V11).
    """
    method = normalise_scaling(method)
    a = _as_weight(w1, "level-1 weights (w1)")
    n = a.shape[0]
    codes = np.asarray(group_codes)
    if codes.ndim != 1 or codes.shape[0] != n:
        raise WeightError(f"group_codes must have one entry per row ({n}); got shape {codes.shape}")
    if not np.issubdtype(codes.dtype, np.integer):
        raise WeightError(f"group_codes must be integer codes; got dtype {codes.dtype}")
    if n and codes.min() < 0:
        raise WeightError("group_codes must be non-negative")
    need_w2 = scaled_as_unconditional and method is not None
    need_w2 = need_w2 or (method in (None, "timss") and not conditional_input)
    w2a = None
    if w2 is not None:
        w2a = _as_weight(w2, "level-2 weights (w2)", n)
    elif need_w2:
        raise WeightError(f"scaling={method!r} with these inputs needs the level-2 weight of each row (w2)")

    if method in (None, "timss"):
        out = a.copy() if conditional_input else a / w2a
    else:
        sum_a = np.bincount(codes, weights=a)
        if method == "A":
            size = np.bincount(codes).astype(np.float64)
            factor = size / np.where(sum_a > 0, sum_a, 1.0)
        else:  # "B"
            sum_a2 = np.bincount(codes, weights=a * a)
            factor = sum_a / np.where(sum_a2 > 0, sum_a2, 1.0)
        out = a * factor[codes]
    if scaled_as_unconditional and method is not None:
        out = out / w2a
    return out
