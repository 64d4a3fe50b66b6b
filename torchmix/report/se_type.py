r"""Which standard errors a fit reports: the sandwich (default) or the model-based inverse information.

* ``se_type="sandwich"``: :math:`\mathcal H^{-1}J\mathcal H^{-1}` (MATH.md 7.1), cluster-robust at the
  top level; what WeMix and EdSurvey print.
* ``se_type="model"``: the bread alone, :math:`(-\mathcal H)^{-1}`, the inverse observed information of
  the (pseudo) log-likelihood. For the gaussian family the fixed-effect block is
  :math:`\hat\sigma^2K_{\beta\beta}^{-1}` (MATH.md 7.2), with unit weights lme4's ``vcov()`` of an ML
  ``lmer`` fit; the variance components use the inverse of the joint :math:`(\theta,\sigma)` Hessian
  at fixed :math:`\hat\beta` (every level at once), carried to :math:`\tau` by the delta method. For
  quadrature fits it is the inverse of the finite-difference Hessian over :math:`(\beta,\theta)`
  (lme4's ``vcov()`` of ``glmer`` uses the same Hessian).

Also the reference degrees of freedom rule (``df=``) and the small-cluster warning.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch.func import jacfwd

from ..covariance import blank_zero_variances, diagonal_theta_mask, lambda_from_theta, n_theta, tau_from_lambda
from ..errors import ConfigError, SmallSampleWarning
from ..inference import safe_inverse_negative_hessian
from ..tensors import FitOutput
from ..warn import warn

__all__ = ["SE_TYPES", "MIN_CLUSTERS", "check_se_type", "check_df_rule", "warn_few_clusters",
           "gaussian_tau_cov_model", "apply_se_type", "complete_data_df"]

SE_TYPES = ("sandwich", "model")
DF_RULES = ("cluster", "normal")
MIN_CLUSTERS = 30


def check_se_type(se_type) -> str:
    """``"sandwich"`` or ``"model"``; anything else is a :class:`~torchmix.errors.ConfigError`."""
    if se_type not in SE_TYPES:
        raise ConfigError(f"se_type must be 'sandwich' or 'model', got {se_type!r}")
    return se_type


def check_df_rule(df):
    """``"cluster"`` (top-level groups minus 1), ``"normal"`` (z) or a positive number."""
    if isinstance(df, str):
        if df not in DF_RULES:
            raise ConfigError(f"df must be 'cluster', 'normal' or a positive number, got {df!r}")
        return df
    if isinstance(df, bool) or not isinstance(df, (int, float)) or not (df > 0):
        raise ConfigError(f"df must be 'cluster', 'normal' or a positive number, got {df!r}")
    return float(df)


def complete_data_df(rule, n_top: int) -> float:
    r"""Reference degrees of freedom of one fit: :math:`G_L-1` (``"cluster"``), ``inf``
    (``"normal"``) or the number given."""
    if rule == "normal":
        return math.inf
    if rule == "cluster" or rule is None:
        return float(n_top - 1) if n_top > 1 else math.inf
    return float(rule)


def warn_few_clusters(n_top: int, top_name: str, se_type: str) -> None:
    """Warn (:class:`~torchmix.errors.SmallSampleWarning`) when the sandwich rests on < 30 clusters."""
    if se_type == "sandwich" and n_top < MIN_CLUSTERS:
        warn(
            f"the sandwich (cluster-robust) standard errors rest on {n_top} top-level clusters "
            f"({top_name!r}); with fewer than {MIN_CLUSTERS} they are biased downwards. Intervals and "
            f"p-values use t with {n_top - 1} degrees of freedom; consider se_type='model' as well",
            SmallSampleWarning)


def gaussian_tau_cov_model(out: FitOutput, term_sizes) -> torch.Tensor:
    r"""Model-based covariance of the gaussian variance components.

    :math:`V_\tau = D(-\mathcal H_{\phi\phi})^{-1}D^\top` over :math:`\phi=(\theta_{\text{free}},\sigma)`, every
    level jointly, :math:`D=\partial\tau/\partial\phi`; :math:`\mathcal H` is ``out.extra["hessian"]``
    (over :math:`(\beta,\theta,\sigma)`). Diagonal :math:`\theta` exactly 0 (boundary) are held
    fixed; the rows and columns of a zero variance are NaN.

    Returns
    -------
    tensor ``(n_tau, n_tau)``, reporting order (levels, residual last).
    """
    hess, psi = out.extra["hessian"], out.extra["psi"]
    p = out.beta.numel()
    thetas = [t.to(psi.dtype) for t in out.theta]
    sizes = [n_theta(ts) for ts in term_sizes]
    masks = [~(diagonal_theta_mask(ts).to(t.device) & (t == 0)) for t, ts in zip(thetas, term_sizes)]
    free = torch.cat(masks)
    idx = torch.cat([p + torch.nonzero(free.cpu()).reshape(-1), torch.tensor([psi.numel() - 1])]).to(psi.device)
    v_phi = safe_inverse_negative_hessian(hess[idx][:, idx], "variance terms")

    def tau_fn(phi):
        full = torch.zeros(sum(sizes), dtype=phi.dtype, device=phi.device)
        full = full.index_put((torch.nonzero(free).reshape(-1),), phi[:-1])
        s2 = phi[-1] ** 2
        parts, pos = [], 0
        for ts, k in zip(term_sizes, sizes):
            parts.append(tau_from_lambda(lambda_from_theta(full[pos:pos + k], ts), ts, s2))
            pos += k
        return torch.cat(parts + [s2.reshape(1)])

    phi = torch.cat([torch.cat(thetas)[free], psi[-1:]])
    d = jacfwd(tau_fn)(phi).detach()
    cov = d @ v_phi @ d.transpose(0, 1)
    tau = tau_fn(phi).detach()
    return blank_zero_variances(tau, 0.5 * (cov + cov.transpose(0, 1)), term_sizes)


def apply_se_type(out: FitOutput, tensors, se_type: str) -> FitOutput:
    """The fit output whose ``cov_beta``/``tau_cov`` are those of ``se_type``.

    With ``"model"`` the sandwich matrices are kept in ``extra["cov_beta_sandwich"]`` and
    ``extra["tau_cov_sandwich"]``; with ``"sandwich"`` the output is returned unchanged.
    """
    if se_type in (None, "sandwich") or out.extra.get("se_type") == "model":
        return out
    check_se_type(se_type)
    term_sizes = [tuple(lv.term_sizes) for lv in tensors.levels]
    if out.sigma is not None:
        tau_cov = gaussian_tau_cov_model(out, term_sizes)
    else:
        tau_cov = out.extra.get("tau_cov_model")
        if tau_cov is None:  # a fitter that does not provide it: no model-based variance-component SEs
            tau_cov = torch.full_like(out.tau_cov, float("nan"))
    extra = dict(out.extra, se_type="model", cov_beta_sandwich=out.cov_beta, tau_cov_sandwich=out.tau_cov)
    return replace(out, cov_beta=out.cov_beta_model, tau_cov=tau_cov, extra=extra)
