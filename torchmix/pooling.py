r"""Rubin's rules for plausible values (MATH.md section 8). Pure NumPy, float64, no pandas.

Notation: :math:`K` plausible values (imputations), each giving an estimate vector
:math:`\hat\gamma_m` (length :math:`p`) with standard errors :math:`\mathrm{SE}_m` or a
covariance matrix :math:`U_m`. Arrays put the plausible values on axis 0:

* estimates ``(K, p)``, standard errors ``(K, p)``, covariances ``(K, p, p)``.

Scalar rule (seed eqs. 6-8, EdSurvey ``mixed.sdf``), for every coefficient and every
variance component separately:

.. math::
    \bar\gamma = \frac1K\sum_m\hat\gamma_m,\qquad
    V_{\text{imp}} = \frac{K+1}{K(K-1)}\sum_m(\hat\gamma_m-\bar\gamma)^2,\qquad
    V_{\text{samp}} = \frac1K\sum_m \mathrm{SE}_m^2,\qquad
    \mathrm{SE} = \sqrt{V_{\text{samp}} + V_{\text{imp}}}.

Matrix rule (Rubin 1987): :math:`\bar U = \frac1K\sum_m U_m`,
:math:`B = \frac{1}{K-1}\sum_m(\hat\gamma_m-\bar\gamma)(\hat\gamma_m-\bar\gamma)^\top`,
:math:`T = \bar U + (1+K^{-1})B`; the diagonal of :math:`T` equals the scalar rule.

Degrees of freedom follow Barnard & Rubin (1999), fraction of missing information follows
Rubin (1987) with the Barnard-Rubin degrees of freedom (the convention of R ``mice::pool``);
see :func:`barnard_rubin_df` and :func:`fraction_missing_information`.

With :math:`K=1` every rule reduces to the single fit: the imputation variance and
:math:`B` are defined as 0 (there is nothing to pool).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "ScalarPool",
    "MatrixPool",
    "pooled_mean",
    "imputation_variance",
    "sampling_variance",
    "rubin_scalar",
    "between_covariance",
    "rubin_matrix",
    "relative_increase_in_variance",
    "barnard_rubin_df",
    "fraction_missing_information",
    "pool_correlations",
    "pool_icc",
]


def _stack(x, name: str, ndim_min: int = 1) -> np.ndarray:
    """float64 array with the plausible values on axis 0; a clear ValueError otherwise."""
    a = np.asarray(x, dtype=np.float64)
    if a.ndim < ndim_min or a.shape[0] < 1:
        raise ValueError(f"{name} must have the plausible values on axis 0 and at least one of them; "
                         f"got shape {a.shape}")
    return a


def pooled_mean(estimates) -> np.ndarray:
    r"""Mean over plausible values :math:`\bar\gamma = K^{-1}\sum_m\hat\gamma_m`.

    Parameters
    ----------
    estimates : array ``(K, ...)``

    Returns
    -------
    array ``(...)``
    """
    est = _stack(estimates, "estimates")
    return est.mean(axis=0)


def imputation_variance(estimates) -> np.ndarray:
    r"""Imputation variance :math:`V_{\text{imp}}=\frac{K+1}{K(K-1)}\sum_m(\hat\gamma_m-\bar\gamma)^2`.

    This is :math:`(1+K^{-1})B` for one scalar, :math:`B` the between-value variance.

    Parameters
    ----------
    estimates : array ``(K, ...)``

    Returns
    -------
    array ``(...)``; zeros when ``K == 1``.
    """
    est = _stack(estimates, "estimates")
    k = est.shape[0]
    if k == 1:
        return np.zeros(est.shape[1:], dtype=np.float64)
    dev = est - est.mean(axis=0)
    return (k + 1) / (k * (k - 1)) * (dev * dev).sum(axis=0)


def sampling_variance(std_errors) -> np.ndarray:
    r"""Sampling variance :math:`V_{\text{samp}}=K^{-1}\sum_m\mathrm{SE}_m^2` (EdSurvey ``Vjrr``).

    Parameters
    ----------
    std_errors : array ``(K, ...)`` per-value standard errors (sandwich).

    Returns
    -------
    array ``(...)``
    """
    se = _stack(std_errors, "std_errors")
    return (se * se).mean(axis=0)


@dataclass(frozen=True)
class ScalarPool:
    r"""Result of the scalar rule, all arrays of shape ``(p,)``.

    Attributes
    ----------
    estimate : :math:`\bar\gamma`
    var_imputation : :math:`V_{\text{imp}}`
    var_sampling : :math:`V_{\text{samp}}`
    var_total : :math:`V_{\text{samp}} + V_{\text{imp}}`
    se : :math:`\sqrt{V_{\text{total}}}`
    n_pv : :math:`K`
    """

    estimate: np.ndarray
    var_imputation: np.ndarray
    var_sampling: np.ndarray
    var_total: np.ndarray
    se: np.ndarray
    n_pv: int


def rubin_scalar(estimates, std_errors) -> ScalarPool:
    r"""Scalar Rubin rule (seed eqs. 6-8) for each column separately.

    Parameters
    ----------
    estimates : array ``(K, p)``
    std_errors : array ``(K, p)``

    Returns
    -------
    :class:`ScalarPool`
    """
    est = _stack(estimates, "estimates")
    se = _stack(std_errors, "std_errors")
    if est.shape != se.shape:
        raise ValueError(f"estimates {est.shape} and std_errors {se.shape} must have the same shape")
    vi = imputation_variance(est)
    vs = sampling_variance(se)
    vt = vi + vs
    return ScalarPool(estimate=pooled_mean(est), var_imputation=vi, var_sampling=vs, var_total=vt,
                      se=np.sqrt(vt), n_pv=int(est.shape[0]))


def between_covariance(estimates) -> np.ndarray:
    r"""Between-value covariance :math:`B=\frac1{K-1}\sum_m(\hat\gamma_m-\bar\gamma)(\hat\gamma_m-\bar\gamma)^\top`.

    Parameters
    ----------
    estimates : array ``(K, p)``

    Returns
    -------
    array ``(p, p)``; zeros when ``K == 1``.
    """
    est = _stack(estimates, "estimates", ndim_min=2)
    k, p = est.shape
    if k == 1:
        return np.zeros((p, p), dtype=np.float64)
    dev = est - est.mean(axis=0)
    return dev.T @ dev / (k - 1)


@dataclass(frozen=True)
class MatrixPool:
    r"""Result of the matrix rule.

    Attributes
    ----------
    estimate : ``(p,)`` :math:`\bar\gamma`
    within : ``(p, p)`` :math:`\bar U` (mean sampling covariance)
    between : ``(p, p)`` :math:`B`
    total : ``(p, p)`` :math:`T=\bar U+(1+K^{-1})B`
    n_pv : :math:`K`
    """

    estimate: np.ndarray
    within: np.ndarray
    between: np.ndarray
    total: np.ndarray
    n_pv: int


def rubin_matrix(estimates, covariances) -> MatrixPool:
    r"""Matrix Rubin rule :math:`T=\bar U+(1+K^{-1})B` for the full covariance.

    Parameters
    ----------
    estimates : array ``(K, p)``
    covariances : array ``(K, p, p)`` per-value sampling covariances :math:`U_m`.

    Returns
    -------
    :class:`MatrixPool`; ``diag(total)`` equals :func:`rubin_scalar`'s ``var_total`` when
    ``SE_m = sqrt(diag(U_m))``.
    """
    est = _stack(estimates, "estimates", ndim_min=2)
    cov = _stack(covariances, "covariances", ndim_min=3)
    k, p = est.shape
    if cov.shape != (k, p, p):
        raise ValueError(f"covariances must have shape {(k, p, p)} to match estimates; got {cov.shape}")
    ubar = cov.mean(axis=0)
    b = between_covariance(est)
    total = ubar + (1.0 + 1.0 / k) * b
    return MatrixPool(estimate=est.mean(axis=0), within=ubar, between=b, total=total, n_pv=k)


def relative_increase_in_variance(within, between, n_pv: int) -> np.ndarray:
    r"""Relative increase in variance due to the missing information, :math:`r=(1+K^{-1})B/\bar U`.

    Parameters
    ----------
    within : array ``(p,)`` :math:`\bar U` (diagonal); between : array ``(p,)`` :math:`B`;
    n_pv : :math:`K`.

    Returns
    -------
    array ``(p,)``; ``inf`` where :math:`\bar U=0<B`, ``nan`` where both are 0.
    """
    u = np.asarray(within, dtype=np.float64)
    b = np.asarray(between, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (1.0 + 1.0 / n_pv) * b / u


def _lambda(u: np.ndarray, b: np.ndarray, k: int) -> np.ndarray:
    r""":math:`\lambda=(1+K^{-1})B/T`, the share of the total variance due to imputation."""
    extra = (1.0 + 1.0 / k) * b
    t = u + extra
    with np.errstate(divide="ignore", invalid="ignore"):
        lam = np.where(t > 0, extra / np.where(t > 0, t, 1.0), 0.0)
    return lam


def barnard_rubin_df(within, between, n_pv: int, df_complete=np.inf) -> np.ndarray:
    r"""Barnard-Rubin (1999) degrees of freedom of each pooled estimate.

    .. math::
        \lambda=\frac{(1+K^{-1})B}{T},\quad
        \nu_{\text{old}}=\frac{K-1}{\lambda^2},\quad
        \nu_{\text{obs}}=\frac{\nu_{c}+1}{\nu_{c}+3}\,\nu_{c}\,(1-\lambda),\quad
        \frac1\nu=\frac1{\nu_{\text{old}}}+\frac1{\nu_{\text{obs}}}

    computed through the reciprocals so that infinities are exact: with
    ``df_complete = inf`` this is Rubin's (1987) :math:`\nu_{\text{old}}`; with :math:`B=0` (for
    example :math:`K=1` or identical plausible values) it is :math:`\nu_{\text{obs}}=\nu_c` when
    :math:`\nu_c` is infinite, and :math:`\frac{\nu_c+1}{\nu_c+3}\nu_c` otherwise.

    Parameters
    ----------
    within : array ``(p,)`` :math:`\bar U`; between : array ``(p,)`` :math:`B`; n_pv : :math:`K`.
    df_complete : float or array ``(p,)``, the complete-data degrees of freedom :math:`\nu_c`.
        For torchmix's cluster-robust (top-level sandwich) standard errors a natural choice is
        the number of top-level groups minus 1, :math:`G_L-1`, the rank of the meat matrix;
        ``inf`` gives Rubin's large-sample value.

    Returns
    -------
    array ``(p,)`` (``inf`` where there is no imputation variance and :math:`\nu_c=\infty`).
    """
    u = np.asarray(within, dtype=np.float64)
    b = np.asarray(between, dtype=np.float64)
    k = int(n_pv)
    if k < 1:
        raise ValueError(f"n_pv must be at least 1, got {n_pv}")
    nuc = np.broadcast_to(np.asarray(df_complete, dtype=np.float64), u.shape)
    if np.any(nuc <= 0):
        raise ValueError(f"df_complete must be positive (or inf), got {df_complete!r}")
    lam = _lambda(u, b, k)
    inv_old = np.zeros_like(lam) if k == 1 else lam * lam / (k - 1)
    finite = np.isfinite(nuc)
    safe_nuc = np.where(finite, nuc, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv_obs = np.where(finite, (safe_nuc + 3.0) / ((safe_nuc + 1.0) * safe_nuc * (1.0 - lam)), 0.0)
        return 1.0 / (inv_old + inv_obs)


def fraction_missing_information(within, between, n_pv: int, df=np.inf) -> np.ndarray:
    r"""Fraction of missing information (Rubin 1987, eq. 3.1.10).

    .. math::
        \gamma=\frac{r+2/(\nu+3)}{r+1},\qquad r=\frac{(1+K^{-1})B}{\bar U}

    with :math:`\nu` the degrees of freedom, here those of :func:`barnard_rubin_df` (as R
    ``mice::pool`` does). With ``df = inf`` it equals :math:`\lambda=(1+K^{-1})B/T`.

    Parameters
    ----------
    within : array ``(p,)``; between : array ``(p,)``; n_pv : :math:`K`;
    df : float or array ``(p,)`` degrees of freedom :math:`\nu`.

    Returns
    -------
    array ``(p,)``; ``nan`` where :math:`\bar U` and :math:`B` are both 0.
    """
    u = np.asarray(within, dtype=np.float64)
    b = np.asarray(between, dtype=np.float64)
    nu = np.broadcast_to(np.asarray(df, dtype=np.float64), u.shape)
    k = int(n_pv)
    extra = (1.0 + 1.0 / k) * b
    t = u + extra
    with np.errstate(divide="ignore", invalid="ignore"):
        # r/(r+1) = extra/T and 1/(r+1) = U/T: written this way it stays finite when U = 0.
        small = np.where(np.isfinite(nu), 2.0 / (nu + 3.0), 0.0)
        return extra / t + small * u / t


def pool_correlations(correlations) -> np.ndarray:
    r"""Pool correlations through Fisher's z: :math:`\tanh\big(K^{-1}\sum_m\operatorname{atanh}\rho_m\big)`.

    Parameters
    ----------
    correlations : array ``(K, ...)`` with entries in :math:`[-1, 1]`.

    Returns
    -------
    array ``(...)``. A correlation of exactly :math:`\pm1` has infinite z, so the pooled value
    is :math:`\pm1` when every such value has the same sign and ``nan`` when both signs occur.
    """
    rho = _stack(correlations, "correlations")
    if np.any(np.abs(rho[np.isfinite(rho)]) > 1.0):
        raise ValueError("correlations must lie in [-1, 1]")
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.tanh(np.arctanh(rho).mean(axis=0))


def pool_icc(iccs) -> np.ndarray | float:
    r"""Pooled intraclass correlation: the **mean of the per-value ICCs** (MATH.md 8).

    This is not the ICC of the averaged variance components (EdSurvey prints 0.430 where the
    averaged variances give 0.431). A missing per-value ICC (``nan``) makes the result ``nan``.

    Parameters
    ----------
    iccs : array ``(K,)`` or ``(K, ...)`` (for example one column per level).

    Returns
    -------
    float, or array ``(...)``.
    """
    icc = _stack(iccs, "iccs")
    out = icc.mean(axis=0)
    return float(out) if out.ndim == 0 else out
