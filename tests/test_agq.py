"""The AGQ log-likelihood module against references, brute-force integrals and exact identities."""

import math

import numpy as np
import pytest
import torch

from conftest import sleepstudy_weighted
from glmm_support import brute_force_loglik, frame_tensors, logit_logf, make_tensors, one_thread, simulate  # noqa: F401
from torchmix.covariance import lambda_from_theta
from torchmix.families import get_family
from torchmix.likelihood.agq import AGQLogLik
from torchmix.likelihood.gaussian import gaussian_loglik_by_group

F64 = torch.float64


def t(*v):
    return torch.tensor(v, dtype=F64)


def sleep_tensors(weighted: bool):
    df = sleepstudy_weighted()
    y = (df["Reaction"] > 300).astype(float)
    X = np.c_[np.ones(len(df)), df["Days"]]
    c1, c2 = (df["c1"], df["c2"]) if weighted else (np.ones(len(df)), np.ones(len(df)))
    return make_tensors(y, X, np.ones(len(df)), df["Subject"], c1, c2)


def test_reference_values_sleepstudy():
    """MATH.md 12 (c): l(beta=(-3, 0.5), tau=2) = -159.3754601 (weighted); (e) glmer nAGQ=13 value."""
    fam = get_family("binomial")
    m = AGQLogLik(sleep_tensors(True), fam, 13)
    ell = m.loglik(t(-3.0, 0.5), [t(math.sqrt(2.0)).reshape(1, 1)])
    assert ell.shape == (18,)
    assert float(ell.sum()) == pytest.approx(-159.3754601, rel=1e-9)
    m = AGQLogLik(sleep_tensors(False), fam, 13)
    ell = m.loglik(t(-3.195817792, 0.584923249), [t(math.sqrt(3.096541344)).reshape(1, 1)])
    assert float(ell.sum()) == pytest.approx(-86.990422858, rel=1e-10)


def _gaussian_case(levels, seed=3):
    rng = np.random.default_rng(seed)
    n = 160
    k = rng.integers(0, 5, n)
    g = k * 10 + rng.integers(0, 4, n)
    x, x2 = rng.normal(size=n), rng.normal(size=n)
    y = 1 + 0.5 * x + rng.normal(size=n) + 0.7 * rng.normal(size=50)[g]
    c1 = rng.uniform(0.5, 2.0, n)
    c2 = 1.0 + (g % 3) * 0.4
    c3 = 1.0 + (k % 2) * 0.7
    X = np.c_[np.ones(n), x]
    Z2 = np.c_[np.ones(n), x, x2]  # two terms at level 2: (1 + x | g) + (0 + x2 | g)
    if levels == 2:
        return make_tensors(y, X, Z2, g, c1, c2, term_sizes2=(2, 1))
    return make_tensors(y, X, Z2, g, c1, c2, Z3=np.c_[np.ones(n)], g3=k, c3=c3, term_sizes2=(2, 1))


@pytest.mark.parametrize("levels", [2, 3])
@pytest.mark.parametrize("n_quad", [1, 3, 8])
def test_v6_gaussian_through_agq_equals_closed_form(levels, n_quad):
    tens = _gaussian_case(levels)
    fam = get_family("gaussian")
    beta, sigma = t(0.8, 0.3), 1.3
    thetas = [t(0.7, 0.2, 0.4, 0.6)] + ([t(0.9)] if levels == 3 else [])  # relative Cholesky entries
    ref = gaussian_loglik_by_group(tens, beta, thetas, sigma)
    sizes = [(2, 1), (1,)]
    lams = [sigma * lambda_from_theta(th, ts) for th, ts in zip(thetas, sizes)]
    got = AGQLogLik(tens, fam, n_quad).loglik(beta, lams, kappa=sigma ** 2)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("n_quad", [1, 4])
def test_v6_three_levels_with_correlated_effects_at_the_top(n_quad):
    rng = np.random.default_rng(7)
    n = 120
    k = rng.integers(0, 5, n)
    g = k * 10 + rng.integers(0, 4, n)
    x = rng.normal(size=n)
    y = 1 + 0.5 * x + rng.normal(size=n)
    both = np.c_[np.ones(n), x]
    tens = make_tensors(y, both, both, g, rng.uniform(0.5, 2, n), 1.0 + (g % 3) * 0.4, Z3=both, g3=k,
                        c3=1.0 + (k % 2) * 0.7)
    beta, sigma = t(0.8, 0.3), 1.3
    thetas = [t(0.7, 0.2, 0.4), t(0.9, -0.3, 0.5)]
    ref = gaussian_loglik_by_group(tens, beta, thetas, sigma)
    lams = [sigma * lambda_from_theta(th, (2,)) for th in thetas]
    got = AGQLogLik(tens, get_family("gaussian"), n_quad).loglik(beta, lams, kappa=sigma ** 2)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)


def test_v6_gaussian_dispersion_gradient():
    """With a differentiable dispersion the module falls back to plain autograd; gradients match."""
    tens = _gaussian_case(2)
    m = AGQLogLik(tens, get_family("gaussian"), 3)
    beta, th = t(0.8, 0.3), t(0.7, 0.2, 0.4, 0.6)

    def ref(s):
        return gaussian_loglik_by_group(tens, beta, [th / s], s).sum()

    s = torch.tensor(1.3, dtype=F64, requires_grad=True)
    lam = lambda_from_theta(th, (2, 1))
    val = m.loglik(beta, [lam], kappa=s * s).sum()
    (g,) = torch.autograd.grad(val, s)
    s2 = s.detach().clone().requires_grad_(True)
    (g_ref,) = torch.autograd.grad(ref(s2), s2)
    assert float(val.detach()) == pytest.approx(float(ref(s.detach())), rel=1e-10)
    assert float(g) == pytest.approx(float(g_ref), rel=1e-8)


def test_v13_three_level_logit_converges_to_brute_force():
    df = simulate("binomial", n_top=4, n_mid=3, rows=(3, 5), levels=3, seed=11)
    tens = frame_tensors(df, levels=3)
    beta, sd2, sd3 = (-0.3, 0.7), 1.1, 0.8
    exact = brute_force_loglik(df, beta, sd2, sd3, logf=logit_logf)
    fam = get_family("binomial")
    errs = {}
    for m in (1, 3, 5, 9, 13):
        mod = AGQLogLik(tens, fam, m)
        errs[m] = abs(float(mod.loglik(t(*beta), [t(sd2).reshape(1, 1), t(sd3).reshape(1, 1)]).sum()) - exact)
    assert errs[5] < 1e-2
    assert errs[13] < 1e-6 * abs(exact)
    assert errs[13] < errs[5] < errs[1] and errs[9] < errs[3]


@pytest.mark.parametrize("link", ["logit", "probit"])
def test_two_level_agq_matches_brute_force(link):
    df = simulate("binomial", n_top=10, rows=(2, 9), seed=5, link=link)
    fam = get_family("binomial", link)

    def logf(y, eta):
        return fam.logf(torch.as_tensor(y, dtype=F64), torch.as_tensor(eta, dtype=F64)).numpy()

    beta, sd2 = (0.2, -0.5), 1.4
    exact = brute_force_loglik(df, beta, sd2, logf=logf)
    err = {m: abs(float(AGQLogLik(frame_tensors(df), fam, m).loglik(t(*beta), [t(sd2).reshape(1, 1)]).sum()) - exact)
           for m in (5, 13, 35)}
    assert err[35] < 1e-10 * abs(exact) and err[13] < 1e-6 * abs(exact) and err[35] < err[13] < err[5]


def test_correlated_intercept_and_slope_matches_2d_brute_force():
    df = simulate("binomial", n_top=5, rows=(3, 6), slope=True, seed=2)
    tens = frame_tensors(df, slope=True)
    fam = get_family("binomial")
    beta = t(-0.1, 0.5)
    theta = t(1.2, -0.4, 0.6)
    lam = lambda_from_theta(theta, (2,))
    got = AGQLogLik(tens, fam, 25).loglik(beta, [lam])
    coarse = AGQLogLik(tens, fam, 7).loglik(beta, [lam])
    # brute force: 2-d trapezoid over u in [-8, 8]^2 with b = Lambda u
    z = torch.linspace(-8, 8, 321, dtype=F64)
    dz = float(z[1] - z[0])
    wz = torch.full_like(z, dz)
    wz[[0, -1]] /= 2
    u1, u2 = torch.meshgrid(z, z, indexing="ij")
    u = torch.stack([u1.reshape(-1), u2.reshape(-1)], 1)
    logw = (wz[:, None] * wz[None, :]).log().reshape(-1) - 0.5 * (u ** 2).sum(1) - math.log(2 * math.pi)
    b = u @ lam.T
    x = torch.as_tensor(df["x"].to_numpy(), dtype=F64)
    y = torch.as_tensor(df["y"].to_numpy(), dtype=F64)
    c1 = torch.as_tensor(df["c1"].to_numpy(), dtype=F64)
    codes = tens.levels[0].group
    for j in range(tens.levels[0].n_groups):
        rows = codes == j
        eta = (beta[0] + beta[1] * x[rows])[:, None] + b[:, 0][None, :] + x[rows][:, None] * b[:, 1][None, :]
        ll = (c1[rows][:, None] * fam.logf(y[rows][:, None], eta)).sum(0)
        ref_j = float(tens.levels[0].w_cond[j]) * float(torch.logsumexp(ll + logw, 0))
        assert float(got[j]) == pytest.approx(ref_j, rel=1e-10)
        assert abs(float(got[j]) - ref_j) < abs(float(coarse[j]) - ref_j)


def test_laplace_is_the_joint_laplace_formula():
    """n_quad = 1: sum w1u log f(eta_hat) - 1/2 sum w2 |u_hat|^2 - sum w2 log|R| (MATH.md 5.5)."""
    df = simulate("binomial", n_top=9, seed=4, slope=True)
    tens = frame_tensors(df, slope=True)
    fam = get_family("binomial")
    beta, lam = t(0.3, -0.2), lambda_from_theta(t(1.1, 0.3, 0.5), (2,))
    mod = AGQLogLik(tens, fam, 1)
    ell = mod.loglik(beta, [lam])
    u = mod.modes[0]
    lv = tens.levels[0]
    zl = lv.Z @ lam
    eta = tens.X @ beta + (zl * u[lv.group]).sum(1)
    w = fam.fisher_w(eta) * tens.w1_cond
    hess = torch.zeros(lv.n_groups, 2, 2, dtype=F64).index_add(0, lv.group, w[:, None, None] * zl[:, :, None]
                                                                * zl[:, None, :]) + torch.eye(2, dtype=F64)
    expected = (float((tens.w1_uncond * fam.logf(tens.y, eta)).sum()) - 0.5 * float((lv.w_uncond * (u ** 2).sum(1)).sum())
                - 0.5 * float((lv.w_uncond * torch.logdet(hess)).sum()))
    assert float(ell.sum()) == pytest.approx(expected, rel=1e-12)
    # the modes maximise g_j: the gradient vanishes
    grad = torch.zeros(lv.n_groups, 2, dtype=F64).index_add(
        0, lv.group, (tens.w1_cond * (tens.y - torch.sigmoid(eta)))[:, None] * zl) - u
    assert float(grad.abs().max()) < 1e-9


@pytest.mark.parametrize("n_quad", [1, 7])
def test_zero_variance_gives_the_glm_likelihood(n_quad):
    df = simulate("poisson", levels=3, seed=8)
    tens = frame_tensors(df, levels=3)
    fam = get_family("poisson")
    beta = t(0.1, 0.4)
    zero = torch.zeros(1, 1, dtype=F64)
    ell = AGQLogLik(tens, fam, n_quad).loglik(beta, [zero, zero])
    expected = float((tens.w1_uncond * fam.logf(tens.y, tens.X @ beta)).sum())
    assert float(ell.sum()) == pytest.approx(expected, rel=1e-12)


CASES = [("binomial", "logit"), ("binomial", "probit"), ("binomial", "cloglog"), ("poisson", "log")]


@pytest.mark.parametrize("fam_name,link", CASES)
@pytest.mark.parametrize("levels", [2, 3])
def test_gradient_equals_finite_differences(fam_name, link, levels):
    df = simulate(fam_name, levels=levels, slope=True, seed=6, link=link, n_top=5 if levels == 3 else 10)
    tens = frame_tensors(df, levels=levels, slope=True)
    mod = AGQLogLik(tens, get_family(fam_name, link), 5)

    def f(psi):
        lams = [lambda_from_theta(psi[2:5], (2,))] + ([psi[5:6].reshape(1, 1)] if levels == 3 else [])
        return mod.loglik(psi[:2], lams).sum()

    psi = t(-0.2, 0.7, 0.8, 0.1, 0.5, 0.9)[: 5 if levels == 2 else 6].requires_grad_(True)
    (g,) = torch.autograd.grad(f(psi), psi)
    fd = []
    for r in range(psi.numel()):
        e = torch.zeros_like(psi)
        e[r] = 1e-5
        with torch.no_grad():
            fd.append((float(f(psi + e)) - float(f(psi - e))) / 2e-5)
    torch.testing.assert_close(g, torch.tensor(fd, dtype=F64), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("levels", [2, 3])
def test_top_scores_sum_to_the_gradient_and_equal_per_group_differences(levels):
    df = simulate("binomial", levels=levels, seed=9, slope=levels == 2)
    tens = frame_tensors(df, levels=levels, slope=levels == 2)
    mod = AGQLogLik(tens, get_family("binomial", "probit"), 5)
    beta = t(0.1, 0.6)
    lams = ([lambda_from_theta(t(0.9, 0.2, 0.4), (2,))] if levels == 2
            else [t(0.9).reshape(1, 1), t(0.6).reshape(1, 1)])
    ell, s_beta, s_lam = mod.top_scores(beta, lams)
    n_top = tens.levels[-1].n_groups
    assert ell.shape == (n_top,) and s_beta.shape == (n_top, 2)
    b = beta.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(mod.loglik(b, lams).sum(), b)
    torch.testing.assert_close(s_beta.sum(0), g, rtol=1e-10, atol=1e-12)
    h = 1e-5
    fd = (mod.loglik(beta + t(0.0, h), lams) - mod.loglik(beta - t(0.0, h), lams)) / (2 * h)
    torch.testing.assert_close(s_beta[:, 1], fd, rtol=1e-6, atol=1e-8)
    lam_p = [lam.clone() for lam in lams]
    lam_m = [lam.clone() for lam in lams]
    lam_p[-1][0, 0] += h
    lam_m[-1][0, 0] -= h
    fd = (mod.loglik(beta, lam_p) - mod.loglik(beta, lam_m)) / (2 * h)
    torch.testing.assert_close(s_lam[-1][:, 0, 0], fd, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("levels", [2, 3])
def test_chunking_changes_nothing(levels):
    df = simulate("binomial", levels=levels, seed=12)
    tens = frame_tensors(df, levels=levels)
    fam = get_family("binomial")
    lams = [t(1.1).reshape(1, 1)] + ([t(0.7).reshape(1, 1)] if levels == 3 else [])
    out = []
    for elems in (2 ** 24, tens.n_obs * 2):
        beta = t(0.2, 0.4).requires_grad_(True)
        mod = AGQLogLik(tens, fam, 7, max_chunk_elems=elems)
        ell = mod.loglik(beta, lams)
        (g,) = torch.autograd.grad(ell.sum(), beta)
        out.append((ell.detach(), g))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-13, atol=1e-12)
    torch.testing.assert_close(out[0][1], out[1][1], rtol=1e-12, atol=1e-12)


def test_row_order_does_not_matter():
    df = simulate("poisson", levels=3, seed=13)
    fam = get_family("poisson")
    lams = [t(0.8).reshape(1, 1), t(0.5).reshape(1, 1)]
    a = AGQLogLik(frame_tensors(df, levels=3), fam, 5).loglik(t(0.1, 0.3), lams).sum()
    shuffled = df.sample(frac=1.0, random_state=1).reset_index(drop=True)
    b = AGQLogLik(frame_tensors(shuffled, levels=3), fam, 5).loglik(t(0.1, 0.3), lams).sum()
    assert float(a) == pytest.approx(float(b), rel=1e-12)


def test_separated_groups_have_finite_modes():
    df = simulate("binomial", n_top=6, seed=14)
    df.loc[df["g"] == "g0", "y"] = 1.0
    df.loc[df["g"] == "g1", "y"] = 0.0
    tens = frame_tensors(df)
    mod = AGQLogLik(tens, get_family("binomial"), 13)
    ell = mod.loglik(t(0.0, 0.5), [t(5.0).reshape(1, 1)])
    u = mod.modes[0]
    assert bool(torch.isfinite(ell).all()) and bool(torch.isfinite(u).all())
    assert float(u[0, 0]) > 0.5 and float(u[1, 0]) < -0.5


def test_more_than_three_levels_is_a_config_error():
    from torchmix.errors import ConfigError
    from torchmix.tensors import ModelTensors

    tens = frame_tensors(simulate("binomial", levels=3), levels=3)
    four = ModelTensors(X=tens.X, y=tens.y, w1_cond=tens.w1_cond, w1_uncond=tens.w1_uncond,
                        levels=tens.levels + tens.levels[-1:])
    with pytest.raises(ConfigError, match="2 or 3 levels"):
        AGQLogLik(four, get_family("binomial"), 5)


def test_multimodal_posterior_restarts_from_the_best_node():
    """The cauchit link is not log-concave: one sleepstudy subject has two posterior modes. Newton from
    0 finds the lower one; the node check restarts from the best node, so the value does not depend on
    the warm start."""
    import torchmix as tm
    from glmm_support import CauchitLink

    df = tm.load_dataset("sleepstudy")
    frame = df.assign(y=(df["Reaction"] > 300).astype(float), x=df["Days"], g=df["Subject"], c1=1.0, c2=1.0)
    tens = frame_tensors(frame)
    fam = get_family("binomial", CauchitLink())
    beta, lam = t(-5.0, 1.0), t(3.0).reshape(1, 1)
    mod = AGQLogLik(tens, fam, 13)
    eta0, zls = mod.pieces(beta, [lam])
    local = mod._forward2(eta0, zls[0], None, restarts=0)
    assert float(mod.modes[0][4, 0]) == pytest.approx(-0.3106, abs=1e-3)
    values = []
    for start in (0.0, -0.3, 1.0):
        mod = AGQLogLik(tens, fam, 13)
        mod.set_modes([torch.full((18, 1), start, dtype=F64)])
        values.append(float(mod.loglik(beta, [lam]).sum()))
        assert float(mod.modes[0][4, 0]) == pytest.approx(0.8335, abs=1e-3)
    assert values[0] == pytest.approx(values[1], rel=1e-13) and values[0] == pytest.approx(values[2], rel=1e-13)
    assert abs(values[0] - float(local.sum())) > 1e-4  # the two centres give different approximations


@pytest.mark.parametrize("fam_name,link", [("binomial", "logit"), ("binomial", "probit"), ("poisson", "log")])
@pytest.mark.parametrize("slope", [False, True])
def test_hand_written_adaptation_backward_equals_autograd(fam_name, link, slope):
    """The two-level adaptation step has a hand-written backward; it must equal autograd's."""
    from torchmix.likelihood.adapt import adapt2, adapt2_autograd
    from torchmix.likelihood.modes import newton_modes_2
    from torchmix.likelihood.segments import Grouping

    df = simulate(fam_name, seed=15, slope=slope, link=link)
    tens = frame_tensors(df, slope=slope)
    fam = get_family(fam_name, link)
    lv = tens.levels[0]
    grp = Grouping(lv.group, lv.n_groups)
    lam = lambda_from_theta(t(0.9, 0.3, 0.5), (2,)) if slope else t(1.2).reshape(1, 1)
    eta0 = (tens.X @ t(0.1, 0.4)).requires_grad_(True)
    zl = (lv.Z @ lam).requires_grad_(True)
    u_hat, _, ok, _ = newton_modes_2(fam, tens.y, tens.w1_cond, grp, eta0, zl,
                                     torch.zeros(lv.n_groups, lv.q, dtype=F64))
    assert ok
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(lv.n_groups, lv.q, generator=gen, dtype=F64), torch.randn(tens.n_obs, generator=gen,
               dtype=F64), torch.randn(lv.n_groups, lv.q, lv.q, generator=gen, dtype=F64)]
    grads = []
    for fn in (adapt2, adapt2_autograd):
        outs = fn(fam, tens.y, tens.w1_cond, grp, eta0, zl, u_hat)
        loss = sum((o * wt).sum() for o, wt in zip(outs, weights))
        grads.append(torch.autograd.grad(loss, [eta0, zl]))
        values = [o.detach() for o in outs]
        if len(grads) == 1:
            first = values
    for a, b in zip(first, values):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
