r"""t statistics, p-values and confidence intervals for fixed effects and variance components.

Pure NumPy (no pandas, no files). Notation: estimate :math:`\hat\gamma`, standard error
:math:`s`, reference degrees of freedom :math:`\nu` (``inf`` = normal), level :math:`1-\alpha`,
:math:`q=F_\nu^{-1}(1-\alpha/2)`.

* Fixed effects: :math:`t=\hat\gamma/s`, :math:`p=P(|T_\nu|>|t|)`,
  interval :math:`\hat\gamma\pm q\,s`.
* Variances :math:`v` (SE :math:`s_v`): a Wald interval on the log standard deviation,
  :math:`\log\sqrt v\pm q\,s_v/(2v)` (delta method), transformed back; on the variance scale
  :math:`[v\,e^{-q s_v/v},\;v\,e^{q s_v/v}]`, never below zero. A variance of exactly zero (on the
  boundary, SE NaN) gets a NaN interval.
* Covariances :math:`c_{ab}` of variances :math:`v_a,v_b`: a Wald interval for the correlation
  :math:`\rho=c_{ab}/\sqrt{v_av_b}` on Fisher's :math:`z=\operatorname{atanh}\rho` scale, with
  :math:`\mathrm{SE}(z)=\mathrm{SE}(\rho)/(1-\rho^2)` and :math:`\mathrm{SE}(\rho)` by the delta method
  from the covariance of :math:`(v_a,v_b,c_{ab})`:
  :math:`\nabla\rho=(-\rho/(2v_a),\,-\rho/(2v_b),\,1/\sqrt{v_av_b})`. The interval is reported for
  the correlation and, multiplied by :math:`\sqrt{v_av_b}` (the standard deviations held at
  their estimates), on the covariance scale. A correlation at :math:`\pm1` gets a NaN interval.
"""

from __future__ import annotations

import math

import numpy as np

from .distributions import t_ppf, t_sf2, vectorize

__all__ = ["t_statistics", "p_values", "critical_values", "wald_intervals", "variance_intervals",
           "correlation_interval"]

_t_sf2 = vectorize(t_sf2)


def _check_alpha(alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.floating)) or not 0 < float(alpha) < 1:
        raise ValueError(f"alpha must lie strictly between 0 and 1, got {alpha!r}")
    return float(alpha)


def t_statistics(estimate, se) -> np.ndarray:
    r""":math:`t=\hat\gamma/s`; ``(p,)`` arrays in, ``(p,)`` out (NaN where ``s`` is NaN or 0)."""
    est = np.asarray(estimate, dtype=np.float64)
    s = np.asarray(se, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(s > 0, est / np.where(s > 0, s, 1.0), np.nan)


def p_values(t, df) -> np.ndarray:
    r"""Two-sided :math:`P(|T_\nu|>|t|)`; ``df`` broadcast against ``t`` (``inf`` = normal)."""
    return _t_sf2(t, df)


def critical_values(alpha: float, df) -> np.ndarray:
    r""":math:`q=F_\nu^{-1}(1-\alpha/2)` for each entry of ``df``."""
    a = _check_alpha(alpha)
    df = np.asarray(df, dtype=np.float64)
    out = np.empty(df.shape, dtype=np.float64)
    for idx in np.ndindex(df.shape):
        out[idx] = t_ppf(1.0 - a / 2.0, float(df[idx])) if df[idx] > 0 else np.nan
    return out


def wald_intervals(estimate, se, df, alpha: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    r""":math:`\hat\gamma\mp q\,s`; returns ``(lower, upper)``, each ``(p,)``."""
    est = np.asarray(estimate, dtype=np.float64)
    s = np.asarray(se, dtype=np.float64)
    q = critical_values(alpha, np.broadcast_to(np.asarray(df, dtype=np.float64), est.shape))
    return est - q * s, est + q * s


def variance_intervals(variance, se, df, alpha: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    r"""Log-SD Wald intervals of variances on the variance scale: :math:`v\,e^{\mp q s_v/v}`.

    Returns ``(lower, upper)``; NaN where the variance is not positive or its SE is not finite.
    """
    v = np.asarray(variance, dtype=np.float64)
    s = np.asarray(se, dtype=np.float64)
    q = critical_values(alpha, np.broadcast_to(np.asarray(df, dtype=np.float64), v.shape))
    ok = (v > 0) & np.isfinite(s)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        half = np.where(ok, q * s / np.where(ok, v, 1.0), np.nan)
        lower = np.where(ok, v * np.exp(-half), np.nan)
        upper = np.where(ok, v * np.exp(half), np.nan)
    return lower, upper


def correlation_interval(var_a: float, var_b: float, cov: float, cov3, df: float,
                         alpha: float = 0.05) -> tuple[float, float, float]:
    r"""Fisher-z interval of :math:`\rho=c/\sqrt{v_av_b}`.

    Parameters
    ----------
    var_a, var_b, cov : the two variances and their covariance.
    cov3 : ``(3, 3)`` covariance matrix of the estimates :math:`(v_a, v_b, c)`.
    df : reference degrees of freedom.

    Returns
    -------
    ``(rho, lower, upper)``; the bounds are NaN when a variance is not positive, :math:`|\rho|=1`
    or the covariance is not finite.
    """
    if not (var_a > 0 and var_b > 0):
        return math.nan, math.nan, math.nan
    rho = cov / math.sqrt(var_a * var_b)
    v3 = np.asarray(cov3, dtype=np.float64)
    if not (abs(rho) < 1.0) or not np.isfinite(v3).all():
        return rho, math.nan, math.nan
    grad = np.array([-rho / (2.0 * var_a), -rho / (2.0 * var_b), 1.0 / math.sqrt(var_a * var_b)])
    var_rho = float(grad @ v3 @ grad)
    if not var_rho >= 0:
        return rho, math.nan, math.nan
    se_z = math.sqrt(var_rho) / (1.0 - rho * rho)
    q = float(critical_values(alpha, np.array([df]))[0])
    z = math.atanh(rho)
    return rho, math.tanh(z - q * se_z), math.tanh(z + q * se_z)
