r"""Information criteria and likelihood-ratio tests for ordinary (unweighted) ML fits.

With every weight equal to one the fit is ordinary maximum likelihood and, like lme4,

.. math::
    \mathrm{deviance}=-2\ell,\quad \mathrm{AIC}=-2\ell+2k,\quad \mathrm{BIC}=-2\ell+k\log N,\qquad
    \mathrm{LR}=2(\ell_1-\ell_0)\sim\chi^2_{k_1-k_0}

with :math:`k` the number of fixed effects (aliased columns excluded) plus variance components
(including the residual variance; a component at zero still counts, as in lme4) and :math:`N` the
number of observations. A variance tested at zero lies on the boundary, so the :math:`\chi^2`
p-value is conservative (as lme4's ``anova``).

With sampling weights the pseudo-likelihood is not a likelihood: its ratio is not
:math:`\chi^2`-distributed and AIC/BIC have no justification, so these raise
:class:`~torchmix.errors.WeightError` and point to ``wald_test``, which uses the sandwich.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..errors import DataError, WeightError
from .distributions import chi2_sf

__all__ = ["unit_weights", "n_params", "require_likelihood", "LRTest", "lrt"]


def unit_weights(res) -> bool:
    """Whether every weight of the fit (level 1 and every level above) equals one."""
    fit = res.fits[0] if hasattr(res, "fits") else res
    t = fit.design.tensors
    ws = [t.w1_uncond, t.w1_cond] + [lv.w_cond for lv in t.levels]
    return all(bool((w == 1).all()) for w in ws)


def n_params(res) -> int:
    """Fixed effects (non-aliased) plus variance components (residual included)."""
    return int(np.isfinite(res.coef.to_numpy(dtype=float)).sum()) + int(len(res.varcomp))


def require_likelihood(res, what: str) -> float:
    """The log-likelihood, or a clear error when ``what`` is not defined for this fit."""
    if res.lnl is None:
        raise DataError(f"{what} is not available for results pooled over plausible values (no single "
                        "log-likelihood); use wald_test")
    if not unit_weights(res):
        raise WeightError(
            f"{what} is not available: the fit uses sampling weights, so its log-likelihood is a "
            "pseudo-likelihood; likelihood ratios of pseudo-likelihoods are not chi-square distributed and "
            "AIC/BIC/deviance have no justification. Compare nested models with res.wald_test(...), "
            "which uses the cluster-robust covariance")
    return float(res.lnl)


@dataclass
class LRTest:
    """Likelihood-ratio test of a smaller model (``fit0``) against a larger one (``fit1``).

    Attributes
    ----------
    statistic : :math:`2(\\ell_1-\\ell_0)`; df : :math:`k_1-k_0`; p_value : upper :math:`\\chi^2` tail.
    table : DataFrame like lme4's ``anova``: npar, AIC, BIC, logLik, deviance, Chisq, Df, Pr(>Chisq).
    """

    statistic: float
    df: int
    p_value: float
    table: pd.DataFrame

    def __str__(self) -> str:
        text = self.table.to_string(na_rep="", formatters={"Df": lambda v: "" if pd.isna(v) else f"{v:.0f}"})
        return ("Likelihood-ratio test (unit weights, ML):\n" + text
                + "\n(a variance tested at zero is on the boundary: the p-value is conservative)")

    __repr__ = __str__


def _same_data(a, b) -> bool:
    da, db = a.design, b.design
    if da.tensors.n_obs != db.tensors.n_obs or not da.row_index.equals(db.row_index):
        return False
    return bool((da.tensors.y.cpu() == db.tensors.y.cpu()).all())


def lrt(fit0, fit1) -> LRTest:
    r"""Likelihood-ratio test of nested ML fits with unit weights (lme4 ``anova(fit0, fit1)``).

    The fits are ordered by their number of parameters. Both must use the same rows and response
    and the same family; nesting of the fixed effects (names) and of the grouping factors is checked,
    nesting of the random-effect terms is the user's responsibility.
    """
    for f in (fit0, fit1):
        if hasattr(f, "fits"):
            raise DataError("a likelihood-ratio test needs single fits, not results pooled over plausible values")
        require_likelihood(f, "a likelihood-ratio test")
    if n_params(fit0) > n_params(fit1):
        fit0, fit1 = fit1, fit0
    k0, k1 = n_params(fit0), n_params(fit1)
    if k0 == k1:
        raise DataError(f"the two models have the same number of parameters ({k0}); they are not nested")
    if getattr(fit0.family, "name", None) != getattr(fit1.family, "name", None):
        raise DataError("the two fits use different families; a likelihood-ratio test needs nested models")
    if not _same_data(fit0, fit1):
        raise DataError("the two fits do not use the same rows and response; refit them on the same data "
                        "(rows dropped for missing values must agree)")
    fixed0 = set(fit0.coef.dropna().index)
    fixed1 = set(fit1.coef.dropna().index)
    if not fixed0 <= fixed1:
        raise DataError(f"the fixed effects of the smaller model are not a subset of the larger's "
                        f"(missing: {sorted(fixed0 - fixed1)})")
    if not set(fit0.ngroups) <= set(fit1.ngroups):
        raise DataError("the grouping factors of the smaller model are not a subset of the larger's")
    rows = []
    for f, k in ((fit0, k0), (fit1, k1)):
        ll = float(f.lnl)
        rows.append({"npar": k, "AIC": -2 * ll + 2 * k, "BIC": -2 * ll + k * math.log(f.nobs), "logLik": ll,
                     "deviance": -2 * ll})
    stat = max(2.0 * (float(fit1.lnl) - float(fit0.lnl)), 0.0)
    p = chi2_sf(stat, k1 - k0)
    table = pd.DataFrame(rows, index=["fit0", "fit1"])
    table["Chisq"] = [np.nan, stat]
    table["Df"] = [np.nan, float(k1 - k0)]
    table["Pr(>Chisq)"] = [np.nan, p]
    return LRTest(statistic=stat, df=k1 - k0, p_value=p, table=table)
