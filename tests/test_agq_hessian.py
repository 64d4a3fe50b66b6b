"""The closed-form Hessian of the two-level AGQ log-likelihood (one random effect, canonical link)
equals central differences of the exact gradient, adaptation of the nodes included."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from torchmix.api import _prepare
from torchmix.fit.glmm_se import fd_hessian
from torchmix.likelihood.agq import AGQLogLik
from torchmix.likelihood.agq_hessian import AGQHessian, supports
from torchmix.likelihood.segments import Grouping
from torchmix.quadrature import product_grid


def _data(family: str, seed: int = 5):
    """40 small groups (3 to 8 rows) with row and group weights and a group-level slope column."""
    rng = np.random.default_rng(seed)
    rows = []
    for j in range(40):
        u = rng.normal(0, 0.9)
        w2 = float(rng.integers(1, 4))
        for _ in range(int(rng.integers(3, 9))):
            x = rng.normal()
            eta = -0.2 + 0.6 * x + u
            y = rng.binomial(1, 1 / (1 + np.exp(-eta))) if family == "binomial" else rng.poisson(np.exp(eta))
            rows.append(dict(g=f"g{j}", x=x, d=float(rng.integers(0, 2)), y=float(y), w1=float(rng.integers(1, 4)),
                             w2=w2))
    return rows


def _setup(family: str, n_quad: int, formula: str = "y ~ x + d + (1 | g)", offset=None):
    import pandas as pd

    df = pd.DataFrame(_data(family))
    df["expo"] = 0.3 * np.sin(np.arange(len(df)))
    prep = _prepare(formula, df, ["w1", "w2"], cweights=True, family=family, progress=False, offset=offset)
    t = prep.design.tensors
    return t, prep.family, AGQLogLik(t, prep.family, n_quad)


def _fd_and_exact(t, family, module, psi, n_quad):
    p = t.n_fixed

    def grad(x):
        x = x.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            eta0, zls = module.pieces(x[:p], [x[p:].reshape(1, 1)])
            return torch.autograd.grad(module(eta0, zls).sum(), x)[0]

    fd = fd_hessian(grad, psi, torch.ones_like(psi, dtype=torch.bool))
    grad(psi)  # the modes at psi
    lv = t.levels[0]
    grid = product_grid(n_quad, 1)
    exact = AGQHessian(supports(family, t.n_levels, lv.q), t.X, t.offset, lv.Z[:, 0], t.w1_cond, lv.w_cond,
                       Grouping(lv.group, lv.n_groups), grid.nodes[:, 0], grid.log_weights_plus_norm)
    return fd, exact(t.y[:, None], psi[None], module.modes[0][:, 0][None])[0]


@pytest.mark.parametrize("family", ["binomial", "poisson"])
@pytest.mark.parametrize("n_quad", [1, 3, 13])
def test_exact_hessian_equals_central_differences(family, n_quad):
    t, fam, module = _setup(family, n_quad)
    psi = torch.tensor([-0.3, 0.5, 0.2, 0.8], dtype=torch.float64)  # not an optimum: the formula holds anywhere
    fd, exact = _fd_and_exact(t, fam, module, psi, n_quad)
    np.testing.assert_allclose(exact.numpy(), fd.numpy(), rtol=1e-6, atol=1e-6 * float(fd.abs().max()))


def test_poisson_with_an_offset():
    t, fam, module = _setup("poisson", 5, offset="expo")
    assert t.offset is not None
    psi = torch.tensor([-0.3, 0.5, 0.2, 0.8], dtype=torch.float64)
    fd, exact = _fd_and_exact(t, fam, module, psi, 5)
    np.testing.assert_allclose(exact.numpy(), fd.numpy(), rtol=1e-6, atol=1e-6 * float(fd.abs().max()))


def test_a_random_slope_column():
    """One random effect that is not an intercept: its column zeta enters every term."""
    t, fam, module = _setup("binomial", 5, "y ~ x + d + (0 + x | g)")
    psi = torch.tensor([-0.3, 0.5, 0.2, 0.7], dtype=torch.float64)
    fd, exact = _fd_and_exact(t, fam, module, psi, 5)
    np.testing.assert_allclose(exact.numpy(), fd.numpy(), rtol=1e-6, atol=1e-6 * float(fd.abs().max()))


def test_adaptation_terms_matter_with_few_nodes():
    """With 3 nodes on small groups the nodes' dependence on the parameters changes the Hessian far beyond
    the tolerance above, so the test would fail without the adaptation terms."""
    t, fam, module = _setup("binomial", 3)
    psi = torch.tensor([-0.3, 0.5, 0.2, 0.8], dtype=torch.float64)
    fd, exact = _fd_and_exact(t, fam, module, psi, 3)
    lv = t.levels[0]
    grid = product_grid(3, 1)
    # the same formula with the nodes held fixed: drop the adaptation (u_psi = L_psi = 0) by comparing
    # against a Hessian of the fixed-node function by autograd
    u = module.modes[0][:, 0]
    groups = Grouping(lv.group, lv.n_groups)
    with torch.no_grad():
        eta = t.X @ psi[:3] + lv.Z[:, 0] * psi[3] * u[lv.group]
        mu = torch.sigmoid(eta)
        big_l = torch.sqrt(groups.sum(t.w1_cond * mu * (1 - mu) * (lv.Z[:, 0] * psi[3]) ** 2) + 1)
        c = u[:, None] + grid.nodes[:, 0][None, :] / big_l[:, None]

    def fixed(x):
        e = (t.X @ x[:3])[:, None] + (lv.Z[:, 0] * x[3])[:, None] * c[lv.group]
        lf = torch.nn.functional.logsigmoid((2 * t.y - 1)[:, None] * e)
        tot = groups.sum(t.w1_cond[:, None] * lf) + grid.log_weights_plus_norm - 0.5 * c * c
        return (lv.w_cond * (torch.logsumexp(tot, 1) - torch.log(big_l))).sum()

    fixed_h = torch.autograd.functional.hessian(fixed, psi)
    assert float((fixed_h - fd).abs().max()) > 1e-3 * float(fd.abs().max())
    np.testing.assert_allclose(exact.numpy(), fd.numpy(), rtol=1e-6, atol=1e-6 * float(fd.abs().max()))


def test_supports_only_one_random_effect_and_canonical_links():
    from torchmix.families import get_family

    assert supports(get_family("binomial"), 2, 1) == "logit"
    assert supports(get_family("poisson"), 2, 1) == "poisson"
    assert supports(get_family("binomial"), 2, 2) is None
    assert supports(get_family("binomial"), 3, 1) is None
    assert supports(get_family("binomial", "probit"), 2, 1) is None


@pytest.mark.parametrize("in_order", [True, False])
def test_stacked_segment_matrix_equals_its_definition(in_order):
    """Grouping.stacked: entry cols[i, a] at (a G + g(i), i), built without coalescing."""
    from torchmix.likelihood.segments import Grouping

    gen = torch.Generator().manual_seed(3)
    index = torch.repeat_interleave(torch.arange(7), torch.tensor([3, 1, 4, 2, 5, 1, 4]))
    if not in_order:
        index = index[torch.randperm(index.numel(), generator=gen)]
    n, groups = index.numel(), 8  # the last group is empty
    cols = torch.randn(n, 3, dtype=torch.float64, generator=gen)
    dense = torch.zeros(3 * groups, n, dtype=torch.float64)
    for i in range(n):
        for a in range(3):
            dense[a * groups + int(index[i]), i] = cols[i, a]
    mat = Grouping(index, groups).stacked(cols)
    assert mat.shape == (3 * groups, n)
    assert torch.equal(mat.to_dense(), dense)
    x = torch.randn(n, 5, dtype=torch.float64, generator=gen)
    torch.testing.assert_close(mat @ x, dense @ x, rtol=1e-14, atol=1e-14)


def test_row_blocks_change_nothing(monkeypatch):
    """The node pass in many small row blocks (rows not stored in group order) gives the Hessian of one block."""
    import torchmix.likelihood.agq_hessian as agq_hessian

    t, fam, module = _setup("binomial", 5)
    lv = t.levels[0]
    assert not bool((lv.group[1:] >= lv.group[:-1]).all())
    psi = torch.tensor([-0.3, 0.5, 0.2, 0.8], dtype=torch.float64)
    _, whole = _fd_and_exact(t, fam, module, psi, 5)
    monkeypatch.setattr(agq_hessian, "BLOCK_ELEMS", 40)  # 8 rows a block: about one group each
    grid = product_grid(5, 1)
    small = AGQHessian("logit", t.X, t.offset, lv.Z[:, 0], t.w1_cond, lv.w_cond, Grouping(lv.group, lv.n_groups),
                       grid.nodes[:, 0], grid.log_weights_plus_norm)
    assert len(small.blocks) >= 20
    got = small(t.y[:, None], psi[None], module.modes[0][:, 0][None])[0]
    np.testing.assert_allclose(got.numpy(), whole.numpy(), rtol=1e-12, atol=1e-12 * float(whole.abs().max()))
