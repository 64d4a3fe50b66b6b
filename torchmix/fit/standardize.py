r"""Fit on internally standardised columns, so that estimates do not depend on the units of a column.

Each column :math:`x_r` of :math:`X` and :math:`z_r` of every :math:`Z^{(l)}` is divided by its
weighted root mean square

.. math::
    s_r = \Bigl(\sum_i w^{(1)}_i x_{ir}^2 \Big/ \sum_i w^{(1)}_i\Bigr)^{1/2}

(1 for an all-zero column; exactly 1 for the intercept). Multiplying a column by :math:`c` multiplies
:math:`s_r` by :math:`c`, so the standardised problem, and with it every step of the optimiser, is the
same up to rounding. With :math:`S_x=\operatorname{diag}(s^x)` and :math:`S_l=\operatorname{diag}(s^{(l)})`,
:math:`X\beta = (XS_x^{-1})(S_x\beta)` and :math:`Z\Lambda u = (ZS_l^{-1})(S_l\Lambda)u`, so the fit on
the standardised columns gives

.. math::
    \beta = S_x^{-1}\beta_s,\quad \Lambda = S_l^{-1}\Lambda_s,\quad
    \Sigma_l = S_l^{-1}\Sigma_{l,s}S_l^{-1},\quad b = S_l^{-1}b_s,\quad u = u_s,

and every covariance, score and Hessian follows by the same diagonal (linear) maps. The
log-likelihood is unchanged. Pure tensor math.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..covariance import n_theta, tau_index, theta_index
from ..tensors import FitOutput, ModelTensors

__all__ = ["Standardizer", "column_rms"]


def column_rms(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    r"""Weighted root mean square of each column, ``(N, k) -> (k,)``; 1 for all-zero columns."""
    rms = torch.sqrt((w[:, None] * a * a).sum(0) / w.sum())
    return torch.where(rms > 0, rms, torch.ones_like(rms))


@dataclass
class Standardizer:
    r"""Column scales of a model and the maps between the original and the standardised parameters.

    Attributes
    ----------
    sx : ``(p,)`` scales of the columns of :math:`X`.
    sz : list of ``(q_l,)`` scales of the columns of :math:`Z^{(l)}`, level 2 first.
    term_sizes : list of the term sizes of each level.
    """

    sx: torch.Tensor
    sz: list
    term_sizes: list

    @classmethod
    def from_tensors(cls, tensors: ModelTensors) -> "Standardizer":
        w = tensors.w1_uncond
        return cls(sx=column_rms(tensors.X, w), sz=[column_rms(lv.Z, w) for lv in tensors.levels],
                   term_sizes=[tuple(lv.term_sizes) for lv in tensors.levels])

    # ------------------------------------------------------------------ factors
    def theta_factor(self) -> torch.Tensor:
        r""":math:`\theta_s/\theta` for every free entry of every :math:`\Lambda_l` (row scale), ``(n_theta,)``."""
        out = []
        for s, ts in zip(self.sz, self.term_sizes):
            rows, _ = theta_index(ts)
            out.append(s[rows.to(s.device)])
        return torch.cat(out) if out else self.sx.new_zeros(0)

    def tau_factor(self) -> torch.Tensor:
        r""":math:`\tau_s/\tau = s_r s_c` for every reported variance component, ``(n_tau,)`` (no residual)."""
        out = []
        for s, ts in zip(self.sz, self.term_sizes):
            rows, cols = tau_index(ts)
            out.append(s[rows] * s[cols])
        return torch.cat(out) if out else self.sx.new_zeros(0)

    # ------------------------------------------------------------------ forward
    def tensors(self, tensors: ModelTensors) -> ModelTensors:
        """The model with standardised columns of :math:`X` and :math:`Z`."""
        levels = tuple(replace(lv, Z=lv.Z / s) for lv, s in zip(tensors.levels, self.sz))
        return replace(tensors, X=tensors.X / self.sx, levels=levels)

    def start(self, start, residual: bool):
        r"""A user start vector :math:`(\beta, \tau[, \sigma^2])` on the standardised scale (None stays None)."""
        if start is None:
            return None
        vec = torch.as_tensor(start, dtype=self.sx.dtype, device=self.sx.device).reshape(-1)
        factor = torch.cat([self.sx, self.tau_factor()] + ([self.sx.new_ones(1)] if residual else []))
        if vec.numel() != factor.numel():
            return vec  # the fitter reports the wrong length
        return vec * factor

    # ------------------------------------------------------------------ back
    def output(self, out: FitOutput, gaussian: bool) -> FitOutput:
        """Carry a fit on the standardised columns back to the original units."""
        sx, ft, fa = self.sx, self.theta_factor(), self.tau_factor()
        one = sx.new_ones(1)
        tau_f = torch.cat([fa, one]) if gaussian else fa
        theta = []
        pos = 0
        for th, ts in zip(out.theta, self.term_sizes):
            k = n_theta(ts)
            theta.append(th / ft[pos:pos + k])
            pos += k
        b = [bb / s for bb, s in zip(out.b, self.sz)]
        scores = out.scores
        extra = dict(out.extra)
        if gaussian:
            psi_f = torch.cat([sx, ft, one])  # psi = (beta, theta, sigma)
            if "psi" in extra:
                extra["psi"] = extra["psi"] / psi_f
            if "hessian" in extra:
                extra["hessian"] = psi_f[:, None] * extra["hessian"] * psi_f[None, :]
        else:
            psi_f = torch.cat([sx, fa])  # scores over (beta, tau)
        if scores is not None and scores.shape[1] == psi_f.numel():
            scores = scores * psi_f
        cov_model = out.cov_beta_model
        if cov_model is not None:
            cov_model = cov_model / (sx[:, None] * sx[None, :])
        return replace(out, beta=out.beta / sx, cov_beta=out.cov_beta / (sx[:, None] * sx[None, :]),
                       cov_beta_model=cov_model, theta=theta, tau=out.tau / tau_f,
                       tau_cov=out.tau_cov / (tau_f[:, None] * tau_f[None, :]), b=b, scores=scores,
                       extra=extra)
