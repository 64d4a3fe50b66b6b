"""Closed-form derivatives of the two-level gaussian likelihood equal automatic differentiation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch.func import hessian, jacfwd

from torchmix.api import _prepare
from torchmix.covariance import n_theta
from torchmix.likelihood import gaussian_grad as closed_form
from torchmix.likelihood.gaussian import GaussianLikelihood


def _data(n_groups=60, seed=4):
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(n_groups), rng.integers(3, 9, n_groups))
    n = len(g)
    x = rng.normal(size=(n, 3))
    y = 1 + x @ np.array([0.5, -0.3, 0.2]) + rng.normal(size=n_groups)[g] + 0.4 * rng.normal(size=n_groups)[g] * x[:, 0]
    y += rng.normal(0, 1.5, n)
    w2 = rng.uniform(1, 3, n_groups)
    return pd.DataFrame({"y": y, "x1": x[:, 0], "x2": x[:, 1], "x3": x[:, 2], "g": g,
                         "w1": w2[g] * rng.uniform(1, 2, n), "w2": w2[g]})


@pytest.mark.parametrize("re", ["(1 | g)", "(1 + x1 | g)", "(1 | g) + (0 + x1 | g)", "(1 + x1 + x2 | g)"])
def test_closed_forms_equal_autograd(re):
    t = _prepare(f"y ~ x1 + x2 + x3 + {re}", _data(), ["w1", "w2"], progress=False).design.tensors
    lik = GaussianLikelihood(t)
    assert closed_form.supported(lik)
    theta = torch.linspace(0.3, 1.1, n_theta(t.levels[0].term_sizes), dtype=torch.float64)
    x = theta.clone().requires_grad_(True)
    (grad_ad,) = torch.autograd.grad(lik([x]), x)
    ell, grad = closed_form.profiled_loglik(lik, theta)
    np.testing.assert_allclose(float(ell), float(lik([theta])), rtol=1e-13)
    np.testing.assert_allclose(grad.numpy(), grad_ad.numpy(), rtol=1e-10, atol=1e-10 * float(grad_ad.abs().max()))
    beta = torch.tensor([1.0, 0.5, -0.3, 0.2], dtype=torch.float64)
    sigma = torch.tensor(1.7, dtype=torch.float64)
    psi = torch.cat([beta, theta, sigma[None]])
    scores_ad = jacfwd(lambda v: lik.loglik_by_group(v[:4], [v[4:-1]], v[-1]))(psi)
    scores, k_bb, hess = closed_form.standard_error_pieces(lik, beta, theta, sigma)
    np.testing.assert_allclose(scores.numpy(), scores_ad.numpy(), rtol=1e-10, atol=1e-12 * float(scores_ad.abs().max()))
    hess_ad = hessian(lambda v: lik.loglik(beta, [v[:-1]], v[-1]))(psi[4:])
    np.testing.assert_allclose(hess.numpy(), hess_ad.numpy(), rtol=1e-10, atol=1e-12 * float(hess_ad.abs().max()))
    np.testing.assert_allclose(k_bb.numpy(), lik.k_top(lik.integrate([theta]))[:4, :4].numpy(), rtol=1e-13)


def test_three_levels_use_autograd():
    from conftest import simulate_nested

    d = simulate_nested(n_top=4, levels=3)
    t = _prepare("y ~ x + (1 | cls) + (1 | school)", d, ["w1c", "w2c", "w3c"], cweights=True,
                 progress=False).design.tensors
    assert not closed_form.supported(GaussianLikelihood(t))
