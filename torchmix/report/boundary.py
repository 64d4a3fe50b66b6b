r"""Which boundary a random-effect covariance matrix sits on: a zero variance or a correlation at ±1.

Pure tensor math. For one term with Cholesky factor :math:`T` (lower triangular, rows = random
effects, from :math:`\theta`): a diagonal entry :math:`T_{kk}` below ``tol`` means the matrix is
singular (lme4's ``isSingular``). Two cases:

* the whole row :math:`k` of :math:`T` is below ``tol``: the variance of effect :math:`k` is zero;
* otherwise effect :math:`k` is a linear combination of the effects before it: with two effects
  their correlation is :math:`\pm1` (its sign is that of :math:`T_{k1}`); with more, the matrix is
  rank-deficient (a correlation at :math:`\pm1` or a linear dependence).

``theta`` is on the scale the fitter optimises: relative to :math:`\sigma` for the gaussian family
(as lme4's ``lmer``), absolute otherwise (as ``glmer``); lme4's default tolerance is ``1e-4``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..covariance import lambda_from_theta, n_theta

__all__ = ["BoundaryCase", "diagnose_boundary", "boundary_message", "boundary_warning_text", "SINGULAR_TOL"]

SINGULAR_TOL = 1e-4


@dataclass(frozen=True)
class BoundaryCase:
    """One singular direction: level index (0 = level 2), term index in the level, effect index
    in the term, ``kind`` (``"zero_variance"``, ``"correlation"`` or ``"rank_deficient"``) and,
    for ``"correlation"``, the other effect's index and the sign (+1 or -1)."""

    level: int
    term: int
    effect: int
    kind: str
    other: int = -1
    sign: int = 0


def diagnose_boundary(thetas: Sequence[torch.Tensor], term_sizes: Sequence[Sequence[int]],
                      tol: float = SINGULAR_TOL) -> list[BoundaryCase]:
    """Every diagonal Cholesky entry below ``tol``, classified (see the module docstring).

    Parameters
    ----------
    thetas : per level, ``(n_theta_l,)``; term_sizes : per level, the sizes of its terms.
    """
    cases = []
    for l, (theta, ts) in enumerate(zip(thetas, term_sizes)):
        pos = 0
        for t, q in enumerate(ts):
            k = n_theta([q])
            lam = lambda_from_theta(theta[pos:pos + k].detach().cpu().to(torch.float64), [q])
            for e in range(q):
                if abs(float(lam[e, e])) >= tol:
                    continue
                row = lam[e, :e]
                if row.numel() == 0 or bool((row.abs() < tol).all()):
                    cases.append(BoundaryCase(l, t, e, "zero_variance"))
                elif q == 2:
                    cases.append(BoundaryCase(l, t, e, "correlation", other=0, sign=1 if float(row[0]) > 0 else -1))
                else:
                    cases.append(BoundaryCase(l, t, e, "rank_deficient"))
            pos += k
    return cases


def boundary_message(cases: Sequence[BoundaryCase], names=None, level_names=None) -> str:
    """A clause per case, naming the effects (``group:effect``) when ``names[level][term]`` (effect
    names) and ``level_names`` are given, else by position (level, term, effect number)."""
    parts = []
    for c in cases:
        if names and level_names:
            eff = lambda i, c=c: f"{level_names[c.level]}:{names[c.level][c.term][i]}"  # noqa: E731
            where = ""
        else:
            eff = lambda i: f"random effect {i + 1}"  # noqa: E731
            where = f" (level {c.level + 2}, term {c.term + 1})"
        if c.kind == "zero_variance":
            parts.append(f"the variance of {eff(c.effect)}{where} is estimated at zero")
        elif c.kind == "correlation":
            parts.append(f"the correlation of {eff(c.other)} and {eff(c.effect)}{where} is estimated at "
                         f"{'+1' if c.sign > 0 else '-1'} (both variances are positive)")
        else:
            parts.append(f"the covariance matrix of {eff(0)} ...{where} is singular: {eff(c.effect)} is a linear "
                         "combination of the effects before it (a correlation at +-1 or a linear dependence)")
    return "; ".join(parts)


def boundary_warning_text(thetas, term_sizes, tol: float) -> str:
    """The fitters' boundary warning: what happened (zero variance or correlation at +-1) and what
    it means for the standard errors."""
    cases = diagnose_boundary(thetas, term_sizes, tol)
    what = boundary_message(cases) if cases else "a random-effect covariance matrix is singular"
    text = f"the fit is on the boundary of the parameter space: {what}"
    if any(c.kind == "zero_variance" for c in cases):
        text += "; a variance estimated at zero has no standard error (reported as NaN)"
    if any(c.kind != "zero_variance" for c in cases):
        text += "; the covariance matrix is singular (see .varcorr and .singular)"
    return text
