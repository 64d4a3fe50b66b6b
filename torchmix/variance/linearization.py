r"""Linearization (Taylor-series) variance with strata, PSUs and finite-population corrections.

Binder (1983); the estimator of Stata's ``svy: mixed`` and of the R ``survey`` package's
``svyrecvar`` for one stage. The per-top-level-group scores :math:`s_k` that the cluster
sandwich uses are summed within primary sampling units (PSUs),
:math:`z_{hi}=\sum_{k\in(h,i)} s_k`, centred within strata, and combined as

.. math::
    J = \sum_h (1-f_h)\,\frac{n_h}{n_h-1}\sum_{i=1}^{n_h}(z_{hi}-\bar z_h)(z_{hi}-\bar z_h)^\top,

with :math:`n_h` the number of PSUs of stratum :math:`h` and :math:`f_h` its sampling fraction
(0 without a finite-population correction). The "bread" is unchanged:
:math:`V = \mathcal H^{-1}J\mathcal H^{-1}`. With one stratum, PSU = top-level group and no FPC,
:math:`J = \frac{G}{G-1}\sum_k (s_k-\bar s)(s_k-\bar s)^\top`, which is the cluster sandwich
(:math:`\bar s = 0` at the optimum). Design degrees of freedom: PSUs minus strata.

Strata with a single PSU ("lonely PSUs") follow the R ``survey`` package's ``lonely.psu`` rules:

===============  =============================================================================
``"error"``      raise (the default)
``"remove"``     the stratum contributes nothing
``"certainty"``  the stratum contributes nothing (its PSU is taken as sampled with certainty)
``"adjust"``     the lonely PSU is centred at the grand mean :math:`\sum_{h,i} z_{hi}/n`
                 instead of its stratum mean, with factor :math:`1-f_h`
``"average"``    the contributions of the other strata are scaled by
                 :math:`H/H_{\text{ok}}` (number of strata over strata with two or more PSUs)
===============  =============================================================================

Pure tensor math: no pandas.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError

__all__ = ["LONELY_PSU_RULES", "StratifiedMeat"]

LONELY_PSU_RULES = ("error", "remove", "certainty", "adjust", "average")


@dataclass(frozen=True)
class StratifiedMeat:
    r"""The meat :math:`J` of a stratified, clustered design, as a callable on scores.

    Attributes
    ----------
    psu : int64 ``(G,)``: PSU index in ``[0, P)`` of each top-level group.
    stratum : int64 ``(P,)``: stratum index in ``[0, H)`` of each PSU.
    fraction : float64 ``(H,)``: sampling fraction :math:`f_h` of each stratum (0: no FPC).
    lonely_psu : one of :data:`LONELY_PSU_RULES`.
    stratum_names : labels of the strata, for messages.
    """

    psu: torch.Tensor
    stratum: torch.Tensor
    fraction: torch.Tensor
    lonely_psu: str = "error"
    stratum_names: tuple = ()

    def __post_init__(self):
        if self.lonely_psu not in LONELY_PSU_RULES:
            raise ConfigError(f"lonely_psu must be one of {LONELY_PSU_RULES}, got {self.lonely_psu!r}")
        lonely = self.lonely_strata()
        if self.lonely_psu == "error" and lonely:
            names = [str(self.stratum_names[h]) if h < len(self.stratum_names) else str(h) for h in lonely[:5]]
            raise ConfigError(f"stratum {', '.join(names)} has only one PSU; choose lonely_psu= 'remove', "
                              "'certainty', 'adjust' or 'average' (as in the R survey package)")

    @property
    def n_psu(self) -> int:
        return int(self.stratum.numel())

    @property
    def n_strata(self) -> int:
        return int(self.fraction.numel())

    @property
    def df(self) -> int:
        """Design degrees of freedom: number of PSUs minus number of strata."""
        return self.n_psu - self.n_strata

    def psu_counts(self) -> torch.Tensor:
        """int64 ``(H,)``: number of PSUs :math:`n_h` of each stratum."""
        return torch.bincount(self.stratum.cpu(), minlength=self.n_strata)

    def lonely_strata(self) -> list:
        """Indices of strata with a single PSU."""
        return [int(h) for h in torch.nonzero(self.psu_counts() == 1).flatten()]

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        r""":math:`J` from per-top-level-group scores.

        Parameters
        ----------
        scores : ``(G, k)``.

        Returns
        -------
        ``(k, k)``.
        """
        dev, dt = scores.device, scores.dtype
        psu, stratum = self.psu.to(dev), self.stratum.to(dev)
        n_h = self.psu_counts().to(device=dev, dtype=dt)
        z = torch.zeros(self.n_psu, scores.shape[1], dtype=dt, device=dev).index_add(0, psu, scores)
        sums = torch.zeros(self.n_strata, scores.shape[1], dtype=dt, device=dev).index_add(0, stratum, z)
        centre = sums / n_h[:, None]
        lonely = n_h == 1
        if self.lonely_psu == "adjust":
            grand = z.sum(0) / self.n_psu
            centre = torch.where(lonely[:, None], grand[None, :], centre)
        dev_z = z - centre[stratum]
        finite = 1.0 - self.fraction.to(device=dev, dtype=dt)
        factor = torch.where(lonely, finite, finite * n_h / (n_h - 1).clamp_min(1))
        if self.lonely_psu in ("remove", "certainty", "average", "error"):
            factor = torch.where(lonely, torch.zeros_like(factor), factor)
        e = dev_z * factor[stratum].sqrt()[:, None]
        meat = e.transpose(0, 1) @ e
        if self.lonely_psu == "average":
            n_ok = int((~lonely).sum())
            if n_ok > 0:
                meat = meat * (self.n_strata / n_ok)
        return meat
