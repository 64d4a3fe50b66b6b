"""Conditional standard errors of the random effects (posterior SD given the data at the estimates).

References: lme4 ``ranef(condVar = TRUE)`` (tests/data/lme4_references.R / .txt), dense brute-force
posterior integrals, and identities (gaussian through the quadrature posterior equals the closed form;
integer level-1 weights equal replicated rows).
"""

from __future__ import annotations

import io
import pathlib
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

import torchmix as tm
from torchmix.families import get_family
from torchmix.ranef_posterior import gaussian_posterior, lambdas_absolute, quadrature_posterior

from conftest import sleepstudy_three_level, sleepstudy_weighted

DATA = pathlib.Path(__file__).parent / "data"


def lme4_block(name: str) -> pd.DataFrame:
    """One ``## name`` block of tests/data/lme4_references.txt as a DataFrame."""
    text = (DATA / "lme4_references.txt").read_text().split(f"## {name}\n")[1].split("##")[0]
    return pd.read_csv(io.StringIO(text), dtype={"subject": str, "id": str})


def test_gaussian_slopes_equal_lme4_condvar():
    res = tm.mix("Reaction ~ Days + (1 + Days | Subject)", tm.load_dataset("sleepstudy"), progress=False)
    ref = lme4_block("sleepstudy_slopes").set_index("subject")
    se = res.ranef["Subject"].std_error.loc[ref.index]
    # lme4 and torchmix optima agree to ~1e-6 in theta; a wrong formula would be off by far more
    np.testing.assert_allclose(se["(Intercept)"], ref["sd_int"], rtol=2e-5)
    np.testing.assert_allclose(se["Days"], ref["sd_days"], rtol=2e-5)
    cov = res.ranef_cov["Subject"][:, 0, 1]
    np.testing.assert_allclose(cov, ref["cov"].to_numpy(), rtol=5e-5)
    np.testing.assert_allclose(res.ranef["Subject"].loc[ref.index, "Days"], ref["b_days"], rtol=1e-4, atol=1e-4)
    assert res.ranef["Subject"].shape == (18, 2)


def test_three_levels_equal_lme4_condvar():
    df = sleepstudy_three_level()
    res = tm.mix("Reaction ~ Days + (1 | Group/Subject)", df, progress=False)
    sub = lme4_block("three_level_subject")
    grp = lme4_block("three_level_group").set_index("id")
    se_s = res.ranef_se["Group:Subject"]["(Intercept)"]
    ids = [f"{i.split(':')[1]}:{i.split(':')[0]}" for i in sub["id"]]  # lme4 writes Subject:Group
    np.testing.assert_allclose(se_s.loc[ids].to_numpy(), sub["sd"].to_numpy(), rtol=2e-5)
    np.testing.assert_allclose(res.ranef_se["Group"]["(Intercept)"].loc[grp.index].to_numpy(), grp["sd"], rtol=2e-5)


def _dense_joint(res):
    """Diagonal blocks of sigma^2 Lambda (Lambda' Z' Z Lambda + I)^{-1} Lambda' from dense matrices (unit weights)."""
    t, o = res.design.tensors, res._out
    blocks, lams = [], []
    for lv, th in zip(t.levels, o.theta):
        q = lv.q
        z = np.zeros((t.n_obs, lv.n_groups * q))
        g = lv.group.numpy()
        for r in range(q):
            z[np.arange(t.n_obs), g * q + r] = lv.Z[:, r].numpy()
        blocks.append(z)
        lam = np.asarray(lambdas_absolute([th], [lv.term_sizes])[0])
        lams.append(np.kron(np.eye(lv.n_groups), lam))
    z = np.concatenate(blocks, axis=1)
    lam = np.zeros((z.shape[1], z.shape[1]))
    pos = 0
    for l_ in lams:
        lam[pos:pos + l_.shape[0], pos:pos + l_.shape[0]] = l_
        pos += l_.shape[0]
    zl = z @ lam
    cov = o.sigma ** 2 * lam @ np.linalg.inv(zl.T @ zl + np.eye(zl.shape[1])) @ lam.T
    return np.diag(cov)


@pytest.fixture(scope="module")
def three_slopes():
    return tm.mix("Reaction ~ Days + (1 + Days | Subject) + (1 | Group)", sleepstudy_three_level(), progress=False)


def test_three_levels_equal_dense_joint_posterior(three_slopes):
    res = three_slopes
    dense = _dense_joint(res)
    ours = np.concatenate([res.ranef_se["Subject"].to_numpy().ravel() ** 2,
                           res.ranef_se["Group"].to_numpy().ravel() ** 2])
    np.testing.assert_allclose(ours, dense, rtol=1e-9)


@pytest.mark.parametrize("formula", ["Reaction ~ Days + (1 | Subject) + (1 | Group)",
                                     pytest.param("Reaction ~ Days + (1 + Days | Subject) + (1 | Group)",
                                                  marks=pytest.mark.slow)])
def test_weighted_three_levels_closed_form_equals_nested_quadrature(formula):
    """The closed form and the nested quadrature rule (5.2) with the gaussian family give the same
    posterior moments at both levels (exact for a gaussian integrand with >= 2 nodes)."""
    df = sleepstudy_three_level()
    res = tm.mix(formula, df, weights=["c1", "c2", "c3"], cweights=True, progress=False)
    o, t = res._out, res.design.tensors
    closed = gaussian_posterior(t, o.theta, o.beta, o.sigma)
    lams = lambdas_absolute(o.theta, [lv.term_sizes for lv in t.levels], o.sigma)
    kappa = torch.tensor(o.sigma ** 2, dtype=torch.float64)
    for m in (1, 3):
        quad = quadrature_posterior(t, get_family("gaussian"), o.beta, lams, m, kappa=kappa)
        for a, b in zip(quad.cov, closed.cov):
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-9, atol=1e-9)
        for a, b in zip(quad.mean, closed.mean):
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-9, atol=1e-8)


def test_weighted_three_levels_replication_identity():
    """Integer level-1 weights equal replicated rows: identical conditional SEs at both levels."""
    df = sleepstudy_three_level()
    df["c1"] = 1.0 + (df["Days"] % 3 == 0)
    rep = df.loc[df.index.repeat(df["c1"].astype(int))].assign(c1=1.0).reset_index(drop=True)
    kw = dict(weights=["c1", "c2", "c3"], cweights=True, progress=False)
    a = tm.mix("Reaction ~ Days + (1 | Subject) + (1 | Group)", df, **kw)
    b = tm.mix("Reaction ~ Days + (1 | Subject) + (1 | Group)", rep, **kw)
    for name in ("Subject", "Group"):
        np.testing.assert_allclose(a.ranef_se[name].to_numpy(), b.ranef_se[name].to_numpy(), rtol=1e-6)
    # the weights matter: unit weights give other SEs
    c = tm.mix("Reaction ~ Days + (1 | Subject) + (1 | Group)", df, progress=False)
    assert np.abs(c.ranef_se["Subject"].to_numpy() - a.ranef_se["Subject"].to_numpy()).max() > 1e-2


@pytest.fixture(scope="module")
def logit_fit():
    df = sleepstudy_weighted()
    df["hi"] = (df["Reaction"] > 300).astype(int)
    return tm.mix("hi ~ Days + (1 | Subject)", df, weights=["w1", "w2"], family="binomial", progress=False)


def _brute_force_group(res, j):
    """Posterior mean and SD of b_j from the exact conditional density on a dense grid."""
    t, o = res.design.tensors, res._out
    rows = t.levels[0].group.numpy() == j
    eta0 = t.X.numpy()[rows] @ o.beta.numpy()
    y, w = t.y.numpy()[rows], t.w1_cond.numpy()[rows]
    tau = float(o.tau[0])
    b = np.linspace(-40.0, 40.0, 400001)
    eta = eta0[None, :] + b[:, None]
    logp = (w * (y * eta - np.logaddexp(0.0, eta))).sum(1) - 0.5 * b * b / tau
    p = np.exp(logp - logp.max())
    p /= p.sum()
    mean = (p * b).sum()
    return mean, np.sqrt((p * (b - mean) ** 2).sum())


@pytest.mark.parametrize("subject", ["308", "309"])  # 309: all responses 0, a skewed posterior
def test_weighted_logit_posterior_equals_brute_force(logit_fit, subject):
    j = list(logit_fit.ranef["Subject"].index).index(subject)
    mean, sd = _brute_force_group(logit_fit, j)
    assert abs(logit_fit.ranef_se["Subject"].iloc[j, 0] - sd) < 1e-6
    assert abs(logit_fit.ranef_mean["Subject"].iloc[j, 0] - mean) < 1e-6
    # the mode (ranef) is not the posterior mean for the skewed group
    if subject == "309":
        assert abs(logit_fit.ranef["Subject"].iloc[j, 0] - mean) > 0.1


def test_laplace_posterior_is_inverse_curvature(logit_fit):
    post = logit_fit.ranef_posterior(n_quad=1)
    t, o = logit_fit.design.tensors, logit_fit._out
    eta = (t.X @ o.beta + t.levels[0].Z[:, 0] * post.mean[0][t.levels[0].group, 0]).numpy()
    mu = 1 / (1 + np.exp(-eta))
    info = np.bincount(t.levels[0].group.numpy(), weights=t.w1_cond.numpy() * mu * (1 - mu))
    np.testing.assert_allclose(post.cov[0][:, 0, 0].numpy(), 1 / (info + 1 / float(o.tau[0])), rtol=1e-10)


@pytest.mark.slow
def test_three_level_logit_top_group_equals_brute_force():
    df = sleepstudy_three_level()
    df["hi"] = (df["Reaction"] > 300).astype(int)
    res = tm.mix("hi ~ Days + (1 | Subject) + (1 | Group)", df, weights=["c1", "c2", "c3"], cweights=True,
                 family="binomial", progress=False)
    t, o = res.design.tensors, res._out
    tau2, tau3 = float(o.tau[0]), float(o.tau[1])
    k = 1  # Group "2"
    lv2 = t.levels[0]
    children = np.flatnonzero(lv2.parent.numpy() == k)
    v = np.linspace(-12, 12, 1601) * np.sqrt(tau3)
    u = np.linspace(-14, 14, 2001) * np.sqrt(tau2)
    log_outer = -0.5 * v * v / tau3
    inner_stats = []
    for j in children:
        rows = lv2.group.numpy() == j
        eta0 = t.X.numpy()[rows] @ o.beta.numpy()
        y, w = t.y.numpy()[rows], t.w1_cond.numpy()[rows]
        eta = eta0[None, None, :] + v[:, None, None] + u[None, :, None]
        lp = (w * (y * eta - np.logaddexp(0.0, eta))).sum(-1) - 0.5 * u[None, :] ** 2 / tau2  # (V, U)
        mx = lp.max(1, keepdims=True)
        pj = np.exp(lp - mx)
        log_int = np.log(pj.sum(1)) + mx[:, 0]
        pj /= pj.sum(1, keepdims=True)
        log_outer = log_outer + float(lv2.w_cond[j]) * log_int
        inner_stats.append((j, pj))
    po = np.exp(log_outer - log_outer.max())
    po /= po.sum()
    mv = (po * v).sum()
    np.testing.assert_allclose(res.ranef_se["Group"].iloc[k, 0], np.sqrt((po * (v - mv) ** 2).sum()), atol=1e-5)
    for j, pj in inner_stats:
        mu_j = (po[:, None] * pj * u[None, :]).sum()
        sd_j = np.sqrt((po[:, None] * pj * (u[None, :] - mu_j) ** 2).sum())
        np.testing.assert_allclose(res.ranef_se["Subject"].iloc[j, 0], sd_j, atol=1e-5)
        np.testing.assert_allclose(res.ranef_mean["Subject"].iloc[j, 0], mu_j, atol=1e-5)


def test_ranef_frame_layout(three_slopes):
    res = three_slopes
    fr = res.ranef_frame()
    assert list(fr.columns) == ["level", "group", "id", "term", "estimate", "std_error"]
    assert len(fr) == 18 * 2 + 4
    row = fr[(fr["group"] == "Subject") & (fr["id"] == "308") & (fr["term"] == "Days")].iloc[0]
    assert row["level"] == 2 and row["estimate"] == res.ranef["Subject"].loc["308", "Days"]
    assert row["std_error"] == res.ranef_se["Subject"].loc["308", "Days"]
    assert set(fr.loc[fr["group"] == "Group", "level"]) == {3}
    assert (fr["std_error"] > 0).all()


def test_import_does_not_import_matplotlib():
    code = "import sys, torchmix; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=pathlib.Path(__file__).parent.parent, check=True)
    assert out.stdout.strip() == "False"


def test_plot_without_matplotlib_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    res = tm.mix("Reaction ~ Days + (1 | Subject)", tm.load_dataset("sleepstudy"), progress=False)
    with pytest.raises(ImportError, match=r"pip install torchmix\[plot\]"):
        res.plot_ranef()


def test_plot_ranef_draws_sorted_intervals(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib
    matplotlib.use("Agg")
    res = tm.mix("Reaction ~ Days + (1 + Days | Subject)", tm.load_dataset("sleepstudy"), progress=False)
    fig = res.plot_ranef("Subject")
    assert len(fig.axes) == 2
    fig.savefig(tmp_path / "caterpillar.png", dpi=80)
    assert (tmp_path / "caterpillar.png").stat().st_size > 1000
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels[0] == res.ranef["Subject"]["(Intercept)"].idxmin()
    with pytest.raises(tm.DataError, match="unknown level"):
        res.plot_ranef("School")


def test_pooled_ranef_se_follows_rubin():
    df = tm.load_dataset("sleepstudy")
    rng = np.random.default_rng(1)
    for k in range(3):
        df[f"pv{k}"] = df["Reaction"] + rng.normal(0, 20, len(df))
    pooled = tm.mix("score ~ Days + (1 | Subject)", df, plausible_values={"score": ["pv0", "pv1", "pv2"]},
                    progress=False)
    est = np.stack([f.ranef["Subject"].to_numpy() for f in pooled.fits])
    within = np.mean([f.ranef_se["Subject"].to_numpy() ** 2 for f in pooled.fits], axis=0)
    total = within + (1 + 1 / 3) * est.var(axis=0, ddof=1)
    np.testing.assert_allclose(pooled.ranef["Subject"].std_error.to_numpy(), np.sqrt(total), rtol=1e-12)
    np.testing.assert_allclose(pooled.ranef["Subject"].to_numpy(), est.mean(0), rtol=1e-12)
    fr = pooled.ranef_frame()
    assert len(fr) == 18 and (fr["std_error"] > 0).all()


def test_two_level_slopes_closed_form_equals_quadrature():
    res = tm.mix("Reaction ~ Days + (1 + Days | Subject)", sleepstudy_weighted(), weights=["w1", "w2"],
                 progress=False)
    o, t = res._out, res.design.tensors
    closed = gaussian_posterior(t, o.theta, o.beta, o.sigma)
    lams = lambdas_absolute(o.theta, [lv.term_sizes for lv in t.levels], o.sigma)
    quad = quadrature_posterior(t, get_family("gaussian"), o.beta, lams, 4,
                                kappa=torch.tensor(o.sigma ** 2, dtype=torch.float64))
    np.testing.assert_allclose(quad.cov[0].numpy(), closed.cov[0].numpy(), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(quad.mean[0].numpy(), closed.mean[0].numpy(), rtol=1e-9, atol=1e-8)
