r"""Variance-component tables in lme4's ``VarCorr`` form and their intervals (pandas layer).

``varcorr_frame`` gives one row per variance (standard deviation in ``sd_cor``), per covariance
(correlation in ``sd_cor``) and the residual (gaussian), like ``as.data.frame(VarCorr(fit))``.
``varcomp_interval_frame`` adds the intervals of :mod:`~torchmix.report.intervals`.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from .intervals import correlation_interval, variance_intervals

__all__ = ["varcorr_frame", "varcomp_interval_frame"]


def _lookup(vd: pd.DataFrame) -> dict:
    return {(r["group"], r["var1"], r["var2"]): i for i, r in vd.reset_index(drop=True).iterrows()}


def varcorr_frame(var_df: pd.DataFrame, correlations=None) -> pd.DataFrame:
    r"""lme4 ``VarCorr`` table.

    Parameters
    ----------
    var_df : the results' ``var_df`` (name, level, group, var1, var2, estimate, ...).
    correlations : optional Series (index = covariance names) used instead of
        :math:`c_{ab}/\sqrt{v_av_b}` (pooled results pass their Fisher-z pooled correlations).

    Returns
    -------
    DataFrame indexed by component name: group, level, var1, var2, variance (the variance or
    covariance), sd_cor (standard deviation or correlation; NaN when a variance is 0).
    """
    vd = var_df.reset_index(drop=True)
    pos = _lookup(vd)
    sd_cor = []
    for _, r in vd.iterrows():
        if r["var2"] == "":
            sd_cor.append(math.sqrt(max(float(r["estimate"]), 0.0)))
            continue
        if correlations is not None and r["name"] in correlations.index:
            sd_cor.append(float(correlations[r["name"]]))
            continue
        va = float(vd.loc[pos[(r["group"], r["var1"], "")], "estimate"])
        vb = float(vd.loc[pos[(r["group"], r["var2"], "")], "estimate"])
        sd_cor.append(float(r["estimate"]) / math.sqrt(va * vb) if va > 0 and vb > 0 else np.nan)
    return pd.DataFrame({"group": vd["group"].to_numpy(), "level": vd["level"].to_numpy(),
                         "var1": vd["var1"].to_numpy(), "var2": vd["var2"].to_numpy(),
                         "variance": vd["estimate"].to_numpy(dtype=float), "sd_cor": sd_cor},
                        index=pd.Index(vd["name"].to_numpy(), name="term"))


def varcomp_interval_frame(var_df: pd.DataFrame, var_theta, df, alpha: float = 0.05) -> pd.DataFrame:
    r"""Intervals of every variance component.

    Parameters
    ----------
    var_df : ``var_df`` of the results (estimates and SEs).
    var_theta : DataFrame or None, covariance of the components (needed for correlations).
    df : Series (index = component names) or float, reference degrees of freedom.

    Returns
    -------
    DataFrame indexed by component: estimate, std_error, lower, upper (variance/covariance scale),
    sd_cor, sd_cor_lower, sd_cor_upper (standard deviation or correlation scale), method
    (``"log-sd"`` or ``"fisher-z"``).
    """
    vd = var_df.reset_index(drop=True)
    names = list(vd["name"])
    dfs = (df.reindex(names).to_numpy(dtype=float) if isinstance(df, pd.Series)
           else np.full(len(names), float(df)))
    est = vd["estimate"].to_numpy(dtype=float)
    se = vd["se"].to_numpy(dtype=float)
    lower, upper = np.full(len(names), np.nan), np.full(len(names), np.nan)
    sdc, sdl, sdu = np.full(len(names), np.nan), np.full(len(names), np.nan), np.full(len(names), np.nan)
    method = np.where(vd["var2"] == "", "log-sd", "fisher-z")
    is_var = (vd["var2"] == "").to_numpy()
    lo_v, up_v = variance_intervals(est, se, dfs, alpha)
    lower[is_var], upper[is_var] = lo_v[is_var], up_v[is_var]
    sdc[is_var] = np.sqrt(np.clip(est[is_var], 0, None))
    sdl[is_var], sdu[is_var] = np.sqrt(lo_v[is_var]), np.sqrt(up_v[is_var])
    pos = _lookup(vd)
    vt = None if var_theta is None else var_theta.reindex(index=names, columns=names).to_numpy(dtype=float)
    for i in np.nonzero(~is_var)[0]:
        r = vd.iloc[i]
        a, b = pos[(r["group"], r["var1"], "")], pos[(r["group"], r["var2"], "")]
        cov3 = np.full((3, 3), np.nan) if vt is None else vt[np.ix_([a, b, i], [a, b, i])]
        rho, lo, hi = correlation_interval(est[a], est[b], est[i], cov3, dfs[i], alpha)
        sdc[i], sdl[i], sdu[i] = rho, lo, hi
        if est[a] > 0 and est[b] > 0:
            scale = math.sqrt(est[a] * est[b])
            lower[i], upper[i] = lo * scale, hi * scale
    return pd.DataFrame({"estimate": est, "std_error": se, "lower": lower, "upper": upper, "sd_cor": sdc,
                         "sd_cor_lower": sdl, "sd_cor_upper": sdu, "method": method},
                        index=pd.Index(names, name="term"))
