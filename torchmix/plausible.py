r"""Plausible values: fit once per value on one shared design, pool with Rubin's rules.

MATH.md section 8 (seed eqs. 6-8, EdSurvey ``mixed.sdf``). :func:`fit_plausible_values` runs
the K fits -- the design, weights and everything that does not depend on the outcome are
built once by the caller; each value is warm-started from the previous solution -- and
:class:`PooledResults` labels the pooled numbers computed by :mod:`torchmix.pooling`.

Pooled quantities, per coefficient and per variance component :math:`\gamma`:

* estimate :math:`\bar\gamma` (mean over values);
* ``var_imputation`` :math:`\frac{K+1}{K(K-1)}\sum_m(\hat\gamma_m-\bar\gamma)^2`,
  ``var_sampling`` :math:`\frac1K\sum_m\mathrm{SE}_m^2` (sandwich), standard error
  :math:`\sqrt{V_{\text{samp}}+V_{\text{imp}}}`;
* ``cov_mat`` (and ``var_theta``): Rubin's :math:`T=\bar U+(1+K^{-1})B`;
* ``fmi`` and ``df``: fraction of missing information and Barnard-Rubin degrees of freedom,
  with complete-data degrees of freedom :math:`G_L-1` (number of top-level groups minus one,
  the rank of the cluster-robust meat matrix);
* correlations of random effects through Fisher's z; ICC = mean of the per-value ICCs;
* ``lnl`` is None when :math:`K>1` (a sum of log-likelihoods of different outcomes has no
  meaning); with :math:`K=1` everything equals the single fit.

Random effects and predictions are the mean over the K fits (the Rubin point estimate of
those quantities).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from functools import cached_property
from typing import Callable, Mapping, Optional, Sequence

import numpy as np
import pandas as pd

from . import pooling
from .errors import DataError
from .progress import progress_bar
from .r2_results import R2Mixin
from .ranef_results import PooledRanefMixin, ranef_tables
from .report.interface import PooledCommon, correlations_of
from .report.mixin import InferenceMixin, add_inference_columns
from .report.se_type import complete_data_df
from .report.summary_ext import extended_summary, se_line

__all__ = ["PooledResults", "fit_plausible_values", "warm_start"]


def warm_start(res) -> Optional[np.ndarray]:
    """Starting vector ``(beta, variance components)`` in reporting order from a fit.

    Returns None (cold start) when a variance estimate is zero or not finite: a variance
    started exactly on the boundary can stay there (its gradient vanishes by symmetry).
    """
    design = getattr(res, "design", None)
    names = list(design.fixed_names) if design is not None else [n for n in res.coef.index
                                                                  if np.isfinite(res.coef[n])]
    beta = res.coef[names].to_numpy(dtype=float)
    vd = getattr(res, "var_df", None)
    tau = res.varcomp.to_numpy(dtype=float)
    if not (np.isfinite(beta).all() and np.isfinite(tau).all()):
        return None
    if vd is not None:
        variances = vd.loc[vd["var2"] == "", "estimate"].to_numpy(dtype=float)
    else:
        variances = tau
    if (variances <= 0).any():
        return None
    return np.concatenate([beta, tau])


def _quiet(prepared):
    """The prepared model with the inner (per-fit) progress bar turned off, where possible."""
    opts = getattr(prepared, "options", None)
    if isinstance(opts, dict) and opts.get("progress") and dataclasses.is_dataclass(prepared):
        try:
            return dataclasses.replace(prepared, options={**opts, "progress": False})
        except (TypeError, ValueError):
            return prepared
    return prepared


def fit_plausible_values(prepared, responses: Mapping, fit_one: Callable, progress: bool = True, *,
                         warm: bool = True, fit_many: Optional[Callable] = None) -> "PooledResults":
    """Fit the prepared model once per plausible value and pool the fits.

    Parameters
    ----------
    prepared : the caller's prepared model (design built once, shared by every value).
    responses : mapping column name -> response tensor ``(N,)`` aligned with the design's rows.
    fit_one : callable ``fit_one(prepared, y, start=None) -> MixedResults``.
    progress : a tqdm bar over the values (the per-fit bars are turned off).
    warm : start value ``m+1`` from the solution of value ``m`` (:func:`warm_start`).
    fit_many : optional callable ``fit_many(prepared, [y, ...], advance=None) -> [MixedResults, ...]``
        that fits all values at once (batched over values); it must show the first value's
        warnings only, and calls ``advance(n)`` as values are done (the bar moves by ``n``).

    Returns
    -------
    :class:`PooledResults`. Warnings raised while fitting values 2..K are suppressed (those
    of the first value are shown), as in EdSurvey.
    """
    items = list(responses.items())
    if not items:
        raise DataError("plausible_values: at least one column is needed")
    inner = _quiet(prepared)
    if fit_many is not None and len(items) > 1:
        with progress_bar(total=len(items), desc="plausible values (batched)", unit="value",
                          disable=not progress) as bar:
            fits = fit_many(inner, [y for _, y in items], advance=bar.update)
            bar.update(len(items) - bar.n)
        return PooledResults(fits, [c for c, _ in items], response=getattr(prepared, "response_name", None),
                             call=getattr(prepared, "call", None))
    fits, start = [], None
    bar = progress_bar(items, desc="plausible values", unit="value", disable=not progress)
    for m, (col, y) in enumerate(bar):
        bar.set_postfix_str(str(col))
        if m == 0:
            res = fit_one(inner, y, start=None)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                res = fit_one(inner, y, start=start if warm else None)
        fits.append(res)
        start = warm_start(res) if warm else None
    bar.close()
    response = getattr(prepared, "response_name", None)
    call = getattr(prepared, "call", None)
    return PooledResults(fits, [c for c, _ in items], response=response, call=call)


def _r_format(x: float, digits: int = 3, nsmall: int = 3) -> str:
    """R's ``format(x, digits=3, nsmall=3)`` for one number (EdSurvey's ICC line)."""
    if x is None or not math.isfinite(x):
        return "NA"
    if x == 0:
        return f"{0:.{nsmall}f}"
    decimals = max(digits - 1 - math.floor(math.log10(abs(x))), 0)
    return f"{x:.{max(decimals, nsmall)}f}"


def _table(df: pd.DataFrame, digits: int = 5) -> str:
    def fmt(v):
        if isinstance(v, str):
            return v
        if v is None or (isinstance(v, float) and not math.isfinite(v)):
            return "NA"
        return f"{v:.{digits}f}" if abs(v) < 1e6 else f"{v:.{digits}g}"
    return df.map(fmt).to_string()


class PooledResults(InferenceMixin, PooledCommon, R2Mixin, PooledRanefMixin):
    """Results pooled over K plausible values (EdSurvey ``mixed.sdf`` with Rubin's rules).

    Attributes
    ----------
    fits : list of the K single-value fits (``MixedResults``).
    pv_columns : the plausible-value columns, in fitting order; ``n_pv`` = K.
    coef, se : Series of pooled fixed effects and total standard errors.
    cov_mat : DataFrame, Rubin's total covariance :math:`T` of ``coef``.
    varcomp, varcomp_se, var_theta : the same for the variance components.
    var_imputation, var_sampling : Series over fixed effects then variance components
        (EdSurvey ``Vimp`` and ``Vjrr``).
    fmi, df : Series (same index), fraction of missing information and Barnard-Rubin
        degrees of freedom; ``df_complete`` is the number of top-level groups minus one.
    correlations : Series of pooled random-effect correlations (Fisher z), one per covariance.
    lnl : None when K > 1 (the single fit's value when K = 1).
    icc, icc_level : mean of the per-value ICCs.
    nobs, ngroups, converged : from the shared design; converged = every fit converged.
    """

    def __init__(self, fits: Sequence, pv_columns: Sequence[str], response: Optional[str] = None,
                 call: Optional[str] = None):
        if not fits:
            raise DataError("PooledResults needs at least one fit")
        self.fits = list(fits)
        self.pv_columns = list(pv_columns)
        first = self.fits[0]
        self.n_pv = len(self.fits)
        self.response = response
        self.call = call if call is not None else getattr(first, "call", "")
        self.formula = getattr(first, "formula", "")
        self.nobs = first.nobs
        self.ngroups = dict(first.ngroups)
        self.levels = getattr(first, "levels", len(self.ngroups) + 1)
        self.family = getattr(first, "family", None)
        self.notes = list(getattr(first, "notes", []))
        self.variance = getattr(first, "variance", None)
        self.converged = all(bool(f.converged) for f in self.fits)
        self.lnl = float(first.lnl) if self.n_pv == 1 else None
        self.df_complete = complete_data_df(self.df_rule, self.n_clusters)

    # ------------------------------------------------------------------ pooling
    @cached_property
    def _fixed(self):
        names = self.fits[0].coef.index
        est = np.stack([f.coef.reindex(names).to_numpy(dtype=float) for f in self.fits])
        cov = np.stack([f.cov_mat.reindex(index=names, columns=names).to_numpy(dtype=float) for f in self.fits])
        se = np.sqrt(np.stack([np.diag(c) for c in cov]))
        return names, pooling.rubin_scalar(est, se), pooling.rubin_matrix(est, cov)

    @cached_property
    def _random(self):
        names = self.fits[0].varcomp.index
        est = np.stack([f.varcomp.reindex(names).to_numpy(dtype=float) for f in self.fits])
        se = np.stack([f.varcomp_se.reindex(names).to_numpy(dtype=float) for f in self.fits])
        vt = getattr(self.fits[0], "var_theta", None)
        mat = None
        if vt is not None:
            cov = np.stack([f.var_theta.reindex(index=names, columns=names).to_numpy(dtype=float)
                            for f in self.fits])
            mat = pooling.rubin_matrix(est, cov)
        return names, pooling.rubin_scalar(est, se), mat

    @cached_property
    def coef(self) -> pd.Series:
        names, sc, _ = self._fixed
        return pd.Series(sc.estimate, index=names, name="coef")

    @cached_property
    def se(self) -> pd.Series:
        names, sc, _ = self._fixed
        return pd.Series(sc.se, index=names, name="se")

    @cached_property
    def cov_mat(self) -> pd.DataFrame:
        names, _, mat = self._fixed
        return pd.DataFrame(mat.total, index=names, columns=names)

    @cached_property
    def varcomp(self) -> pd.Series:
        names, sc, _ = self._random
        return pd.Series(sc.estimate, index=names, name="varcomp")

    @cached_property
    def varcomp_se(self) -> pd.Series:
        names, sc, _ = self._random
        return pd.Series(sc.se, index=names, name="varcomp_se")

    @cached_property
    def var_theta(self) -> Optional[pd.DataFrame]:
        names, _, mat = self._random
        return None if mat is None else pd.DataFrame(mat.total, index=names, columns=names)

    @cached_property
    def var_df(self) -> pd.DataFrame:
        """Variance-component labels (level, group, var1, var2) with pooled estimate and SE."""
        vd = self.fits[0].var_df.copy()
        vd["estimate"] = self.varcomp.to_numpy()
        vd["se"] = self.varcomp_se.to_numpy()
        return vd

    def _both(self, attr: str) -> pd.Series:
        fn, fs, _ = self._fixed
        rn, rs, _ = self._random
        return pd.Series(np.concatenate([getattr(fs, attr), getattr(rs, attr)]), index=list(fn) + list(rn))

    @cached_property
    def var_imputation(self) -> pd.Series:
        return self._both("var_imputation").rename("var_imputation")

    @cached_property
    def var_sampling(self) -> pd.Series:
        return self._both("var_sampling").rename("var_sampling")

    @cached_property
    def df(self) -> pd.Series:
        k = self.n_pv
        between = self.var_imputation.to_numpy() / (1.0 + 1.0 / k)
        out = pooling.barnard_rubin_df(self.var_sampling.to_numpy(), between, k, self.df_complete)
        return pd.Series(out, index=self.var_imputation.index, name="df")

    @cached_property
    def fmi(self) -> pd.Series:
        k = self.n_pv
        between = self.var_imputation.to_numpy() / (1.0 + 1.0 / k)
        out = pooling.fraction_missing_information(self.var_sampling.to_numpy(), between, k, self.df.to_numpy())
        return pd.Series(out, index=self.var_imputation.index, name="fmi")

    @cached_property
    def correlations(self) -> pd.Series:
        """Pooled correlation of each covariance entry (Fisher z over the K fits)."""
        vd = self.fits[0].var_df
        rows = vd[vd["var2"] != ""]
        if rows.empty:
            return pd.Series(dtype=float, name="correlation")
        per_fit = [correlations_of(f.var_df).to_numpy() for f in self.fits]
        return pd.Series(pooling.pool_correlations(np.array(per_fit)), index=rows["name"].to_numpy(),
                         name="correlation")

    @cached_property
    def icc(self) -> Optional[float]:
        vals = [f.icc for f in self.fits]
        if any(v is None for v in vals):
            return None
        return float(pooling.pool_icc(np.array(vals, dtype=float)))

    @cached_property
    def icc_level(self) -> Optional[dict]:
        vals = [getattr(f, "icc_level", None) for f in self.fits]
        if any(v is None for v in vals):
            return None
        return {k: float(pooling.pool_icc(np.array([v[k] for v in vals]))) for k in vals[0]}

    @cached_property
    def ranef(self) -> dict:
        """Random-effect predictions averaged over the K fits (same groups in every fit)."""
        out = {}
        for name in self.fits[0].ranef:
            frames = [f.ranef[name] for f in self.fits]
            out[name] = sum(frames[1:], frames[0]) / len(frames)
        return ranef_tables(out, self.ranef_se)

    @cached_property
    def wgt_stats(self):
        return getattr(self.fits[0], "wgt_stats", None)

    def predict(self, newdata: Optional[pd.DataFrame] = None, type: str = "link",
                allow_new_levels: bool = False, include_random=True) -> pd.Series:
        """Mean over the K fits of their predictions (arguments as ``MixedResults.predict``)."""
        preds = [f.predict(newdata, type=type, allow_new_levels=allow_new_levels, include_random=include_random)
                 for f in self.fits]
        return (sum(preds[1:], preds[0]) / len(preds)).rename("predicted")

    # ------------------------------------------------------------------ outputs
    def to_frame(self) -> pd.DataFrame:
        """Tidy table of the first fit's layout with pooled values and the Rubin split:
        term, kind, level, group, estimate, std_error, t, var_sampling, var_imputation, fmi, df."""
        out = self.fits[0].to_frame().copy()
        n_fixed = len(self.coef)
        out["estimate"] = np.concatenate([self.coef.to_numpy(), self.varcomp.to_numpy()])
        out["std_error"] = np.concatenate([self.se.to_numpy(), self.varcomp_se.to_numpy()])
        out["t"] = np.where(np.arange(len(out)) < n_fixed, out["estimate"] / out["std_error"], np.nan)
        out["var_sampling"] = self.var_sampling.to_numpy()
        out["var_imputation"] = self.var_imputation.to_numpy()
        out["fmi"] = self.fmi.to_numpy()
        out["df"] = self.df.to_numpy()
        return add_inference_columns(self, out)

    def summary(self, extended: bool = False, alpha: float = 0.05):
        """EdSurvey ``mixed.sdf`` layout (MATH.md section 10); ``extended=True``: with degrees of
        freedom, p-values, intervals and the standard-error type."""
        from .results import Summary

        if extended:
            return Summary(extended_summary(self, alpha))
        lines = ["Call:", str(self.call), "", f"Formula: {self.formula}", ""]
        if self.response and self.pv_columns:
            lines += [f"Response {self.response}: {', '.join(self.pv_columns)}"]
        if self.n_pv > 1:
            lines += [f"Plausible Values: {self.n_pv}"]
        if not self.converged:
            bad = [c for c, f in zip(self.pv_columns, self.fits) if not f.converged]
            lines += [f"WARNING: the optimiser did not converge for {', '.join(bad)}"]
        for note in self.notes:
            lines += [f"Weights: {note}"]
        if self.variance:
            lines += [f"Standard errors: {self.variance['description']}"]
        elif self.se_type == "model":
            lines += [se_line(self)]
        groups = pd.DataFrame({"Group Var": list(self.ngroups)[::-1] + ["Residual" if self._is_gaussian else "Obs"],
                               "Observations": list(self.ngroups.values())[::-1] + [self.nobs],
                               "Level": list(range(len(self.ngroups) + 1, 0, -1))},
                              index=range(1, len(self.ngroups) + 2))
        lines += ["Number of Groups:", groups.to_string(), "", "Variance terms:"]
        vd = self.var_df
        var_rows = vd[vd["var2"] == ""]
        vt = pd.DataFrame({"variance": var_rows["estimate"].to_numpy(), "Std. Error": var_rows["se"].to_numpy(),
                           "Std.Dev.": np.sqrt(np.clip(var_rows["estimate"].to_numpy(), 0, None))},
                          index=var_rows["name"].to_numpy())
        text = _table(vt)
        corr = self.correlations
        if len(corr):
            text += "\nCorrelations (pooled through Fisher z):\n" + _table(corr.to_frame("correlation"), 2)
        lines += [text, "", "Fixed Effects:"]
        fe = pd.DataFrame({"Estimate": self.coef, "Std. Error": self.se, "t value": self.coef / self.se})
        lines += [_table(fe)]
        if self.n_pv == 1 and self.lnl is not None:
            lines += ["", f"lnl= {self.lnl:.2f}"]
        if self.icc is not None:
            lines += ["", f"Intraclass Correlation= {_r_format(self.icc)}"]
        return Summary("\n".join(lines))

    @property
    def _is_gaussian(self) -> bool:
        return "Residual" in set(self.varcomp.index)

    def __str__(self) -> str:
        return str(self.summary())

    def __repr__(self) -> str:
        return (f"<PooledResults {self.formula!r} n_pv={self.n_pv} nobs={self.nobs} groups={self.ngroups} "
                f"converged={self.converged}>")
