r"""R² for weighted multilevel models (docs/MATH.md section 15). Pure NumPy functions.

**Nakagawa & Schielzeth (2013), Nakagawa, Johnson & Schielzeth (2017).** With level-1 unconditional
weights :math:`w_i` and weighted means :math:`\bar a = \sum_i w_ia_i/\sum_i w_i`,

.. math::
    \sigma^2_f = \overline{(f-\bar f)^2},\ f_i = x_i^\top\hat\beta;\qquad
    \sigma^2_l = \overline{z^{(l)\top}_i\hat\Sigma_lz^{(l)}_i}\ \ (\text{each level } l\ge2);

    R^2_m = \frac{\sigma^2_f}{\sigma^2_f+\sum_l\sigma^2_l+\sigma^2_\varepsilon},\qquad
    R^2_c = \frac{\sigma^2_f+\sum_l\sigma^2_l}{\sigma^2_f+\sum_l\sigma^2_l+\sigma^2_\varepsilon},

with :math:`\sigma^2_\varepsilon` the residual variance: gaussian :math:`\hat\sigma^2`; latent scale
:math:`\pi^2/3` (logit), 1 (probit), :math:`\pi^2/6` (cloglog); poisson (log link) the log-normal
approximation :math:`\ln(1+1/\lambda)`, :math:`\lambda=\exp(\bar\eta_f+\tfrac12\sum_l\sigma^2_l)`,
:math:`\bar\eta_f` the weighted mean of the fixed part of the linear predictor (with the offset; equal
to the intercept when the covariates are centred).

**Rights & Sterba (2019)** for 2-level gaussian models. Every column is split into its within part
:math:`a_i-\bar a_{j(i)}` and between part :math:`\bar a_{j(i)}` (weighted group means), which are
orthogonal under the weights, so

.. math::
    f_1=\overline{(f^w)^2},\quad f_2=\overline{(f^b-\bar f)^2},\quad
    v=\overline{z^{w\top}_i\hat\Sigma z^w_i},\quad m=\overline{z^{b\top}_i\hat\Sigma z^b_i},

with :math:`f_1+f_2=\sigma^2_f` and :math:`v+m=\sigma^2_2`; total :math:`=f_1+f_2+v+m+\hat\sigma^2`.
For level-1 predictors centred within groups these are the paper's :math:`f_1` (level-1 fixed slopes),
:math:`f_2` (level-2 predictors), :math:`v` (random-slope variation), :math:`m` (random-intercept
variation).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

__all__ = ["latent_residual_variance", "nakagawa_r2", "rights_sterba", "weighted_group_means"]


def _wmean(a: np.ndarray, w: np.ndarray) -> float:
    return float(np.sum(w * a) / np.sum(w))


def weighted_group_means(a: np.ndarray, w: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Per-row weighted mean of ``a`` (``(N,)`` or ``(N, k)``) over the row's group ``codes``."""
    a2 = a.reshape(len(a), -1)
    den = np.bincount(codes, weights=w)
    means = np.stack([np.bincount(codes, weights=w * a2[:, c]) / den for c in range(a2.shape[1])], axis=1)
    return means[codes].reshape(a.shape)


def random_variance(z: np.ndarray, sigma: np.ndarray, w: np.ndarray) -> float:
    r"""Weighted mean over rows of :math:`z_i^\top\Sigma z_i`: ``z (N, q)``, ``sigma (q, q)``."""
    return _wmean(np.einsum("nq,qr,nr->n", z, sigma, z), w)


def latent_residual_variance(family: str, link: str, eta_fixed_mean: float = 0.0, random_total: float = 0.0):
    r"""Residual variance :math:`\sigma^2_\varepsilon` on the latent (link) scale of a non-gaussian family.

    Raises
    ------
    ValueError for a family/link without a stated latent residual variance.
    """
    if family == "binomial":
        table = {"logit": math.pi ** 2 / 3.0, "probit": 1.0, "cloglog": math.pi ** 2 / 6.0}
        if link in table:
            return table[link]
    if family == "poisson" and link == "log":
        lam = math.exp(eta_fixed_mean + 0.5 * random_total)
        return math.log1p(1.0 / lam)
    raise ValueError(f"R² is not defined here for family {family!r} with link {link!r} "
                     "(supported: gaussian; binomial logit/probit/cloglog; poisson log)")


def nakagawa_r2(fixed: np.ndarray, w: np.ndarray, zs: Sequence[np.ndarray], sigmas: Sequence[np.ndarray],
                residual: float) -> dict:
    r"""Marginal and conditional R² and their variance pieces.

    Parameters
    ----------
    fixed : ``(N,)`` :math:`x_i^\top\hat\beta`; w : ``(N,)`` weights.
    zs, sigmas : per level ``(N, q_l)`` random-effect columns and ``(q_l, q_l)`` :math:`\hat\Sigma_l`.
    residual : :math:`\sigma^2_\varepsilon`.

    Returns
    -------
    dict with ``marginal``, ``conditional``, ``var_fixed``, ``var_random`` (list per level),
    ``var_residual``.
    """
    f_mean = _wmean(fixed, w)
    var_f = _wmean((fixed - f_mean) ** 2, w)
    var_r = [random_variance(z, s, w) for z, s in zip(zs, sigmas)]
    total = var_f + sum(var_r) + residual
    return dict(marginal=var_f / total, conditional=(var_f + sum(var_r)) / total, var_fixed=var_f,
                var_random=var_r, var_residual=residual)


def rights_sterba(fixed_cols: np.ndarray, beta: np.ndarray, z: np.ndarray, sigma: np.ndarray, residual: float,
                  w: np.ndarray, codes: np.ndarray) -> dict:
    r"""Rights-Sterba (2019) variance decomposition of a 2-level gaussian model.

    Parameters
    ----------
    fixed_cols : ``(N, p)`` fixed-effect design; beta : ``(p,)``.
    z : ``(N, q)`` level-2 random-effect columns; sigma : ``(q, q)`` :math:`\hat\Sigma_2`.
    residual : :math:`\hat\sigma^2`; w : ``(N,)`` level-1 unconditional weights; codes : level-2 group of each row.

    Returns
    -------
    dict ``f1, f2, v, m, residual`` (variances) and ``total``.
    """
    f = fixed_cols @ beta
    f_b = weighted_group_means(f, w, codes)
    f_w = f - f_b
    z_b = weighted_group_means(z, w, codes)
    z_w = z - z_b
    f_mean = _wmean(f, w)
    out = dict(f1=_wmean(f_w ** 2, w), f2=_wmean((f_b - f_mean) ** 2, w), v=random_variance(z_w, sigma, w),
               m=random_variance(z_b, sigma, w), residual=float(residual))
    out["total"] = sum(out.values())
    return out
