"""Batched GLMM values on a small 2-level logit model equal separate fits (standard errors included);
the same values batched in other company give the same numbers; the closed-form Jacobian of the
variance components."""

from __future__ import annotations

import numpy as np
import torch

import torchmix.fit.glmm_many as gm
from torchmix.fit.glmm import fit_glmm

from glmm_support import binary_values


def _assert_like_separate(outs, t, fam, ys):
    for j in range(1, ys.shape[1]):
        assert outs[j].extra["batched"]
        sep = fit_glmm(t.with_response(ys[:, j]), fam, n_quad=5, progress=False)
        np.testing.assert_allclose(outs[j].lnl, sep.lnl, rtol=1e-10)
        np.testing.assert_allclose(outs[j].beta.numpy(), sep.beta.numpy(), rtol=1e-6, atol=1e-10)
        for cov in ("cov_beta", "tau_cov", "cov_beta_model"):  # standard errors
            se_b, se_s = (getattr(o, cov).diagonal().sqrt().numpy() for o in (outs[j], sep))
            np.testing.assert_allclose(se_b, se_s, rtol=1e-6)


def test_batched_values_give_the_separate_fits_standard_errors():
    t, fam, ys = binary_values()
    _assert_like_separate(gm.fit_glmm_many(t, fam, ys, n_quad=5, progress=False), t, fam, ys)


def test_a_value_does_not_depend_on_the_values_batched_with_it():
    """Value 2 batched with values 1 and 3 equals value 2 batched alone (to 1e-10), as when the
    values are shared out over processes."""
    t, fam, ys = binary_values(4)
    first = fit_glmm(t.with_response(ys[:, 0]), fam, n_quad=5, progress=False)
    together = gm.fit_glmm_many(t, fam, ys, n_quad=5, progress=False, first=first)[2]
    alone = gm.fit_glmm_many(t, fam, ys[:, [0, 2]], n_quad=5, progress=False, first=first)[1]
    assert together.extra["batched"] and alone.extra["batched"]
    np.testing.assert_allclose(together.beta.numpy(), alone.beta.numpy(), rtol=1e-10)
    np.testing.assert_allclose(together.cov_beta.numpy(), alone.cov_beta.numpy(), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(together.tau_cov.numpy(), alone.tau_cov.numpy(), rtol=1e-10)


def test_tau_jacobian_closed_form_equals_autograd():
    from torchmix.covariance import n_theta
    from torchmix.fit.glmm_se import tau_jacobian, tau_of_theta
    gen = torch.Generator().manual_seed(0)
    for ts in ([[1]], [[2]], [[2, 1], [1]], [[3]], [[1, 2], [2]]):
        theta = torch.randn(sum(n_theta(t) for t in ts), dtype=torch.float64, generator=gen)
        ref = torch.autograd.functional.jacobian(lambda t: tau_of_theta(t, ts), theta)
        np.testing.assert_allclose(tau_jacobian(theta, ts).numpy(), ref.numpy(), rtol=1e-14, atol=1e-15)


def test_an_evaluation_that_fails_rejects_the_trial_point(monkeypatch):
    """A stacked evaluation whose curvature is not positive definite (LinAlgError) rejects its trial
    points; the values still end where separate fits do."""
    from torchmix.likelihood.agq import AGQLogLik
    t, fam, ys = binary_values()
    original = AGQLogLik.forward
    calls = []

    def flaky(self, eta0, zls, kappa=None):
        calls.append(1)
        if len(calls) == 2:  # the first trial step
            raise torch.linalg.LinAlgError("a curvature block is not positive definite")
        return original(self, eta0, zls, kappa)
    first = fit_glmm(t.with_response(ys[:, 0]), fam, n_quad=5, progress=False)
    monkeypatch.setattr(AGQLogLik, "forward", flaky)
    outs = gm.fit_glmm_many(t, fam, ys, n_quad=5, progress=False, first=first)
    monkeypatch.setattr(AGQLogLik, "forward", original)
    _assert_like_separate(outs, t, fam, ys)
