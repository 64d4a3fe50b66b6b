"""Gauss-Hermite rules for the standard normal and product grids (MATH.md 5.3)."""

import math

import numpy as np
import pytest
import torch

from torchmix.errors import ConfigError
from torchmix.quadrature import check_n_quad, gauss_hermite, product_grid


def normal_moment(k: int) -> float:
    """E[Z^k] for Z ~ N(0, 1): 0 for odd k, (k-1)!! for even k."""
    return 0.0 if k % 2 else float(math.prod(range(k - 1, 0, -2)))


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 13, 20])
def test_rule_is_exact_to_degree_2n_minus_1(n):
    z, w = gauss_hermite(n)
    assert z.dtype == torch.float64 and w.dtype == torch.float64
    assert bool((w > 0).all())
    for k in range(2 * n):
        got = float((w * z ** k).sum())
        scale = float((w * z.abs() ** k).sum())  # rounding of the odd moments is relative to this
        assert got == pytest.approx(normal_moment(k), rel=1e-12, abs=1e-13 * scale)
    # and not beyond (degree 2n is off for every n)
    assert float((w * z ** (2 * n)).sum()) != pytest.approx(normal_moment(2 * n), rel=1e-6)


def test_laplace_rule_and_symmetry():
    z, w = gauss_hermite(1)
    assert z.tolist() == [0.0] and w.tolist() == [1.0]
    z, w = gauss_hermite(13)
    assert float(z[6]) == 0.0
    torch.testing.assert_close(z, -z.flip(0), rtol=0, atol=1e-13)
    torch.testing.assert_close(w, w.flip(0), rtol=1e-13, atol=0)


def test_product_grid_integrates_products_and_orders_nodes():
    grid = product_grid(5, 2)
    assert grid.nodes.shape == (25, 2) and grid.n_nodes == 25 and grid.dim == 2
    w = grid.log_weights.exp()
    assert float(w.sum()) == pytest.approx(1.0, rel=1e-14)
    # E[Z1^2 Z2^4] = 1 * 3, E[Z1 Z2] = 0, E[exp(Z1 + Z2)] ~ e
    z1, z2 = grid.nodes[:, 0], grid.nodes[:, 1]
    assert float((w * z1 ** 2 * z2 ** 4).sum()) == pytest.approx(3.0, rel=1e-12)
    assert float((w * z1 * z2).sum()) == pytest.approx(0.0, abs=1e-14)
    torch.testing.assert_close(grid.half_sq_norm, 0.5 * (grid.nodes ** 2).sum(1))
    # lexicographic: last coordinate fastest
    z, _ = gauss_hermite(5)
    torch.testing.assert_close(grid.nodes[:5, 1], z)
    assert bool((grid.nodes[:5, 0] == z[0]).all())
    empty = product_grid(7, 0)
    assert empty.nodes.shape == (1, 0) and float(empty.log_weights[0]) == 0.0


def test_three_dimensional_grid_weights():
    grid = product_grid(3, 3)
    assert grid.n_nodes == 27
    w = grid.log_weights.exp()
    assert float((w * (grid.nodes ** 2).sum(1)).sum()) == pytest.approx(3.0, rel=1e-13)
    assert float((grid.log_weights_plus_norm - grid.log_weights - grid.half_sq_norm).abs().max()) == 0.0


@pytest.mark.parametrize("bad", [0, -3, 0.4, float("nan"), "many", None])
def test_bad_n_quad(bad):
    with pytest.raises(ConfigError, match="n_quad"):
        check_n_quad(bad)


def test_non_integer_n_quad_is_rounded():
    assert check_n_quad(7.4) == 7 and check_n_quad(12.6) == 13 and check_n_quad(np.int64(5)) == 5
    z, _ = gauss_hermite(4.6)
    assert z.shape == (5,)
    assert math.isclose(float(gauss_hermite(2)[0][1]), 1.0, rel_tol=1e-14)
