r"""Gauss-Hermite rules for the standard normal weight, and product grids (MATH.md 5.3).

The rule :math:`(z_m, \omega_m)_{m=1}^{M}` integrates against the standard normal density,

.. math::
    \int h(z)\,\varphi(z)\,dz \approx \sum_m \omega_m h(z_m), \qquad \sum_m \omega_m = 1,

and is exact for polynomials of degree :math:`\le 2M-1`. It comes from the physicists'
rule :math:`(x_m, v_m)` (weight :math:`e^{-x^2}`) by :math:`z_m = \sqrt2 x_m`,
:math:`\omega_m = v_m/\sqrt\pi` (lme4 ``GHrule``). For :math:`q` dimensions the full product
grid has :math:`M^q` nodes :math:`z_{\mathbf m}\in\mathbb R^q` with weights
:math:`\prod_r \omega_{m_r}`. Pure tensor math, float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .errors import ConfigError, NumericalError

__all__ = ["gauss_hermite", "product_grid", "QuadratureGrid", "check_n_quad", "check_grid_size", "MAX_N_QUAD",
           "MAX_GRID_VALUES"]

#: Largest number of points per random effect. Up to 369 points every float64 weight is a normal
#: (full-precision) number and the rule integrates the moments :math:`E z^{2k}` (k <= 4) to 1e-15; at
#: 370 the smallest weights become subnormal, from 371 they overflow to NaN (and the eigenproblem
#: behind the rule needs :math:`8M^2` bytes).
MAX_N_QUAD = 369

#: Largest number of node values :math:`N M^{q}` that one likelihood evaluation may compute
#: (:math:`2^{28}`, 2 GiB as float64); bigger grids are refused before anything is allocated.
MAX_GRID_VALUES = 2 ** 28


def check_n_quad(n_quad) -> int:
    """Validate the number of quadrature points per random effect.

    Non-integer values are rounded to the nearest integer (MATH.md 11, item 5).

    Raises
    ------
    ConfigError
        If ``n_quad`` is not a finite number, is ``<= 0`` after rounding, or exceeds
        :data:`MAX_N_QUAD`.
    """
    try:
        value = float(n_quad)
    except (TypeError, ValueError):
        raise ConfigError(f"n_quad must be a positive integer, got {n_quad!r}") from None
    if not math.isfinite(value):
        raise ConfigError(f"n_quad must be a positive integer, got {n_quad!r}")
    rounded = int(round(value))
    if rounded <= 0:
        raise ConfigError(f"n_quad must be a positive integer, got {n_quad!r}")
    if rounded > MAX_N_QUAD:
        raise ConfigError(f"n_quad={n_quad!r} is too large: at most {MAX_N_QUAD} Gauss-Hermite points per random "
                          "effect have accurate float64 weights (10 to 30 are usually plenty)")
    return rounded


def check_grid_size(n_quad: int, q_total: int, n_rows: int, itemsize: int = 8) -> int:
    r"""Refuse a quadrature grid whose node pass would be too big.

    One likelihood evaluation computes :math:`N M^{q}` values (:math:`N` rows, :math:`M` points per
    random effect, :math:`q` random effects over all levels). Computed with Python integers, so it
    cannot overflow.

    Returns
    -------
    int, the number of values :math:`N M^{q}`.

    Raises
    ------
    ConfigError
        If :math:`N M^{q} >` :data:`MAX_GRID_VALUES`; the message gives the size in values and bytes.
    """
    n_quad, q_total, n_rows = int(n_quad), int(q_total), int(n_rows)
    values = n_rows * n_quad ** q_total
    if values > MAX_GRID_VALUES:
        n_nodes = n_quad ** q_total
        gib = values * itemsize / 2 ** 30
        raise ConfigError(
            f"the quadrature grid is too big: n_quad={n_quad} with {q_total} random effects gives "
            f"{n_quad}^{q_total} = {n_nodes:.4g} nodes, {values:.4g} values over {n_rows} rows per likelihood "
            f"evaluation ({gib:.4g} GiB); at most {MAX_GRID_VALUES:.4g} values are allowed. Use a smaller n_quad "
            "(n_quad=1 is the Laplace approximation) or fewer random effects")
    return values


def gauss_hermite(n: int, dtype=torch.float64, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Gauss-Hermite nodes and weights for the standard normal density.

    Parameters
    ----------
    n : number of nodes :math:`M \ge 1` (``n = 1`` gives the single node 0 with weight 1,
        i.e. the Laplace approximation).

    Returns
    -------
    z : tensor ``(n,)`` nodes, ascending.
    w : tensor ``(n,)`` positive weights summing to 1.
    """
    n = check_n_quad(n)
    x, v = np.polynomial.hermite.hermgauss(n)
    z = np.sqrt(2.0) * x
    w = v / np.sqrt(np.pi)
    if not (np.isfinite(w).all() and (w > 0).all() and np.isfinite(z).all()):
        raise NumericalError(f"the {n}-point Gauss-Hermite rule is not accurate in float64; use fewer points")
    if n % 2 == 1:  # the middle node is exactly 0 by symmetry
        z[n // 2] = 0.0
    w = w / w.sum()
    return (torch.as_tensor(z, dtype=dtype, device=device),
            torch.as_tensor(w, dtype=dtype, device=device))


@dataclass(frozen=True)
class QuadratureGrid:
    r"""A product grid in :math:`q` dimensions.

    Attributes
    ----------
    nodes : tensor ``(M**q, q)``
    log_weights : tensor ``(M**q,)``, :math:`\log\prod_r\omega_{m_r}`.
    half_sq_norm : tensor ``(M**q,)``, :math:`\tfrac12\|z_{\mathbf m}\|^2`.
    """

    nodes: torch.Tensor
    log_weights: torch.Tensor
    half_sq_norm: torch.Tensor

    @property
    def n_nodes(self) -> int:
        return int(self.nodes.shape[0])

    @property
    def dim(self) -> int:
        return int(self.nodes.shape[1])

    @property
    def log_weights_plus_norm(self) -> torch.Tensor:
        r""":math:`\log\omega_{\mathbf m} + \tfrac12\|z_{\mathbf m}\|^2`, the node term of (5.1)."""
        return self.log_weights + self.half_sq_norm


def product_grid(n: int, q: int, dtype=torch.float64, device=None) -> QuadratureGrid:
    r"""Full product Gauss-Hermite grid with ``n`` points per dimension in ``q`` dimensions.

    Nodes are ordered lexicographically (the last coordinate varies fastest).

    Returns
    -------
    QuadratureGrid with ``n**q`` nodes (``q = 0`` gives one node of dimension 0, weight 1).
    """
    z, w = gauss_hermite(n, dtype=dtype, device=device)
    q = int(q)
    if q < 0:
        raise ConfigError(f"the grid dimension must be >= 0, got {q}")
    if q == 0:
        nodes = torch.zeros(1, 0, dtype=dtype, device=device)
        logw = torch.zeros(1, dtype=dtype, device=device)
    else:
        mesh = torch.meshgrid(*([z] * q), indexing="ij")
        nodes = torch.stack([m.reshape(-1) for m in mesh], dim=-1)
        wmesh = torch.meshgrid(*([w.log()] * q), indexing="ij")
        logw = torch.stack([m.reshape(-1) for m in wmesh], dim=-1).sum(-1)
    return QuadratureGrid(nodes=nodes, log_weights=logw, half_sq_norm=0.5 * (nodes ** 2).sum(-1))
