"""Building blocks of the closed-form likelihood against torch.linalg and plain sums."""

from __future__ import annotations

import pytest
import torch

from torchmix.likelihood.gaussian import weighted_crossproducts
from torchmix.likelihood.smallmat import cholesky_lower, solve_lower


@pytest.mark.parametrize("q", [1, 2, 3, 4, 7])
def test_small_cholesky_and_solve_match_linalg(q):
    gen = torch.Generator().manual_seed(q)
    a = torch.randn(30, q, q, generator=gen, dtype=torch.float64)
    a = a @ a.transpose(1, 2) + 0.1 * torch.eye(q, dtype=torch.float64)
    b = torch.randn(30, q, 5, generator=gen, dtype=torch.float64)
    chol = cholesky_lower(a)
    torch.testing.assert_close(chol, torch.linalg.cholesky(a), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(solve_lower(chol, b), torch.linalg.solve_triangular(chol, b, upper=False),
                               rtol=1e-11, atol=1e-11)


def test_small_cholesky_gradients_match_linalg():
    # gradients through a symmetric parameterisation (the unrolled factor reads the lower triangle only)
    x0 = torch.tensor([[[2.0, 0.0], [0.5, 1.5]]], dtype=torch.float64)
    b = torch.tensor([[[1.0, 2.0], [3.0, -1.0]]], dtype=torch.float64)
    grads = []
    for chol_fn, solve_fn in ((cholesky_lower, solve_lower),
                              (torch.linalg.cholesky, lambda l, r: torch.linalg.solve_triangular(l, r, upper=False))):
        x = x0.clone().requires_grad_(True)
        a = x @ x.transpose(1, 2) + torch.eye(2, dtype=torch.float64)
        v = solve_fn(chol_fn(a), b)
        (g,) = torch.autograd.grad((v ** 2).sum() + torch.log(torch.diagonal(chol_fn(a), dim1=1, dim2=2)).sum(), x)
        grads.append(g)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", ["sorted", "shuffled", "skewed"])
def test_weighted_crossproducts_equal_plain_sums(layout):
    gen = torch.Generator().manual_seed(3)
    n_groups = 7
    if layout == "skewed":  # one very large group: the index_add branch
        group = torch.cat([torch.zeros(200, dtype=torch.int64), torch.arange(1, n_groups)])
    else:
        group = torch.repeat_interleave(torch.arange(n_groups), torch.tensor([3, 5, 1, 4, 4, 2, 6]))
    if layout == "shuffled":
        group = group[torch.randperm(group.numel(), generator=gen)]
    n = group.numel()
    m = torch.randn(n, 4, generator=gen, dtype=torch.float64)
    w = torch.rand(n, generator=gen, dtype=torch.float64) + 0.5
    cp = weighted_crossproducts(m, w, group, n_groups)
    for g in range(n_groups):
        rows = group == g
        expected = (m[rows] * w[rows, None]).T @ m[rows]
        torch.testing.assert_close(cp[g], expected, rtol=1e-12, atol=1e-12)
