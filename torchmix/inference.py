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


def safe_inverse_negative_hessian(hess: torch.Tensor, what: str = "parameters") -> torch.Tensor:
    r"""Inverse of :math:`-\mathcal H` (symmetrised).

    When :math:`-\mathcal H` is not positive definite (an eigenvalue below
    :math:`\sqrt{\epsilon}` times the largest) a warning is issued and those eigenvalues are
    floored there (nearest positive definite matrix), so the standard errors are approximate.

    Returns
    -------
    tensor ``(k, k)``
    """
    a = -0.5 * (hess + hess.transpose(0, 1))
    evals, evecs = torch.linalg.eigh(a)
    eps = torch.finfo(a.dtype).eps
    top = evals.abs().max()
    if not bool(torch.isfinite(evals).all()):
        raise NumericalError(f"the Hessian for {what} is not finite")
    floor = top * eps ** 0.5
    if bool((evals <= floor).any()):
        warn(f"the information matrix for {what} is not positive definite; "
             "its small eigenvalues were floored and the standard errors are approximate",
             TorchmixWarning)
        evals = evals.clamp_min(floor)
    return (evecs / evals) @ evecs.transpose(0, 1)


def sandwich(hess: torch.Tensor, scores: torch.Tensor, small_sample: str = "G/(G-1)",
             what: str = "parameters") -> torch.Tensor:
    r"""Sandwich covariance :math:`\mathcal H^{-1} J \mathcal H^{-1}`.

    Parameters
    ----------
    hess : tensor ``(k, k)``, Hessian of the log-likelihood (negative definite at a maximum).
    scores : tensor ``(G, k)`` per-top-group scores.

    Returns
    -------
    tensor ``(k, k)``
    """
    bread = safe_inverse_negative_hessian(hess, what)
    j = meat(scores, small_sample)
    v = bread @ j @ bread
    return 0.5 * (v + v.transpose(0, 1))
