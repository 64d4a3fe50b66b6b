r"""The tensor-level description of a model, shared by every likelihood and fitter.

:class:`ModelTensors` is what the pandas-facing :mod:`torchmix.design` hands to the pure
math modules: the long layout of MATH.md (one row per level-1 unit plus integer maps),
already cleaned and with weights converted. Levels are indexed from 0 for level 2
(``levels[0]`` is the lowest grouping level, ``levels[-1]`` the top).

:class:`FitOutput` is what a fitter returns, whatever the family; the results module
turns it into labelled pandas objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

import torch

__all__ = ["LevelTensors", "ModelTensors", "FitOutput"]


@dataclass(frozen=True)
class LevelTensors:
    r"""One grouping level :math:`l \ge 2`.

    Attributes
    ----------
    Z : tensor ``(N, q)``
        Random-effect design columns of this level, terms side by side.
    term_sizes : tuple of int
        Column count :math:`q_t` of each term (block-diagonal :math:`\Lambda`).
    group : int64 tensor ``(N,)``
        Index in ``[0, n_groups)`` of each row's group at this level.
    parent : int64 tensor ``(n_groups,)`` or None
        Index of each group's parent at the next level up; None at the top.
    n_groups : int
    w_cond : tensor ``(n_groups,)``
        Conditional weight :math:`w_{g\mid h}` of each group given its parent; at the
        top level the unconditional weight :math:`w^{(L)}_g`.
    w_uncond : tensor ``(n_groups,)``
        Unconditional weight :math:`w^{(l)}_g`.
    top : int64 tensor ``(n_groups,)``
        Index of each group's top-level ancestor (itself at the top).
    """

    Z: torch.Tensor
    term_sizes: tuple
    group: torch.Tensor
    parent: Optional[torch.Tensor]
    n_groups: int
    w_cond: torch.Tensor
    w_uncond: torch.Tensor
    top: torch.Tensor

    @property
    def q(self) -> int:
        return int(sum(self.term_sizes))


@dataclass(frozen=True)
class ModelTensors:
    r"""Everything a likelihood needs, as tensors on one device and dtype.

    Attributes
    ----------
    X : tensor ``(N, p)`` fixed-effect design.
    y : tensor ``(N,)`` response (already validated/recoded by the family).
    w1_cond : tensor ``(N,)`` conditional level-1 weight :math:`w_{i\mid j}`.
    w1_uncond : tensor ``(N,)`` unconditional level-1 weight :math:`w^{(1)}_i`.
    levels : tuple of :class:`LevelTensors`, level 2 first.
    offset : tensor ``(N,)`` or None, a known term added to the linear predictor
        (:math:`\eta = X\beta + Zb + \text{offset}`).
    """

    X: torch.Tensor
    y: torch.Tensor
    w1_cond: torch.Tensor
    w1_uncond: torch.Tensor
    levels: tuple
    offset: Optional[torch.Tensor] = None

    @property
    def n_obs(self) -> int:
        return int(self.X.shape[0])

    @property
    def n_fixed(self) -> int:
        return int(self.X.shape[1])

    @property
    def n_levels(self) -> int:
        """:math:`L`, counting level 1."""
        return len(self.levels) + 1

    @property
    def row_top(self) -> torch.Tensor:
        """int64 ``(N,)``: index of each row's top-level group."""
        return self.levels[0].top[self.levels[0].group]

    def with_response(self, y: torch.Tensor) -> "ModelTensors":
        """The same model with another response vector (plausible values)."""
        return replace(self, y=y)

    def to(self, device=None, dtype=None) -> "ModelTensors":
        """Move every tensor; floating tensors also take ``dtype``."""

        def mv(t):
            if t is None:
                return None
            if t.is_floating_point():
                return t.to(device=device, dtype=dtype or t.dtype)
            return t.to(device=device)

        levels = tuple(
            replace(
                lv,
                Z=mv(lv.Z),
                group=mv(lv.group),
                parent=mv(lv.parent),
                w_cond=mv(lv.w_cond),
                w_uncond=mv(lv.w_uncond),
                top=mv(lv.top),
            )
            for lv in self.levels
        )
        return ModelTensors(
            X=mv(self.X), y=mv(self.y), w1_cond=mv(self.w1_cond), w1_uncond=mv(self.w1_uncond), levels=levels,
            offset=mv(self.offset),
        )


@dataclass
class FitOutput:
    r"""What a fitter returns (unlabelled; :mod:`torchmix.results` adds names).

    Attributes
    ----------
    beta : ``(p,)`` fixed effects.
    cov_beta : ``(p, p)`` sandwich covariance of ``beta``.
    cov_beta_model : ``(p, p)`` or None, model-based (inverse Hessian) covariance.
    theta : list of ``(n_theta_l,)`` per level, sign-normalised Cholesky entries
        (relative to sigma for the gaussian family, absolute otherwise).
    sigma : residual standard deviation (gaussian) or None.
    tau : ``(n_tau,)`` variance components in reporting order (residual last, gaussian).
    tau_cov : ``(n_tau, n_tau)`` covariance of ``tau`` (``var_theta``).
    lnl : weighted (pseudo) log-likelihood at the estimates.
    u : list of ``(G_l, q_l)`` spherical modes per level.
    b : list of ``(G_l, q_l)`` random-effect predictions :math:`\Lambda_l u`.
    converged, iterations, message : optimiser status.
    scores : ``(G_L, k)`` or None, per-top-group scores at the estimates.
    extra : free-form diagnostics (gradient norm, n_quad, timings).
    """

    beta: torch.Tensor
    cov_beta: torch.Tensor
    cov_beta_model: Optional[torch.Tensor]
    theta: list
    sigma: Optional[float]
    tau: torch.Tensor
    tau_cov: torch.Tensor
    lnl: float
    u: list
    b: list
    converged: bool
    iterations: int
    message: str = ""
    scores: Optional[torch.Tensor] = None
    extra: dict = field(default_factory=dict)
