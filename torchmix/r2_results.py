r"""R² of a fit, and pooled over plausible values (mean of the per-value values).

:class:`R2Mixin` adds to single fits (:class:`~torchmix.results.MixedResults`) and pooled fits
(``PooledResults``, which hold their single fits in ``fits``):

* :meth:`R2Mixin.r2`: Series ``marginal``, ``conditional`` (Nakagawa-Schielzeth; random slopes by
  Nakagawa-Johnson-Schielzeth 2017) with the variance pieces;
* :meth:`R2Mixin.r2_decomposition`: the Rights-Sterba (2019) table of a 2-level gaussian model.

Weights: the level-1 unconditional weights of the fit. Formulas: :mod:`torchmix.r2`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .covariance import lambda_from_theta
from .errors import DataError
from .r2 import latent_residual_variance, nakagawa_r2, rights_sterba

__all__ = ["R2Mixin"]


def _pieces(res):
    """Row-level arrays of a single fit: fixed part, offset, weights, Z and Sigma per level."""
    t, out = res.design.tensors, res._out
    fixed = (t.X @ out.beta).cpu().numpy()
    offset = None if t.offset is None else t.offset.cpu().numpy()
    w = t.w1_uncond.cpu().numpy()
    scale = out.sigma ** 2 if res.is_gaussian else 1.0
    sigmas = []
    for lv, th in zip(t.levels, out.theta):
        lam = lambda_from_theta(th, lv.term_sizes).cpu().numpy()
        sigmas.append(scale * lam @ lam.T)
    zs = [lv.Z.cpu().numpy() for lv in t.levels]
    return fixed, offset, w, zs, sigmas


def _single_r2(res) -> pd.Series:
    fixed, offset, w, zs, sigmas = _pieces(res)
    if res.is_gaussian:
        residual = res.sigma ** 2
    else:
        fam = res.family
        eta_mean = float(np.sum(w * (fixed + (0.0 if offset is None else offset))) / np.sum(w))
        random_total = nakagawa_r2(fixed, w, zs, sigmas, 1.0)["var_random"]
        try:
            residual = latent_residual_variance(fam.name, fam.link.name, eta_mean, sum(random_total))
        except ValueError as exc:
            raise DataError(str(exc)) from None
    r = nakagawa_r2(fixed, w, zs, sigmas, residual)
    names = [info.name for info in res.design.levels]
    data = {"marginal": r["marginal"], "conditional": r["conditional"], "var_fixed": r["var_fixed"]}
    data.update({f"var_random:{n}": v for n, v in zip(names, r["var_random"])})
    data["var_residual"] = r["var_residual"]
    return pd.Series(data, name="r2")


def _single_table(res) -> pd.DataFrame:
    if not res.is_gaussian or len(res.design.levels) != 1:
        raise DataError("the Rights-Sterba decomposition is defined here for 2-level gaussian models; "
                        "use r2() for other models")
    t = res.design.tensors
    fixed, _, w, zs, sigmas = _pieces(res)
    d = rights_sterba(t.X.cpu().numpy(), res._out.beta.cpu().numpy(), zs[0], sigmas[0], res.sigma ** 2, w,
                      t.levels[0].group.cpu().numpy())
    comps = ["f1", "f2", "v", "m", "residual"]
    var = np.array([d[c] for c in comps])
    within = np.array([d["f1"], 0.0, d["v"], 0.0, d["residual"]])
    between = np.array([0.0, d["f2"], 0.0, d["m"], 0.0])
    table = pd.DataFrame({"variance": var, "total": var / d["total"],
                          "within": within / within.sum() if within.sum() > 0 else np.nan,
                          "between": between / between.sum() if between.sum() > 0 else np.nan}, index=comps)
    table.loc[["f2", "m"], "within"] = np.nan
    table.loc[["f1", "v", "residual"], "between"] = np.nan
    table.index.name = "component"
    return table


class R2Mixin:
    """R² for single and pooled fits (pooled: mean over the plausible values)."""

    def r2(self) -> pd.Series:
        r"""Marginal and conditional R² (Nakagawa-Schielzeth) with their variance pieces.

        Returns
        -------
        Series: ``marginal``, ``conditional``, ``var_fixed`` (weighted variance of
        :math:`X\hat\beta`), ``var_random:<group>`` per level (weighted mean of
        :math:`z_i^\top\hat\Sigma z_i`), ``var_residual`` (:math:`\hat\sigma^2`; latent-scale
        :math:`\pi^2/3` logit, 1 probit, :math:`\pi^2/6` cloglog, :math:`\ln(1+1/\lambda)` poisson).
        Pooled over plausible values: the mean of the per-value Series.
        """
        fits = getattr(self, "fits", None)
        if fits is not None:
            return pd.concat([_single_r2(f) for f in fits], axis=1).mean(axis=1).rename("r2")
        return _single_r2(self)

    def r2_decomposition(self) -> pd.DataFrame:
        """Rights-Sterba (2019) variance decomposition of a 2-level gaussian model.

        Returns
        -------
        DataFrame indexed by component (``f1`` level-1 part of the fixed effects, ``f2`` level-2
        part, ``v`` random-slope variation, ``m`` random-intercept/mean variation, ``residual``)
        with columns ``variance``, ``total`` (share of the total variance), ``within`` (share of
        the within-group variance f1 + v + residual) and ``between`` (share of f2 + m). Pooled over
        plausible values: the mean of the per-value tables.
        """
        fits = getattr(self, "fits", None)
        if fits is not None:
            tables = [_single_table(f) for f in fits]
            return sum(tables[1:], tables[0]) / len(tables)
        return _single_table(self)
