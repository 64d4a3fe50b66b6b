r"""The interface single fits and pooled fits share.

:class:`ResultsBase` is the base class of :class:`~torchmix.results.MixedResults` (one fit) and
:class:`~torchmix.plausible.PooledResults` (K plausible values pooled with Rubin's rules). Every
name in :data:`SHARED_ATTRIBUTES` exists on both, with the same meaning; a quantity that is not
defined for one of them is ``None`` there (for example ``lnl`` of a pooled fit with K > 1, whose
values would be log-likelihoods of different outcomes). Names only a pooled fit has (the Rubin
split and the K single fits) are listed in :data:`POOLED_ONLY`.

:class:`PooledCommon` gives a pooled fit the members that a single fit computes from its own
estimates: fitted values and residuals are the mean over the K fits (the Rubin point estimate of
those quantities, as ``ranef`` and ``predict``); the model-based covariance is Rubin's total
:math:`T = \bar U + (1 + K^{-1})B` with the model-based :math:`U_m`.
"""

from __future__ import annotations

import math
from functools import cached_property
from typing import Optional

import numpy as np
import pandas as pd

from .. import pooling

__all__ = ["SHARED_ATTRIBUTES", "POOLED_ONLY", "ResultsBase", "PooledCommon", "correlations_of"]

SHARED_ATTRIBUTES = (
    # what was fitted
    "call", "formula", "family", "options", "design", "n_quad", "is_gaussian", "notes",
    "nobs", "ngroups", "levels", "wgt_stats",
    # optimiser status
    "converged", "iterations", "message",
    # estimates
    "coef", "se", "cov_mat", "vcov_model", "varcomp", "varcomp_se", "var_theta", "var_df", "theta",
    "sigma", "correlations", "lnl", "icc", "icc_level", "ranef", "u",
    # methods
    "fitted", "residuals", "predict", "wald_test", "to_frame", "summary",
    # random-effect uncertainty and R-squared (torchmix.ranef_results, torchmix.r2_results)
    "ranef_se", "ranef_cov", "ranef_mean", "ranef_posterior", "ranef_frame", "plot_ranef", "r2", "r2_decomposition",
)

POOLED_ONLY = ("fits", "n_pv", "pv_columns", "response", "var_imputation", "var_sampling", "fmi", "df",
               "df_complete")


def correlations_of(var_df: pd.DataFrame) -> pd.Series:
    r"""Correlation :math:`\tau_{ab}/\sqrt{\tau_{aa}\tau_{bb}}` of each covariance row of ``var_df``.

    Parameters
    ----------
    var_df : the variance-component table (group, var1, var2, estimate; ``var2 == ""`` on the
        variance rows).

    Returns
    -------
    Series indexed by the covariance names (empty without covariances); NaN where a variance
    is zero.
    """
    est = pd.Series(var_df["estimate"].to_numpy(dtype=float),
                    index=list(zip(var_df["group"], var_df["var1"], var_df["var2"])))
    rows = var_df[var_df["var2"] != ""]
    out = []
    for _, r in rows.iterrows():
        va = est[(r["group"], r["var1"], "")]
        vb = est[(r["group"], r["var2"], "")]
        c = est[(r["group"], r["var1"], r["var2"])]
        out.append(c / math.sqrt(va * vb) if va > 0 and vb > 0 else np.nan)
    return pd.Series(out, index=rows["name"].to_numpy(), name="correlation", dtype=float)


class ResultsBase:
    """Members shared by single and pooled results (see :data:`SHARED_ATTRIBUTES`)."""

    @cached_property
    def correlations(self) -> pd.Series:
        """Correlation of each random-effect covariance (one entry per covariance term)."""
        return correlations_of(self.var_df)

    def _repr_html_(self) -> str:
        from .html import results_html

        return results_html(self)


class PooledCommon(ResultsBase):
    """Members of a pooled fit computed from its K fits (``self.fits``)."""

    @property
    def design(self):
        """The design shared by the K fits (rows, weights, model matrices)."""
        return self.fits[0].design

    @property
    def options(self) -> dict:
        return dict(self.fits[0].options)

    @property
    def n_quad(self) -> Optional[int]:
        return self.fits[0].n_quad

    @property
    def is_gaussian(self) -> bool:
        return bool(self.fits[0].is_gaussian)

    @property
    def iterations(self) -> int:
        """Optimiser iterations of the K fits together."""
        return int(sum(f.iterations for f in self.fits))

    @property
    def message(self) -> str:
        """``"converged"``, or the message of each value whose fit did not converge."""
        bad = [f"{c}: {f.message}" for c, f in zip(self.pv_columns, self.fits) if not f.converged]
        return "; ".join(bad) if bad else "converged"

    @property
    def sigma(self) -> Optional[float]:
        """Square root of the pooled residual variance (gaussian family), else None."""
        if not self.is_gaussian:
            return None
        return float(math.sqrt(max(float(self.varcomp["Residual"]), 0.0)))

    @property
    def theta(self) -> None:
        """None: relative Cholesky factors are not pooled (their mean matches no pooled variance)."""
        return None

    @property
    def u(self) -> None:
        """None: spherical modes are not pooled (``ranef`` holds the pooled random effects)."""
        return None

    @cached_property
    def vcov_model(self) -> Optional[pd.DataFrame]:
        """Rubin's total covariance of ``coef`` with the model-based covariances of the K fits."""
        covs = [f.vcov_model for f in self.fits]
        if any(c is None for c in covs):
            return None
        names = self.coef.index
        est = np.stack([f.coef.reindex(names).to_numpy(dtype=float) for f in self.fits])
        u = np.stack([c.reindex(index=names, columns=names).to_numpy(dtype=float) for c in covs])
        return pd.DataFrame(pooling.rubin_matrix(est, u).total, index=names, columns=names)

    def fitted(self, type: str = "link", include_random=True) -> pd.Series:
        """Mean over the K fits of their fitted values (arguments as ``MixedResults.fitted``)."""
        vals = [f.fitted(type, include_random=include_random) for f in self.fits]
        return (sum(vals[1:], vals[0]) / len(vals)).rename("fitted")

    def residuals(self) -> pd.Series:
        """Mean over the K fits of their response residuals."""
        vals = [f.residuals() for f in self.fits]
        return (sum(vals[1:], vals[0]) / len(vals)).rename("resid")
