"""Stacked GLMM values: an evaluation of some values equals the same evaluation with every value in the
stack (results of the others dropped), and a warm start of the modes changes nothing beyond rounding."""

from __future__ import annotations

import numpy as np
import torch

import torchmix.fit.glmm_many as gm
from torchmix.fit.glmm import fit_glmm
from torchmix.likelihood.agq import AGQLogLik
from torchmix.likelihood.warm_modes import warm_modes

from glmm_support import binary_values


def _problem(k=7):
    t, fam, ys = binary_values(k)
    first = fit_glmm(t.with_response(ys[:, 0]), fam, n_quad=5, progress=False)
    return t, fam, ys, first


def _points(k):
    """A point per value, away from the first value's estimates (on the original columns)."""
    return torch.linspace(-0.2, 0.2, k, dtype=torch.float64)


def _evaluate(t, fam, ys, first, rows, shifts):
    prob = gm._Stacked(t, ys[:, 1:], fam, 5, first)
    psi = first.beta.new_zeros(prob.k, t.n_fixed + 1)
    psi[:, :t.n_fixed] = first.beta
    psi[:, t.n_fixed] = first.theta[0][0] * 0.9
    psi[:, 0] += shifts
    val, grad, (ell, row_grads) = prob.value_grad(psi, rows)
    return val, grad, ell, row_grads, [u[rows] for u in prob.u]


def test_a_small_subset_and_the_whole_stack_give_the_same_values():
    t, fam, ys, first = _problem()
    one = torch.zeros(ys.shape[1] - 1, dtype=torch.bool)
    one[4] = True  # fewer than a third of the values: a module over that value alone
    many = torch.ones_like(one)
    many[[0, 2]] = False  # more than a third: the whole stack, two values dropped
    for rows in (one, many):
        shifts = _points(len(one))
        alone = [_evaluate(t, fam, ys[:, [0, 1 + j]], first, torch.ones(1, dtype=torch.bool), shifts[j:j + 1])
                 for j in torch.nonzero(rows).flatten().tolist()]
        val, grad, ell, row_grads, modes = _evaluate(t, fam, ys, first, rows, shifts)
        assert val.shape == (int(rows.sum()),) and ell.shape[0] == int(rows.sum())
        n = t.n_obs
        for i, ref in enumerate(alone):
            np.testing.assert_allclose(val[i].item(), ref[0][0].item(), rtol=1e-12)
            np.testing.assert_allclose(grad[i].numpy(), ref[1][0].numpy(), rtol=1e-9, atol=1e-12)
            np.testing.assert_allclose(row_grads[0][i * n:(i + 1) * n].numpy(), ref[3][0].numpy(), rtol=1e-9,
                                       atol=1e-12)
            np.testing.assert_allclose(modes[0][i].numpy(), ref[4][0][0].numpy(), rtol=1e-9, atol=1e-12)


def test_a_warm_start_of_the_modes_leaves_the_evaluation_unchanged():
    t, fam, ys, first = _problem(2)
    tt = t.with_response(ys[:, 1])
    beta, lam = first.beta * 0.8, [first.theta[0][0] * 1.3]
    out = []
    for warm in (False, True):
        module = AGQLogLik(tt, fam, 5)
        module.set_modes([m + 1.5 for m in first.u])  # far from the modes of this response
        eta0 = tt.X @ beta
        zls = [tt.levels[0].Z * lam[0]]
        if warm:
            assert warm_modes(module, eta0, zls)
            assert not torch.allclose(module.modes[0], first.u[0] + 1.5)
        out.append((module(eta0, zls).detach(), module.modes[0]))
    np.testing.assert_allclose(out[1][0].numpy(), out[0][0].numpy(), rtol=1e-12)
    np.testing.assert_allclose(out[1][1].numpy(), out[0][1].numpy(), rtol=1e-9, atol=1e-12)


def test_the_warm_start_applies_only_to_canonical_links_with_one_effect():
    t, fam, ys, first = _problem(2)
    from torchmix.families import get_family
    probit = get_family("binomial", "probit")
    module = AGQLogLik(t.with_response(ys[:, 1]), probit, 5)
    assert not warm_modes(module, t.X @ first.beta, [t.levels[0].Z])


class _Quadratic:
    """Values k with log-likelihood -(psi - a_k)' H_k (psi - a_k) / 2, the interface of the stacked values."""

    def __init__(self, hess, centre):
        self.hess, self.centre, self.k = hess, centre, hess.shape[0]

    def value_grad(self, psi, rows):
        d = (psi - self.centre)[rows]
        hd = (self.hess[rows] @ d[:, :, None])[:, :, 0]
        return -0.5 * (d * hd).sum(1), -hd, None

    def keep(self, rows, take, extra):
        pass


def test_quasi_newton_updates_reach_the_optimum_and_sr1_needs_fewer_steps():
    rng = np.random.default_rng(0)
    k, m = 5, 4
    a = torch.as_tensor(rng.normal(size=(k, m, m)))
    hess = a @ a.transpose(1, 2) + m * torch.eye(m, dtype=torch.float64)
    centre = torch.as_tensor(rng.normal(size=(k, m)))
    prob = _Quadratic(hess, centre)
    psi = torch.zeros(k, m, dtype=torch.float64)
    val, g, _ = prob.value_grad(psi, torch.ones(k, dtype=torch.bool))
    start = hess.mean(0).expand(k, -1, -1)  # a shared approximation, as the first value's Hessian
    every = torch.ones(k, dtype=torch.bool)
    found = {}
    for update in ("bfgs", "sr1"):
        out = gm._newton(prob, psi, val, g, start, every, 1e-12, 30, update=update)
        np.testing.assert_allclose(out[0].numpy(), centre.numpy(), atol=1e-11)
        assert not bool(out[4].any())
        found[update] = out[3]
    assert bool((found["sr1"] <= found["bfgs"]).all()) and int(found["sr1"].sum()) < int(found["bfgs"].sum())


def test_an_evaluation_that_fails_at_a_value_not_asked_for_is_made_without_it():
    t, fam, ys, first = _problem()
    prob = gm._Stacked(t, ys[:, 1:], fam, 5, first)
    psi = torch.cat([first.beta, first.theta[0] * 0.9]).expand(prob.k, -1).clone()
    psi[0] = torch.tensor([0.0, 0.0, -1e300], dtype=psi.dtype)  # a point where value 0 cannot be evaluated
    rows = torch.ones(prob.k, dtype=torch.bool)
    assert not bool(torch.isfinite(prob.value_grad(psi, rows)[0][0]))
    rows[0] = False
    val, grad, _ = prob.value_grad(psi, rows)
    ref = _evaluate(t, fam, ys[:, [0, 2]], first, torch.ones(1, dtype=torch.bool), torch.zeros(1, dtype=torch.float64))
    assert bool(torch.isfinite(val).all())
    np.testing.assert_allclose(val[0].item(), ref[0][0].item(), rtol=1e-12)
