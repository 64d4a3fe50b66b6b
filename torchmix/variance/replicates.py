r"""Replicate-weight variance: JK1, JK2, BRR, Fay and bootstrap (the R ``survey`` conventions).

Each replicate :math:`r = 1..R` refits the model with the weights of the top-level units (the
PSUs) multiplied by a replicate factor :math:`a_{rk}`; with replicate estimates
:math:`\hat\gamma_r` and full-sample estimate :math:`\hat\gamma`,

.. math::
    \widehat{\mathrm{Var}}(\hat\gamma) = c\sum_{r=1}^R \rho_r(\hat\gamma_r - \tilde\gamma)
    (\hat\gamma_r - \tilde\gamma)^\top,

with :math:`\tilde\gamma = \hat\gamma` when ``mse`` is true (the default, as in the R ``survey``
package's ``svrepdesign(mse=TRUE)``) and the mean of the replicates otherwise; :math:`c` is
``scale`` and :math:`\rho_r` are ``rscales``. Defaults per method (``survey::svrepdesign``):

=============  =====================================  ====================================
method         ``scale`` :math:`c`                    typical use
=============  =====================================  ====================================
``"JK1"``      :math:`(R-1)/R`                        delete-one-PSU jackknife
``"JK2"``      1                                      paired jackknife (NAEP; TIMSS and PIRLS
                                                      up to 2011)
``"BRR"``      :math:`1/R`                            balanced repeated replication
``"Fay"``      :math:`1/(R(1-\rho)^2)`                Fay's BRR (PISA, :math:`\rho=0.5`)
``"bootstrap"``  :math:`1/(R-1)`                      bootstrap replicate weights
=============  =====================================  ====================================

Replicate factors from jackknife zones (:func:`zone_factors`): in zone :math:`h` the PSU with
replicate indicator 1 is doubled and its partner dropped; with ``both_halves`` a second,
complementary replicate per zone is formed (TIMSS and PIRLS since 2015/2016, whose variance then
takes ``scale`` 1/2).

Pure tensor math: no pandas.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..errors import ConfigError
from ..threads import fit_threads

__all__ = ["REPLICATE_METHODS", "ReplicateScheme", "default_scale", "replicate_variance", "zone_factors"]

REPLICATE_METHODS = ("JK1", "JK2", "BRR", "Fay", "bootstrap")


def default_scale(method: str, n_replicates: int, fay_rho: float = 0.0) -> float:
    r"""The default ``scale`` :math:`c` of a replicate method (table in the module docstring)."""
    r = n_replicates
    if method == "JK1":
        return (r - 1) / r
    if method == "JK2":
        return 1.0
    if method == "BRR":
        return 1.0 / r
    if method == "Fay":
        return 1.0 / (r * (1.0 - fay_rho) ** 2)
    if method == "bootstrap":
        return 1.0 / max(r - 1, 1)
    raise ConfigError(f"replicate_method must be one of {REPLICATE_METHODS}, got {method!r}")


@dataclass(frozen=True)
class ReplicateScheme:
    r"""Replicate factors of the top-level units and how their estimates combine.

    Attributes
    ----------
    factors : float64 ``(R, G)``: factor :math:`a_{rk}` of top-level group :math:`k` in replicate :math:`r`.
    method : one of :data:`REPLICATE_METHODS`.
    scale : :math:`c`; rscales : ``(R,)`` :math:`\rho_r`; mse : centre at the full-sample estimate.
    fay_rho : Fay's :math:`\rho` (method ``"Fay"``).
    source : how the factors were formed, for the summary.
    """

    factors: torch.Tensor
    method: str
    scale: float
    rscales: torch.Tensor
    mse: bool = True
    fay_rho: float = 0.0
    source: str = ""

    @classmethod
    def build(cls, factors: torch.Tensor, method: str, *, fay_rho: Optional[float] = None,
              scale: Optional[float] = None, rscales: Optional[Sequence[float]] = None, mse: bool = True,
              source: str = "") -> "ReplicateScheme":
        """Check the arguments and fill in the method's default ``scale`` and ``rscales``."""
        if method not in REPLICATE_METHODS:
            raise ConfigError(f"replicate_method must be one of {REPLICATE_METHODS}, got {method!r}")
        if factors.dim() != 2 or factors.shape[0] < 2:
            raise ConfigError(f"replicate variance needs at least 2 replicates, got {factors.shape[0]}")
        if not bool(torch.isfinite(factors).all()) or bool((factors < 0).any()):
            raise ConfigError("replicate factors must be finite and non-negative")
        r = int(factors.shape[0])
        if fay_rho is None:
            fay_rho = 0.0
        if method == "Fay" and not 0.0 <= float(fay_rho) < 1.0:
            raise ConfigError(f"fay_rho must be in [0, 1), got {fay_rho!r}")
        if method != "Fay" and fay_rho:
            raise ConfigError("fay_rho is only used with replicate_method='Fay'")
        if scale is None:
            scale = default_scale(method, r, float(fay_rho))
        elif not (isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale > 0):
            raise ConfigError(f"replicate scale must be a positive number, got {scale!r}")
        if rscales is None:
            rs = torch.ones(r, dtype=factors.dtype)
        else:
            rs = torch.as_tensor(list(rscales), dtype=factors.dtype).reshape(-1)
            if rs.numel() != r or not bool(torch.isfinite(rs).all()) or bool((rs < 0).any()):
                raise ConfigError(f"rscales must be {r} non-negative numbers (one per replicate)")
        return cls(factors=factors, method=method, scale=float(scale), rscales=rs, mse=bool(mse),
                   fay_rho=float(fay_rho), source=source)

    @property
    def n_replicates(self) -> int:
        return int(self.factors.shape[0])

    @functools.cached_property
    def df(self) -> int:
        r"""Degrees of freedom of the replicate variance: the rank of the centred replicate factors
        (the R ``survey`` package's ``degf``), at least 1; computed once, on one thread (an SVD of
        ``(R, G)``: threads only wait on each other at this size)."""
        a = self.factors - self.factors.mean(0, keepdim=True)
        with fit_threads(1):
            return max(int(torch.linalg.matrix_rank(a)), 1)

    def variance(self, estimates: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
        """:func:`replicate_variance` with this scheme's constants."""
        return replicate_variance(estimates, full, self.scale, self.rscales, self.mse)


def replicate_variance(estimates: torch.Tensor, full: torch.Tensor, scale: float, rscales: torch.Tensor,
                       mse: bool = True) -> torch.Tensor:
    r"""Replicate covariance :math:`c\sum_r\rho_r(\hat\gamma_r-\tilde\gamma)(\hat\gamma_r-\tilde\gamma)^\top`.

    Parameters
    ----------
    estimates : ``(R, k)`` replicate estimates; full : ``(k,)`` full-sample estimate.
    scale : :math:`c`; rscales : ``(R,)``; mse : centre at ``full`` (else at the replicate mean).

    Returns
    -------
    ``(k, k)``.
    """
    centre = full[None, :] if mse else estimates.mean(0, keepdim=True)
    d = estimates - centre
    rs = rscales.to(dtype=d.dtype, device=d.device)
    return scale * (d * rs[:, None]).transpose(0, 1) @ d


def zone_factors(zone: torch.Tensor, rep: torch.Tensor, n_zones: int, both_halves: bool = False) -> torch.Tensor:
    r"""Jackknife replicate factors from zones (TIMSS/PIRLS ``JKZONE``, ``JKREP``).

    Parameters
    ----------
    zone : int64 ``(G,)`` zone index in ``[0, n_zones)`` of each top-level unit.
    rep : int64 ``(G,)`` replicate indicator (0 or 1) of each top-level unit.
    both_halves : also form the complementary replicate of each zone.

    Returns
    -------
    ``(R, G)`` with :math:`R` = ``n_zones`` (or ``2 n_zones``, zone by zone: the replicate that
    doubles indicator 1, then the one that doubles indicator 0). In replicate :math:`h` a unit of zone
    :math:`h` gets factor :math:`2\cdot\mathrm{rep}` (or :math:`2(1-\mathrm{rep})`); all others 1.
    """
    g = zone.numel()
    dt = torch.float64
    in_zone = torch.nn.functional.one_hot(zone, n_zones).transpose(0, 1).to(dt)     # (H, G)
    doubled = 2.0 * rep.to(dt)
    first = 1.0 - in_zone + in_zone * doubled[None, :]
    if not both_halves:
        return first
    second = 1.0 - in_zone + in_zone * (2.0 - doubled)[None, :]
    return torch.stack([first, second], dim=1).reshape(2 * n_zones, g)
