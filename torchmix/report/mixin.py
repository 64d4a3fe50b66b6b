r"""Inference attributes shared by :class:`~torchmix.results.MixedResults` and
:class:`~torchmix.plausible.PooledResults` (t statistics, p-values, intervals, VarCorr, boundary,
information criteria, model comparison, constraint Wald tests).

Reference distribution: Student t with ``df`` degrees of freedom, chosen by ``mix(df=...)``:

* ``"cluster"`` (default): top-level clusters minus one, :math:`G_L-1` (the rank of the meat of the
  sandwich, the same rule as its :math:`G/(G-1)` factor), or the design degrees of freedom of
  linearization/replicate standard errors; for plausible values, Barnard & Rubin's (1999) degrees
  of freedom with that complete-data :math:`\nu_c` (per estimate);
* ``"normal"``: z (infinite degrees of freedom), for single and pooled results;
* a positive number: that number (single fits) or the complete-data :math:`\nu_c` (pooled).

``conf_int(..., df=...)`` overrides the rule for one call.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from . import comparison
from .boundary import SINGULAR_TOL, boundary_message, diagnose_boundary
from .intervals import p_values, t_statistics, wald_intervals
from .se_type import check_df_rule, complete_data_df
from .varcorr import varcomp_interval_frame, varcorr_frame

__all__ = ["InferenceMixin", "add_inference_columns"]


class InferenceMixin:
    """Mixed into the result classes; needs ``coef``, ``se``, ``varcomp``, ``var_df``, ``var_theta``,
    ``ngroups``, ``nobs``, ``lnl`` and either ``options`` (single fit) or ``fits`` (pooled)."""

    # ------------------------------------------------------------------ settings
    @property
    def _first_fit(self):
        return self.fits[0] if hasattr(self, "fits") else self

    @property
    def df_rule(self):
        """The degrees-of-freedom rule of the fit: ``"cluster"``, ``"normal"`` or a number."""
        return getattr(self._first_fit, "options", {}).get("df", "cluster")

    @property
    def se_type(self) -> str:
        """``"sandwich"`` (cluster-robust, default), ``"model"`` (inverse information), or the
        design-based ``"linearization"`` / ``"replicate"``."""
        design = getattr(self, "variance", None)
        if design:
            return design["method"]
        return getattr(self._first_fit, "options", {}).get("se_type", "sandwich")

    @property
    def n_clusters(self) -> int:
        """Number of top-level groups (the clusters of the sandwich)."""
        return int(list(self.ngroups.values())[-1]) if self.ngroups else int(self.nobs)

    def _reference_df(self, df=None) -> pd.Series:
        """Degrees of freedom per fixed effect and variance component under ``df`` (default: the fit's rule)."""
        rule = self.df_rule if df is None else check_df_rule(df)
        index = list(self.coef.index) + list(self.varcomp.index)
        if hasattr(self, "fits"):
            if rule == "normal":
                return pd.Series(math.inf, index=index, name="df")
            if df is None:
                return self.df.reindex(index).rename("df")
            from .. import pooling

            k = self.n_pv
            between = self.var_imputation.to_numpy() / (1.0 + 1.0 / k)
            nu_c = self.df_complete if rule == "cluster" else complete_data_df(rule, self.n_clusters)
            vals = pooling.barnard_rubin_df(self.var_sampling.to_numpy(), between, k, nu_c)
            return pd.Series(vals, index=self.var_imputation.index, name="df").reindex(index)
        design = getattr(self, "variance", None)
        if rule == "cluster" and design and design.get("df") is not None:  # design degrees of freedom
            return pd.Series(float(design["df"]), index=index, name="df")
        return pd.Series(complete_data_df(rule, self.n_clusters), index=index, name="df")

    @property
    def df(self) -> pd.Series:
        """Reference degrees of freedom per fixed effect and variance component (``inf`` = normal).
        (Pooled results define their own: Barnard-Rubin.)"""
        return self._reference_df()

    # ------------------------------------------------------------------ fixed effects
    @property
    def tvalues(self) -> pd.Series:
        r""":math:`\hat\beta/\mathrm{SE}` per fixed effect (NaN for aliased columns)."""
        return pd.Series(t_statistics(self.coef.to_numpy(float), self.se.to_numpy(float)), index=self.coef.index,
                         name="t")

    @property
    def pvalues(self) -> pd.Series:
        r"""Two-sided p-values :math:`P(|T_\nu|>|t|)` of the fixed effects (``df`` rule of the fit)."""
        df = self._reference_df().reindex(self.coef.index).to_numpy(float)
        return pd.Series(p_values(self.tvalues.to_numpy(float), df), index=self.coef.index, name="p_value")

    def conf_int(self, alpha: float = 0.05, df=None) -> pd.DataFrame:
        r"""Confidence intervals :math:`\hat\beta\pm t_{\nu,1-\alpha/2}\,\mathrm{SE}` of the fixed effects.

        Parameters
        ----------
        alpha : 1 minus the confidence level.
        df : ``None`` (the fit's rule), ``"cluster"``, ``"normal"`` or a positive number.

        Returns
        -------
        DataFrame indexed by coefficient with columns ``lower``, ``upper``.
        """
        d = self._reference_df(df).reindex(self.coef.index).to_numpy(float)
        lo, hi = wald_intervals(self.coef.to_numpy(float), self.se.to_numpy(float), d, alpha)
        return pd.DataFrame({"lower": lo, "upper": hi}, index=self.coef.index)

    # ------------------------------------------------------------------ variance components
    @property
    def varcorr(self) -> pd.DataFrame:
        """lme4 ``VarCorr``: per component group, level, var1, var2, variance, sd_cor (SD or correlation)."""
        return varcorr_frame(self.var_df, getattr(self, "correlations", None) if hasattr(self, "fits") else None)

    def conf_int_varcomp(self, alpha: float = 0.05, df=None) -> pd.DataFrame:
        """Intervals of the variance components: variances on the log-SD scale, covariances through
        the Fisher z of their correlation (see :mod:`~torchmix.report.intervals`); NaN on the boundary."""
        d = self._reference_df(df).reindex(self.varcomp.index)
        return varcomp_interval_frame(self.var_df, self.var_theta, d, alpha)

    @property
    def boundary_cases(self) -> list:
        """Singular directions of the random-effect covariances (lme4 ``isSingular`` tolerance 1e-4)."""
        if hasattr(self, "fits"):
            return [c for f in self.fits for c in f.boundary_cases]
        terms = [tuple(lv.term_sizes) for lv in self.design.tensors.levels]
        return diagnose_boundary(self._out.theta, terms, SINGULAR_TOL)

    @property
    def singular(self) -> bool:
        """lme4's ``isSingular``: a variance at zero or a correlation at +-1 (any plausible value)."""
        return bool(self.boundary_cases)

    @property
    def singular_reason(self) -> str:
        """What makes the fit singular, in words ("" when it is not)."""
        if hasattr(self, "fits"):
            return "; ".join(dict.fromkeys(f.singular_reason for f in self.fits if f.singular))
        names = [info.term_names for info in self.design.levels]
        levels = [info.name for info in self.design.levels]
        return boundary_message(self.boundary_cases, names, levels)

    # ------------------------------------------------------------------ likelihood-based comparison
    @property
    def n_params(self) -> int:
        """Number of estimated parameters: fixed effects plus variance components."""
        return comparison.n_params(self)

    @property
    def deviance(self) -> float:
        r""":math:`-2\ell` (unit weights only; lme4's ``deviance`` of an ML ``lmer`` fit)."""
        return -2.0 * comparison.require_likelihood(self, "deviance")

    @property
    def aic(self) -> float:
        r""":math:`-2\ell+2k` (unit weights only)."""
        return -2.0 * comparison.require_likelihood(self, "AIC") + 2.0 * self.n_params

    @property
    def bic(self) -> float:
        r""":math:`-2\ell+k\log N` (unit weights only)."""
        return -2.0 * comparison.require_likelihood(self, "BIC") + self.n_params * math.log(self.nobs)

    def compare(self, other) -> comparison.LRTest:
        """Likelihood-ratio test against a nested fit (unit weights only); see :func:`torchmix.lrt`."""
        return comparison.lrt(other, self)

    def wald_test(self, terms=None, type: str = "beta", hypothesis=None):
        r"""Wald :math:`\chi^2` test :math:`W=(R\hat\gamma-r)^\top(RVR^\top)^{-1}(R\hat\gamma-r)`.

        Parameters
        ----------
        terms : names of coefficients to test against ``hypothesis`` (default: all but the
            intercept, or all but the residual for ``type="Lambda"``), or linear constraints as
            strings (``"meanses = cses"``, ``"x1 + x2 = 0, x3 = 1"``, or a list of them).
        type : ``"beta"`` (fixed effects, ``cov_mat``) or ``"Lambda"`` (variance components,
            ``var_theta``; a zero-variance null is on the boundary, so the p-value is conservative).
        hypothesis : hypothesised values for ``terms`` given as names (default 0).

        Aliased coefficients are left out (with a warning when named).
        """
        from .wald import wald

        return wald(self, terms=terms, type=type, hypothesis=hypothesis)


def add_inference_columns(res, frame: pd.DataFrame, alpha: float = 0.05) -> pd.DataFrame:
    """``to_frame()`` columns ``df``, ``p_value``, ``conf_low``, ``conf_high`` (fixed effects: t
    interval; variance components: the intervals of ``conf_int_varcomp``; p-values only for fixed
    effects). Rows are the fixed effects then the variance components, in that order."""
    out = frame.copy()
    n_fixed = len(res.coef)
    df = res._reference_df()
    out["df"] = df.to_numpy(float)[:len(out)]
    ci = res.conf_int(alpha)
    vci = res.conf_int_varcomp(alpha)
    out["p_value"] = np.concatenate([res.pvalues.to_numpy(float), np.full(len(out) - n_fixed, np.nan)])
    out["conf_low"] = np.concatenate([ci["lower"].to_numpy(float), vci["lower"].to_numpy(float)])
    out["conf_high"] = np.concatenate([ci["upper"].to_numpy(float), vci["upper"].to_numpy(float)])
    return out
