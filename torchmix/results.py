r"""Labelled results of one fit: tables, printed summary, random effects, prediction, Wald tests.

:class:`MixedResults` is built from a :class:`~torchmix.tensors.FitOutput` and the
:class:`~torchmix.design.Design` labels. Field names and the summary layout are those of
MATH.md section 10 (WeMix's names, one meaning each).
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from functools import cached_property
from typing import Optional

import numpy as np
import pandas as pd
import torch

from .covariance import tau_index
from .design import Design
from .errors import DataError
from .prediction import as_frame, linear_predictor, resolve_levels
from .r2_results import R2Mixin
from .ranef_results import RanefMixin
from .report.interface import ResultsBase
from .report.mixin import InferenceMixin, add_inference_columns
from .report.se_type import apply_se_type
from .report.summary_ext import extended_summary, se_line
from .tensors import FitOutput

__all__ = ["MixedResults", "Summary", "WaldTest", "chi2_sf", "varcomp_labels"]


def chi2_sf(x: float, df: int) -> float:
    r"""Upper tail :math:`P(\chi^2_{df} > x)` (regularised upper incomplete gamma)."""
    return float(torch.special.gammaincc(torch.tensor(df / 2.0, dtype=torch.float64),
                                         torch.tensor(x / 2.0, dtype=torch.float64)))


def varcomp_labels(design: Design, residual: bool) -> pd.DataFrame:
    """One row per variance component: name, level, group, var1, var2 (reporting order)."""
    rows = []
    for l, info in enumerate(design.levels, start=2):
        offset = 0
        for names in info.term_names:
            r_idx, c_idx = tau_index([len(names)])
            for r, c in zip(r_idx, c_idx):
                v1, v2 = names[r], (names[c] if r != c else "")
                name = f"{info.name}:{v1}" if r == c else f"{info.name}:{names[c]}:{names[r]}"
                if r != c:
                    v1, v2 = names[c], names[r]
                rows.append(dict(name=name, level=l, group=info.name, var1=v1, var2=v2))
            offset += len(names)
    if residual:
        rows.append(dict(name="Residual", level=1, group="Residual", var1="", var2=""))
    return pd.DataFrame(rows)


class Summary:
    """Printed summary of a fit; ``str(summary)`` is the WeMix-style table."""

    def __init__(self, text: str):
        self.text = text

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return self.text

    def _repr_html_(self) -> str:
        return f"<pre>{html.escape(self.text)}</pre>"


@dataclass
class WaldTest:
    """Result of :meth:`MixedResults.wald_test`: statistic, p-value, df and what was tested."""

    statistic: float
    p_value: float
    df: int
    terms: list
    estimates: np.ndarray
    hypothesis: np.ndarray
    type: str

    def __str__(self) -> str:
        return (f"Wald test ({self.type}) of {', '.join(self.terms)}: chi2({self.df}) = {self.statistic:.4f}, "
                f"p = {self.p_value:.4g}")


def _fmt_table(df: pd.DataFrame, digits: int = 6, index: bool = True) -> str:
    def fmt(v):
        if isinstance(v, str):
            return v
        if v is None or (isinstance(v, float) and np.isnan(v)):
            return "NA" if v is not None else ""
        return f"{v:.{digits}g}"
    return df.map(fmt).to_string(index=index)


class MixedResults(InferenceMixin, ResultsBase, RanefMixin, R2Mixin):
    """Results of one weighted mixed-model fit.

    Attributes
    ----------
    coef, se : pandas Series (fixed effects; aliased columns NaN).
    cov_mat, vcov_model : DataFrames (covariance of ``coef`` of the fit's ``se_type``, sandwich by
        default; model-based covariance).
    tvalues, pvalues, conf_int(), conf_int_varcomp(), df, varcorr, singular, aic, bic, deviance,
        compare(), wald_test() : inference (:class:`~torchmix.report.mixin.InferenceMixin`).
    varcomp, varcomp_se : Series of variance components (residual last for gaussian).
    var_theta : DataFrame, covariance of ``varcomp``.
    lnl : weighted (pseudo) log-likelihood.
    icc, icc_level : intraclass correlations (gaussian).
    ranef, u : dict level name -> DataFrame of random-effect predictions / spherical modes;
        ``ranef[name].std_error`` and ``ranef_se[name]``: conditional standard errors
        (:mod:`torchmix.ranef_results`).
    correlations : Series, correlation of each random-effect covariance. The members shared
        with pooled results are listed in :mod:`torchmix.report.interface`.
    nobs, ngroups : row count and dict of group counts per level.
    converged, iterations, message : optimiser status.
    """

    def __init__(self, out: FitOutput, design: Design, family, call: str, options: dict):
        out = apply_se_type(out, design.tensors, options.get("se_type", "sandwich"))
        self._out = out
        self.design = design
        self.family = family
        self.call = call
        self.options = dict(options)
        self.formula = design.parsed.formula
        self.converged = bool(out.converged)
        self.iterations = int(out.iterations)
        self.message = out.message
        self.lnl = float(out.lnl)
        self.sigma = out.sigma
        self.nobs = design.tensors.n_obs
        self.ngroups = {info.name: len(info.labels) for info in design.levels}
        self.levels = design.n_levels
        self.n_quad = options.get("n_quad") if not self.is_gaussian else None
        self.notes = list(design.notes)
        self.variance = out.extra.get("variance")  # design-based variance: method, description, df

    # ------------------------------------------------------------------ basic tables
    @property
    def is_gaussian(self) -> bool:
        return self._out.sigma is not None

    @cached_property
    def coef(self) -> pd.Series:
        full = pd.Series(np.nan, index=self.design.all_fixed_names, name="coef")
        full[self.design.fixed_names] = self._out.beta.cpu().numpy()
        return full

    @cached_property
    def cov_mat(self) -> pd.DataFrame:
        return self._cov_frame(self._out.cov_beta)

    @cached_property
    def vcov_model(self) -> Optional[pd.DataFrame]:
        return None if self._out.cov_beta_model is None else self._cov_frame(self._out.cov_beta_model)

    def _cov_frame(self, cov: torch.Tensor) -> pd.DataFrame:
        names = self.design.all_fixed_names
        full = pd.DataFrame(np.nan, index=names, columns=names)
        kept = self.design.fixed_names
        full.loc[kept, kept] = cov.cpu().numpy()
        return full

    @cached_property
    def se(self) -> pd.Series:
        return pd.Series(np.sqrt(np.diag(self.cov_mat.to_numpy())), index=self.coef.index, name="se")

    @cached_property
    def var_df(self) -> pd.DataFrame:
        """Variance components with level, group, names, estimate, SE and group counts (WeMix varDF)."""
        lab = varcomp_labels(self.design, residual=self.is_gaussian)
        lab["estimate"] = self._out.tau.cpu().numpy()
        lab["se"] = np.sqrt(np.diag(self._out.tau_cov.cpu().numpy()))
        lab["ngroups"] = [self.ngroups.get(g, self.nobs) for g in lab["group"]]
        return lab

    @cached_property
    def varcomp(self) -> pd.Series:
        return pd.Series(self.var_df["estimate"].to_numpy(), index=self.var_df["name"], name="varcomp")

    @cached_property
    def varcomp_se(self) -> pd.Series:
        return pd.Series(self.var_df["se"].to_numpy(), index=self.var_df["name"], name="varcomp_se")

    @cached_property
    def var_theta(self) -> pd.DataFrame:
        names = list(self.var_df["name"])
        return pd.DataFrame(self._out.tau_cov.cpu().numpy(), index=names, columns=names)

    @cached_property
    def theta(self) -> dict:
        return {info.name: t.cpu().numpy() for info, t in zip(self.design.levels, self._out.theta)}

    @cached_property
    def ranef(self) -> dict:
        return self._ranef_tables()

    @cached_property
    def u(self) -> dict:
        return {info.name: pd.DataFrame(u.cpu().numpy(), index=info.labels, columns=info.effect_names)
                for info, u in zip(self.design.levels, self._out.u)}

    @cached_property
    def wgt_stats(self) -> pd.DataFrame:
        names = ["Obs"] + [info.name for info in self.design.levels]
        counts = [self.nobs] + [len(info.labels) for info in self.design.levels]
        df = pd.DataFrame(self.design.weight_stats, index=names)
        df.insert(0, "n", counts)
        return df

    # ------------------------------------------------------------------ ICC
    @cached_property
    def icc(self) -> Optional[float]:
        r""":math:`\sum_l \operatorname{tr}\Sigma_l / (\sum_l \operatorname{tr}\Sigma_l + \sigma^2)` (gaussian; WeMix)."""
        if not self.is_gaussian:
            return None
        vd = self.var_df
        between = vd.loc[(vd["level"] >= 2) & (vd["var2"] == ""), "estimate"].sum()
        return float(between / (between + self.sigma ** 2))

    @cached_property
    def icc_level(self) -> Optional[dict]:
        """Per-level ICC of random-intercept models: correlation of two units sharing a level-l group."""
        if not self.is_gaussian or any(info.effect_names != ["(Intercept)"] for info in self.design.levels):
            return None
        taus = [float(v) for v in self.varcomp.iloc[:-1]]
        total = sum(taus) + self.sigma ** 2
        return {info.name: sum(taus[l:]) / total for l, info in enumerate(self.design.levels)}

    # ------------------------------------------------------------------ outputs
    def to_frame(self) -> pd.DataFrame:
        """Tidy table: term, kind, level, group, estimate, std_error, t, df, p_value, conf_low, conf_high."""
        fx = pd.DataFrame({"term": self.coef.index, "kind": "fixed", "level": 1, "group": "",
                           "estimate": self.coef.to_numpy(), "std_error": self.se.to_numpy()})
        vd = self.var_df
        vc = pd.DataFrame({"term": vd["name"], "kind": np.where(vd["var2"] == "", "variance", "covariance"),
                           "level": vd["level"], "group": vd["group"], "estimate": vd["estimate"],
                           "std_error": vd["se"]})
        out = pd.concat([fx, vc], ignore_index=True)
        out["t"] = out["estimate"] / out["std_error"]
        out.loc[out["kind"] != "fixed", "t"] = np.nan
        return add_inference_columns(self, out)

    def summary(self, extended: bool = False, alpha: float = 0.05) -> Summary:
        """WeMix-style printed summary (MATH.md section 10); ``extended=True`` adds degrees of freedom,
        p-values, ``1 - alpha`` intervals and the standard-error type."""
        if extended:
            return Summary(extended_summary(self, alpha))
        lines = ["Call:", self.call, ""]
        if not self.converged:
            lines += [f"WARNING: the optimiser did not converge ({self.message})", ""]
        if self.notes:
            lines += [f"Weights: {n}" for n in self.notes] + [""]
        if self.variance:
            lines += [f"Standard errors: {self.variance['description']}", ""]
        elif self.se_type == "model":
            lines += [se_line(self), ""]
        vd = self.var_df
        var_rows = []
        for lvl in sorted(vd["level"].unique(), reverse=True):
            sub = vd[(vd["level"] == lvl) & (vd["var2"] == "")]
            cov = vd[(vd["level"] == lvl) & (vd["var2"] != "")]
            for _, r in sub.iterrows():
                row = {"Level": int(lvl), "Group": r["group"], "Name": r["var1"], "Variance": r["estimate"],
                       "Std. Error": r["se"], "Std.Dev.": np.sqrt(max(r["estimate"], 0.0))}
                var_rows.append(row)
            for _, c in cov.iterrows():  # correlation columns
                va = sub.loc[sub["var1"] == c["var1"], "estimate"].iloc[0]
                vb = sub.loc[sub["var1"] == c["var2"], "estimate"].iloc[0]
                corr = c["estimate"] / np.sqrt(va * vb) if va > 0 and vb > 0 else np.nan
                names = list(sub["var1"])
                j = names.index(c["var1"]) + 1
                for row in var_rows:
                    if row["Level"] == lvl and row["Group"] == c["group"] and row["Name"] == c["var2"]:
                        row[f"Corr{j}"] = f"{corr:.2f}"
        vt = pd.DataFrame(var_rows).fillna("")
        lines += ["Variance terms:", _fmt_table(vt, index=False) if len(vt) else "(none)", "Groups:"]
        ws = self.wgt_stats
        groups = pd.DataFrame({"Level": list(range(len(ws), 0, -1)), "Group": list(ws.index[::-1]),
                               "n size": list(ws["n"][::-1]), "mean wgt": list(ws["mean"][::-1]),
                               "sum wgt": list(ws["sum"][::-1])})
        lines += [_fmt_table(groups, index=False), "", "Fixed Effects:"]
        fe = pd.DataFrame({"Estimate": self.coef, "Std. Error": self.se, "t value": self.coef / self.se})
        lines += [_fmt_table(fe), "", f"lnl= {self.lnl:.4f}"]
        if self.icc is not None:
            lines.append(f"Intraclass Correlation= {self.icc:.4f}")
        return Summary("\n".join(lines))

    def __str__(self) -> str:
        return str(self.summary())

    def __repr__(self) -> str:
        fam = getattr(self.family, "name", str(self.family))
        return (f"<MixedResults {self.formula!r} family={fam} nobs={self.nobs} "
                f"groups={self.ngroups} lnl={self.lnl:.4f} converged={self.converged}>")

    # ------------------------------------------------------------------ prediction
    def _linkinv(self, eta: np.ndarray) -> np.ndarray:
        if self.family is None or self.is_gaussian:
            return eta
        return self.family.linkinv(torch.as_tensor(eta, dtype=torch.float64)).numpy()

    def fitted(self, type: str = "link", include_random=True) -> pd.Series:
        """Fitted values for the rows used in the fit, indexed by their original labels.

        ``include_random``: True (default), False (population level: random effects 0) or the
        names of the grouping factors whose effects to include. The offset is always included.
        """
        if type not in ("link", "response"):
            raise DataError(f"type must be 'link' or 'response', got {type!r}")
        t = self.design.tensors
        levels = resolve_levels(self.design, include_random)
        eta = t.X @ self._out.beta.to(t.X.device)
        if t.offset is not None:
            eta = eta + t.offset
        for info, lv, b in zip(self.design.levels, t.levels, self._out.b):
            if info.name in levels:
                eta = eta + (lv.Z * b.to(t.X.device)[lv.group]).sum(1)
        eta = eta.cpu().numpy()
        vals = eta if type == "link" else self._linkinv(eta)
        return pd.Series(vals, index=self.design.row_index, name="fitted")

    def residuals(self) -> pd.Series:
        """Response residuals :math:`y - \\hat\\mu` for the rows used in the fit."""
        y = self.design.tensors.y.cpu().numpy()
        return pd.Series(y - self.fitted("response").to_numpy(), index=self.design.row_index, name="resid")

    def predict(self, newdata=None, type: str = "link", allow_new_levels: bool = False,
                include_random=True) -> pd.Series:
        r"""Predictions :math:`\hat\eta_i = x_i^\top\hat\beta + o_i + \sum_l z^{(l)\top}_i\hat b^{(l)}_{g_l(i)}`.

        Parameters
        ----------
        newdata : DataFrame, dict of columns, or None (None: fitted values of the fit's rows). Its
            variables are on the original scale: the training centering means and the offset are
            applied here (:mod:`torchmix.prediction`).
        type : ``"link"`` or ``"response"`` (applies the inverse link).
        allow_new_levels : a group id not seen in fitting is an error unless True; then its
            random effects are 0.
        include_random : True (default) includes every level's random effects; False gives
            population-level predictions (random effects 0, like lme4's ``re.form = NA``); a
            list of grouping-factor names includes only those levels.

        Returns
        -------
        Series aligned to ``newdata``'s rows (NaN where a needed value is missing).

        Raises
        ------
        DataError for a missing column, a factor level or group not seen in fitting.
        """
        if type not in ("link", "response"):
            raise DataError(f"type must be 'link' or 'response', got {type!r}")
        if newdata is None:
            return self.fitted(type, include_random=include_random).rename("predicted")
        nd = as_frame(newdata)
        eta = linear_predictor(self.design, self._out.beta.cpu().numpy(), [b.cpu().numpy() for b in self._out.b],
                               nd, allow_new_levels=allow_new_levels, include_random=include_random)
        out = eta if type == "link" else np.where(np.isnan(eta), np.nan, self._linkinv(np.nan_to_num(eta)))
        return pd.Series(out, index=nd.index, name="predicted")
