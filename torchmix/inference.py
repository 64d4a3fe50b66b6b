r"""Sandwich (cluster-robust) variance estimation, MATH.md section 7. Pure tensor math.

.. math::
    \widehat{\mathrm{Var}}(\hat\psi) = \mathcal H^{-1} J \mathcal H^{-1},\qquad
    J = c_G \sum_{k=1}^{G} s_k s_k^\top,\qquad c_G = \frac{G}{G-1}

with :math:`s_k` the score of top-level group :math:`k` and :math:`\mathcal H` the Hessian
of the log-likelihood.
"""

from __future__ import annotations

import torch

from .errors import NumericalError, TorchmixWarning
from .warn import warn

__all__ = ["meat", "sandwich", "safe_inverse_negative_hessian"]

SMALL_SAMPLE_CHOICES = ("G/(G-1)", "none")


def meat(scores: torch.Tensor, small_sample: str = "G/(G-1)") -> torch.Tensor:
    r"""The meat :math:`J = c_G\sum_k s_k s_k^\top` from per-top-group scores.

    Parameters
    ----------
    scores : tensor ``(G, k)``; rows with a non-finite entry are dropped with a warning.
    small_sample : ``"G/(G-1)"`` (default, WeMix) or ``"none"`` (CR0), or a callable
        ``scores -> (k, k)`` such as :class:`~torchmix.variance.StratifiedMeat`.

    Returns
    -------
    tensor ``(k, k)``
    """
    if callable(small_sample):  # a design-based meat (:mod:`torchmix.variance.linearization`)
        finite = torch.isfinite(scores).all(dim=1)
        if not bool(finite.all()):
            warn(f"{int((~finite).sum())} top-level group(s) have non-finite scores and are left out "
                          "of the sandwich", TorchmixWarning)
            scores = torch.where(finite[:, None], scores, torch.zeros_like(scores))
        return small_sample(scores)
    if small_sample not in SMALL_SAMPLE_CHOICES:
        raise ValueError(f"small_sample must be one of {SMALL_SAMPLE_CHOICES}, got {small_sample!r}")
    finite = torch.isfinite(scores).all(dim=1)
    if not bool(finite.all()):
        n_bad = int((~finite).sum())
        warn(f"{n_bad} top-level group(s) have non-finite scores and are left out of the sandwich",
             TorchmixWarning)
        scores = scores[finite]
    g = scores.shape[0]
    c = g / (g - 1) if (small_sample == "G/(G-1)" and g > 1) else 1.0
    return c * scores.transpose(0, 1) @ scores


def _describe(indices, names) -> str:
    if names is not None:
        return ", ".join(repr(names[i]) for i in indices)
    return "position(s) " + ", ".join(str(i) for i in indices)


def safe_inverse_negative_hessian(hess: torch.Tensor, what: str = "parameters", names=None) -> torch.Tensor:
    r"""Inverse of :math:`A = -\mathcal H` (symmetrised), computed on the equilibrated scale.

    With :math:`D = \operatorname{diag}(A)` the Jacobi-equilibrated matrix
    :math:`E = D^{-1/2} A D^{-1/2}` has a unit diagonal and does not depend on the units of the
    parameters (rescaling parameter :math:`r` by :math:`c_r` multiplies row and column :math:`r` of
    :math:`A` by :math:`1/c_r`, which :math:`D^{-1/2}` undoes exactly). Then
    :math:`A^{-1} = D^{-1/2} E^{-1} D^{-1/2}`, with :math:`E^{-1}` from its Cholesky factor.

    Only when :math:`E` is numerically singular (an eigenvalue of :math:`E` below
    :math:`\sqrt{\epsilon}\,\lambda_{\max}(E)`, or a diagonal entry of :math:`A` that is not
    positive) is a warning issued naming the parameters involved; those eigenvalues of :math:`E`
    are floored there, so the standard errors are approximate. A parameter with no positive
    curvature at all (:math:`A_{rr}\le 0`) gets NaN variances and covariances.

    Parameters
    ----------
    hess : tensor ``(k, k)``, Hessian of the log-likelihood.
    what : what the parameters are, for messages.
    names : optional ``k`` parameter names for messages.

    Returns
    -------
    tensor ``(k, k)``
    """
    a = -0.5 * (hess + hess.transpose(0, 1))
    if not bool(torch.isfinite(a).all()):
        raise NumericalError(f"the Hessian for {what} is not finite")
    k = a.shape[0]
    out = torch.full_like(a, float("nan"))
    if k == 0:
        return out
    d = torch.diagonal(a)
    ok = d > 0
    if not bool(ok.all()):
        bad = torch.nonzero(~ok).flatten().tolist()
        warn(f"the information matrix for {what} is singular: no curvature in the direction of "
             f"{_describe(bad, names)}; their variances are reported as NaN", TorchmixWarning)
    idx = torch.nonzero(ok).flatten()
    if idx.numel() == 0:
        return out
    sub = a[idx][:, idx]
    s = d[idx].rsqrt()
    e = s[:, None] * sub * s[None, :]
    e = 0.5 * (e + e.transpose(0, 1))
    evals, evecs = torch.linalg.eigh(e)
    floor = float(evals.max()) * torch.finfo(a.dtype).eps ** 0.5
    if bool((evals <= floor).any()):
        weak = evecs[:, evals <= floor].abs().amax(dim=1) > 0.1
        involved = [int(idx[j]) for j in torch.nonzero(weak).flatten().tolist()]
        warn(f"the information matrix for {what} is numerically singular (near-dependence among "
             f"{_describe(involved, names)}); its smallest eigenvalues on the equilibrated scale were "
             "floored and the standard errors are approximate", TorchmixWarning)
        inv_e = (evecs / evals.clamp_min(floor)) @ evecs.transpose(0, 1)
    else:
        chol, info = torch.linalg.cholesky_ex(e)
        if int(info) == 0:
            inv_e = torch.cholesky_inverse(chol)
        else:
            inv_e = (evecs / evals) @ evecs.transpose(0, 1)
    inv = s[:, None] * inv_e * s[None, :]
    inv = 0.5 * (inv + inv.transpose(0, 1))
    out[idx[:, None], idx[None, :]] = inv
    return out


def sandwich(hess: torch.Tensor, scores: torch.Tensor, small_sample: str = "G/(G-1)",
             what: str = "parameters", names=None) -> torch.Tensor:
    r"""Sandwich covariance :math:`\mathcal H^{-1} J \mathcal H^{-1}`.

    Parameters without curvature (NaN in the inverse, see :func:`safe_inverse_negative_hessian`) get
    NaN rows and columns; the others are computed from the remaining block. With fewer than two
    top-level groups the meat is degenerate (the scores sum to zero at the optimum) and the result is
    all NaN.

    Parameters
    ----------
    hess : tensor ``(k, k)``, Hessian of the log-likelihood (negative definite at a maximum).
    scores : tensor ``(G, k)`` per-top-group scores.

    Returns
    -------
    tensor ``(k, k)``
    """
    bread = safe_inverse_negative_hessian(hess, what, names)
    v = torch.full_like(bread, float("nan"))
    if scores.shape[0] < 2:
        return v
    ok = ~torch.isnan(torch.diagonal(bread))
    idx = torch.nonzero(ok).flatten()
    b = bread[idx][:, idx]
    j = meat(scores[:, idx], small_sample)
    sub = b @ j @ b
    v[idx[:, None], idx[None, :]] = 0.5 * (sub + sub.transpose(0, 1))
    return v
