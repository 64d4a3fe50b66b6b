r"""Wald tests of linear constraints :math:`R\gamma=r` on fixed effects or variance components.

.. math::
    W=(R\hat\gamma-r)^\top(RVR^\top)^{-1}(R\hat\gamma-r)\sim\chi^2_q,\qquad q=\operatorname{rank}R

(MATH.md 9). Constraints are given as strings, ``"meanses = cses"``, ``"x1 + x2 = 0"``,
``"2*x1 - x2 = 1"``, several in one string separated by commas or as a list; each side is a linear
combination of coefficient names with numeric factors. A plain list of names tests that each is
zero (the old behaviour). Aliased coefficients (NaN, dropped from the fit) are left out of a test by
name with a warning; a constraint that involves one is an error.
"""

from __future__ import annotations

import re
import warnings
from typing import Sequence

import numpy as np

from ..errors import DataError, TorchmixWarning
from .distributions import chi2_sf

__all__ = ["parse_constraints", "wald"]

_NUMBER = re.compile(r"(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")


def _split_top(text: str) -> list[str]:
    """Split on commas outside parentheses."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch == "(") - (ch == ")")
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return [p.strip() for p in parts if p.strip()]


def _parse_side(text: str, names: Sequence[str], constraint: str) -> tuple[dict, float]:
    """Linear combination -> (coefficient per name, constant)."""
    by_len = sorted(names, key=len, reverse=True)
    coefs, const, i, n = {}, 0.0, 0, len(text)
    expect_term = True
    sign = 1.0
    while i < n:
        if text[i].isspace():
            i += 1
            continue
        if text[i] in "+-" and expect_term:
            sign *= -1.0 if text[i] == "-" else 1.0
            i += 1
            continue
        if not expect_term:
            if text[i] in "+-":
                expect_term, sign = True, 1.0
                continue
            raise DataError(f"wald_test: cannot read {constraint!r} near {text[i:]!r} (expected + or -)")
        factor, name = 1.0, None
        m = _NUMBER.match(text, i)
        if m and not any(text.startswith(nm, i) for nm in by_len):
            factor = float(m.group())
            i = m.end()
            while i < n and text[i].isspace():
                i += 1
            if i < n and text[i] == "*":
                i += 1
                while i < n and text[i].isspace():
                    i += 1
            else:
                const += sign * factor
                expect_term = False
                continue
        name = next((nm for nm in by_len if text.startswith(nm, i)), None)
        if name is None:
            raise DataError(f"wald_test: unknown coefficient in {constraint!r} near {text[i:]!r}; "
                            f"available: {list(names)}")
        i += len(name)
        j = i
        while j < n and text[j].isspace():
            j += 1
        if j < n and text[j] == "*":
            m2 = _NUMBER.match(text, j + 1 + (len(text[j + 1:]) - len(text[j + 1:].lstrip())))
            if not m2:
                raise DataError(f"wald_test: cannot read {constraint!r} after {name!r}")
            factor *= float(m2.group())
            i = m2.end()
        coefs[name] = coefs.get(name, 0.0) + sign * factor
        expect_term, sign = False, 1.0
    if expect_term and (coefs or const):
        raise DataError(f"wald_test: {constraint!r} ends with an operator")
    return coefs, const


def parse_constraints(constraints, names: Sequence[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    r"""Constraint strings -> :math:`(R, r)` over ``names``.

    Returns
    -------
    R : ``(q, len(names))``; r : ``(q,)``; labels : the constraints, normalised.
    """
    items = [constraints] if isinstance(constraints, str) else list(constraints)
    texts = [t for item in items for t in _split_top(item)]
    rows, rhs = [], []
    for text in texts:
        if text.count("=") != 1:
            raise DataError(f"wald_test: a constraint needs exactly one '=', got {text!r}")
        left, right = text.split("=")
        lc, lk = _parse_side(left, names, text)
        rc, rk = _parse_side(right, names, text)
        row = np.zeros(len(names))
        for nm, c in lc.items():
            row[list(names).index(nm)] += c
        for nm, c in rc.items():
            row[list(names).index(nm)] -= c
        if not np.any(row):
            raise DataError(f"wald_test: {text!r} involves no coefficient")
        rows.append(row)
        rhs.append(rk - lk)
    return np.array(rows), np.array(rhs), texts


def wald(res, terms=None, type: str = "beta", hypothesis=None):
    """Wald test on a result (``MixedResults`` or ``PooledResults``); see the module docstring."""
    from ..results import WaldTest

    if type == "beta":
        est, cov = res.coef, res.cov_mat
        default = [n for n in est.index if n != "(Intercept)"]
    elif type == "Lambda":
        est, cov = res.varcomp, res.var_theta
        default = [n for n in est.index if n != "Residual"]
    else:
        raise DataError(f"type must be 'beta' or 'Lambda', got {type!r}")
    if cov is None:
        raise DataError("wald_test: these results carry no covariance matrix for the variance components")
    aliased = [n for n in est.index if not np.isfinite(est[n])]
    kept = [n for n in est.index if n not in aliased]
    items = None if terms is None else ([terms] if isinstance(terms, str) else list(terms))
    if items is not None and any("=" in str(t) for t in items):
        if hypothesis is not None:
            raise DataError("wald_test: give the hypothesised values inside the constraints, not as hypothesis=")
        R, r, labels = parse_constraints(items, list(est.index))
        bad = sorted({aliased_name for aliased_name in aliased if np.any(R[:, list(est.index).index(aliased_name)])})
        if bad:
            raise DataError(f"wald_test: the constraint(s) involve aliased coefficient(s) {bad}, which the fit "
                            "dropped (collinear columns)")
        idx = [list(est.index).index(n) for n in kept]
        R = R[:, idx]
        g_all = est[kept].to_numpy(dtype=float)
        v_all = cov.loc[kept, kept].to_numpy(dtype=float)
        g, v = R @ g_all, R @ v_all @ R.T
        q = int(np.linalg.matrix_rank(R))
        if q < R.shape[0]:
            raise DataError(f"wald_test: the constraints {labels} are linearly dependent")
        diff = g - r
        stat = float(diff @ np.linalg.solve(v, diff))
        return WaldTest(statistic=stat, p_value=chi2_sf(stat, q), df=q, terms=labels, estimates=g,
                        hypothesis=np.asarray(r), type=type)
    terms_l = list(default if items is None else items)
    unknown = [t for t in terms_l if t not in est.index]
    if unknown:
        raise DataError(f"wald_test: unknown term(s) {unknown}; available: {list(est.index)}")
    dropped = [t for t in terms_l if t in aliased]
    if dropped:
        if items is not None:
            warnings.warn(f"wald_test: aliased coefficient(s) {dropped} (dropped from the fit) are left out of "
                          "the test", TorchmixWarning, stacklevel=3)
        keep_pos = [i for i, t in enumerate(terms_l) if t not in aliased]
        terms_l = [terms_l[i] for i in keep_pos]
        if hypothesis is not None and np.ndim(hypothesis) > 0:
            hypothesis = np.asarray(hypothesis, float)[keep_pos]
    if not terms_l:
        raise DataError("wald_test: no coefficient left to test")
    g = est[terms_l].to_numpy(dtype=float)
    r = np.zeros(len(terms_l)) if hypothesis is None else np.broadcast_to(np.asarray(hypothesis, float), g.shape)
    v = cov.loc[terms_l, terms_l].to_numpy(dtype=float)
    diff = g - r
    stat = float(diff @ np.linalg.solve(v, diff))
    return WaldTest(statistic=stat, p_value=chi2_sf(stat, len(terms_l)), df=len(terms_l), terms=terms_l,
                    estimates=g, hypothesis=np.asarray(r), type=type)
