r"""The extended printed summary: the WeMix/EdSurvey tables plus degrees of freedom, p-values,
confidence intervals, the standard-error type, boundary diagnosis and (unit weights) AIC/BIC.

``summary()`` keeps the WeMix/EdSurvey layout of MATH.md section 10; ``summary(extended=True)``
prints this one.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from . import comparison

__all__ = ["se_line", "df_line", "extended_summary"]


def se_line(res) -> str:
    """One line naming the standard errors, e.g. ``Standard errors: sandwich (cluster-robust, 18 clusters)``."""
    top = list(res.ngroups)[-1] if res.ngroups else "rows"
    design = getattr(res, "variance", None)
    if design:
        return f"Standard errors: {design['description']}"
    if res.se_type == "model":
        if comparison.unit_weights(res):
            return "Standard errors: model-based (inverse observed information)"
        return ("Standard errors: model-based (inverse observed information of the pseudo-likelihood; they "
                "ignore the sampling design, the sandwich does not)")
    factor = getattr(res._first_fit, "options", {}).get("small_sample", "G/(G-1)")
    extra = ", factor G/(G-1)" if factor == "G/(G-1)" else ""
    pooled = ", combined over plausible values by Rubin's rules" if hasattr(res, "fits") and res.n_pv > 1 else ""
    return f"Standard errors: sandwich (cluster-robust, {res.n_clusters} clusters of {top}{extra}){pooled}"


def df_line(res) -> str:
    """The reference distribution of the p-values and intervals."""
    rule = res.df_rule
    if rule == "normal":
        return "Reference distribution: normal (z)"
    if hasattr(res, "fits") and res.n_pv > 1:
        nu = res.df_complete if rule == "cluster" else rule
        return f"Reference distribution: t, Barnard-Rubin degrees of freedom (complete-data df {nu:g})"
    d = res._reference_df().iloc[0]
    why = ("" if rule != "cluster" else " (design degrees of freedom)" if getattr(res, "variance", None)
           else " (top-level clusters - 1)")
    return f"Reference distribution: t with {d:g} degrees of freedom{why}"


def _fmt(df: pd.DataFrame, digits: int = 6) -> str:
    def f(v):
        if isinstance(v, str):
            return v
        if v is None or (isinstance(v, float) and not math.isfinite(v)):
            return "NA" if v is None or np.isnan(v) else ("Inf" if v > 0 else "-Inf")
        if isinstance(v, (int, np.integer)):
            return str(v)
        return f"{v:.{digits}g}"
    return df.map(f).to_string()


def _p_fmt(p: float) -> str:
    if not math.isfinite(p):
        return "NA"
    return "<2e-16" if p < 2e-16 else f"{p:.4g}"


def extended_summary(res, alpha: float = 0.05) -> str:
    """Text of the extended summary (see the module docstring)."""
    lvl = f"{100 * (1 - alpha):g}%"
    lines = ["Call:", str(res.call), ""]
    if not res.converged:
        lines += ["WARNING: the optimiser did not converge", ""]
    lines += [f"Weights: {n}" for n in res.notes]
    if hasattr(res, "fits") and res.n_pv > 1:
        lines += [f"Plausible values: {res.n_pv} ({', '.join(res.pv_columns)})"]
    lines += [se_line(res), df_line(res), ""]

    vc = res.conf_int_varcomp(alpha)
    vcor = res.varcorr
    tab = pd.DataFrame({"Level": vcor["level"].astype(int), "Variance": vcor["variance"],
                        "Std. Error": vc["std_error"], "SD/Corr": vcor["sd_cor"],
                        f"{lvl} lower": vc["sd_cor_lower"], f"{lvl} upper": vc["sd_cor_upper"]},
                       index=vcor.index)
    lines += [f"Variance terms ({lvl} intervals: standard deviations on the log scale, correlations by Fisher z):",
              _fmt(tab), ""]
    if res.singular:
        lines += [f"Singular fit: {res.singular_reason}", ""]

    ci = res.conf_int(alpha)
    d = res._reference_df().reindex(res.coef.index)
    fe = pd.DataFrame({"Estimate": res.coef, "Std. Error": res.se, "t value": res.tvalues, "df": d,
                       "Pr(>|t|)": [_p_fmt(p) for p in res.pvalues], "lower": ci["lower"], "upper": ci["upper"]})
    fe = fe.rename(columns={"lower": f"{100 * alpha / 2:g}%", "upper": f"{100 * (1 - alpha / 2):g}%"})
    lines += ["Fixed Effects:", _fmt(fe), ""]
    tail = []
    if res.lnl is not None:
        tail.append(f"lnl= {res.lnl:.4f}")
        if comparison.unit_weights(res):
            tail.append(f"AIC= {res.aic:.4f}  BIC= {res.bic:.4f}  (unit weights: ordinary ML)")
    if res.icc is not None:
        tail.append(f"Intraclass Correlation= {res.icc:.4f}")
    lines += tail
    return "\n".join(lines).rstrip()
