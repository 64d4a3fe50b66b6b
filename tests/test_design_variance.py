"""Design-based variance: linearization with strata/PSUs/FPC and replicate weights."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import torch

import torchmix as tm
from torchmix.variance import ReplicateScheme, StratifiedMeat, replicate_variance, zone_factors

from conftest import sleepstudy_weighted

F2 = "Reaction ~ Days + (1 + Days | Subject)"
F1 = "Reaction ~ Days + (1 | Subject)"


def _quiet_mix(*args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tm.mix(*args, progress=False, **kw)


# ----------------------------------------------------------------------------- linearization

def test_stratified_meat_by_hand():
    """3 strata with known per-PSU score totals; a PSU made of two top-level groups."""
    scores = torch.tensor([[1.0, 2.0], [3.0, -1.0], [0.5, 0.5],  # PSUs 0, 1 (stratum 0); PSU 0 = groups 0 + 2
                           [2.0, 0.0], [4.0, 1.0], [-1.0, 3.0],  # PSUs 2, 3, 4 (stratum 1)
                           [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)  # PSUs 5, 6 (stratum 2)
    psu = torch.tensor([0, 1, 0, 2, 3, 4, 5, 6])
    stratum = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    frac = torch.tensor([0.0, 0.25, 0.5], dtype=torch.float64)
    meat = StratifiedMeat(psu, stratum, frac)
    z = {0: [np.array([1.5, 2.5]), np.array([3.0, -1.0])],
         1: [np.array([2.0, 0.0]), np.array([4.0, 1.0]), np.array([-1.0, 3.0])],
         2: [np.array([0.0, 1.0]), np.array([1.0, 1.0])]}
    expected = np.zeros((2, 2))
    for h, zs in z.items():
        n = len(zs)
        zbar = np.mean(zs, axis=0)
        expected += (1 - frac[h].item()) * n / (n - 1) * sum(np.outer(v - zbar, v - zbar) for v in zs)
    np.testing.assert_allclose(meat(scores).numpy(), expected, rtol=1e-12, atol=1e-12)
    assert meat.df == 7 - 3


def test_lonely_psu_rules():
    scores = torch.tensor([[1.0], [3.0], [2.0], [5.0]], dtype=torch.float64)
    psu, stratum = torch.arange(4), torch.tensor([0, 0, 0, 1])   # stratum 1 has one PSU
    frac = torch.zeros(2, dtype=torch.float64)
    with pytest.raises(tm.ConfigError, match="only one PSU"):
        StratifiedMeat(psu, stratum, frac)
    ok = 1.5 * ((1 - 2) ** 2 + (3 - 2) ** 2 + 0)                   # stratum 0 alone: n/(n-1) sum (z - zbar)^2
    for rule in ("remove", "certainty"):
        assert float(StratifiedMeat(psu, stratum, frac, rule)(scores)) == pytest.approx(ok, rel=1e-14)
    grand = (1 + 3 + 2 + 5) / 4
    assert float(StratifiedMeat(psu, stratum, frac, "adjust")(scores)) == pytest.approx(ok + (5 - grand) ** 2,
                                                                                         rel=1e-14)
    assert float(StratifiedMeat(psu, stratum, frac, "average")(scores)) == pytest.approx(ok * 2, rel=1e-14)


def test_linearization_default_equals_sandwich():
    df = sleepstudy_weighted()
    a = _quiet_mix(F2, df, weights=["w1", "w2"])
    b = _quiet_mix(F2, df, weights=["w1", "w2"], se_type="linearization")
    np.testing.assert_allclose(b.se, a.se, rtol=1e-12)
    np.testing.assert_allclose(b.varcomp_se, a.varcomp_se, rtol=1e-12)
    assert "linearization" in str(b.summary()) and "df = 17" in str(b.summary())


def test_linearization_binomial_equals_sandwich():
    df = tm.load_dataset("contraception")
    f = "use ~ age + urban + (1 | district)"
    a = _quiet_mix(f, df, family="binomial", n_quad=5)
    b = _quiet_mix(f, df, family="binomial", n_quad=5, se_type="linearization")
    np.testing.assert_allclose(b.se, a.se, rtol=1e-10)
    np.testing.assert_allclose(b.varcomp_se, a.varcomp_se, rtol=1e-10)


def _strata_psu(df):
    subj = sorted(df["Subject"].unique(), key=int)
    pos = df["Subject"].map({s: i for i, s in enumerate(subj)})
    out = df.copy()
    out["stratum"] = pos % 3
    out["psu"] = pos // 6          # two subjects per PSU within each stratum
    return out


def test_linearization_strata_psu_fpc_against_meat_of_scores():
    df = _strata_psu(sleepstudy_weighted())
    base = _quiet_mix(F2, df, weights=["w1", "w2"], small_sample="none")
    res = _quiet_mix(F2, df, weights=["w1", "w2"], strata="stratum", psu="psu", fpc=0.1)
    # rebuild by hand from the per-subject beta scores and the model Hessian of the plain fit
    s = base._out.scores[:, :2].numpy()
    subj = base.design.levels[-1].labels
    st = df.groupby("Subject")["stratum"].first().loc[subj].to_numpy()
    ps = df.groupby("Subject")["psu"].first().loc[subj].to_numpy()
    meat = np.zeros((2, 2))
    for h in np.unique(st):
        zs = [s[(st == h) & (ps == i)].sum(0) for i in np.unique(ps[st == h])]
        zbar = np.mean(zs, axis=0)
        n = len(zs)
        meat += 0.9 * n / (n - 1) * sum(np.outer(z - zbar, z - zbar) for z in zs)
    bread = base.vcov_model.to_numpy()
    np.testing.assert_allclose(res.cov_mat.to_numpy(), bread @ meat @ bread, rtol=1e-8)
    assert "df = 6" in str(res.summary())   # 9 PSUs - 3 strata


def test_census_fpc_gives_zero_variance():
    df = _strata_psu(sleepstudy_weighted())
    res = _quiet_mix(F2, df, weights=["w1", "w2"], strata="stratum", psu="psu", fpc=1.0)
    assert np.all(res.se.to_numpy() == 0.0)


def test_psu_must_hold_whole_groups():
    df = sleepstudy_weighted()
    df["psu"] = df["Days"] % 2
    with pytest.raises(tm.DataError, match="whole top-level groups"):
        _quiet_mix(F2, df, weights=["w1", "w2"], psu="psu")


def test_lonely_psu_error_through_mix():
    df = _strata_psu(sleepstudy_weighted())
    df.loc[df["stratum"] == 2, "psu"] = 0
    with pytest.raises(tm.ConfigError, match="only one PSU"):
        _quiet_mix(F2, df, weights=["w1", "w2"], strata="stratum", psu="psu")
    res = _quiet_mix(F2, df, weights=["w1", "w2"], strata="stratum", psu="psu", lonely_psu="remove")
    assert np.isfinite(res.se).all()


# ----------------------------------------------------------------------------- replicates

def test_replicate_variance_arithmetic():
    est = torch.tensor([[1.0, 2.0], [3.0, 1.0], [2.0, 2.0]], dtype=torch.float64)
    full = torch.tensor([2.0, 1.5], dtype=torch.float64)
    d = est.numpy() - full.numpy()
    np.testing.assert_allclose(replicate_variance(est, full, 0.5, torch.ones(3)).numpy(), 0.5 * d.T @ d, rtol=1e-14)
    dm = est.numpy() - est.numpy().mean(0)
    np.testing.assert_allclose(replicate_variance(est, full, 0.5, torch.ones(3), mse=False).numpy(),
                               0.5 * dm.T @ dm, rtol=1e-14)


def test_zone_factors_and_scheme_defaults():
    f = zone_factors(torch.tensor([0, 0, 1, 1]), torch.tensor([1, 0, 0, 1]), 2, both_halves=True)
    assert f.tolist() == [[2, 0, 1, 1], [0, 2, 1, 1], [1, 1, 0, 2], [1, 1, 2, 0]]
    fac = torch.ones(4, 3, dtype=torch.float64)
    assert ReplicateScheme.build(fac, "JK1").scale == pytest.approx(3 / 4)
    assert ReplicateScheme.build(fac, "BRR").scale == pytest.approx(1 / 4)
    assert ReplicateScheme.build(fac, "Fay", fay_rho=0.5).scale == pytest.approx(1 / (4 * 0.25))
    assert ReplicateScheme.build(fac, "Fay", fay_rho=0.0).scale == ReplicateScheme.build(fac, "BRR").scale


def _jk1_columns(df, group="Subject", wcol="w2"):
    subj = sorted(df[group].unique(), key=str)
    g = len(subj)
    cols = [f"rw{r + 1}" for r in range(g)]
    reps = pd.DataFrame({c: df[wcol] * np.where(df[group] == s, 0.0, g / (g - 1)) for c, s in zip(cols, subj)},
                        index=df.index)
    return pd.concat([df, reps], axis=1), cols, subj


def test_jk1_replicates_equal_separate_fits():
    df = sleepstudy_weighted()
    rdf, cols, subj = _jk1_columns(df)
    res = _quiet_mix(F2, rdf, weights=["w1", "w2"], replicate_weights={"w2": cols}, replicate_method="JK1")
    est = res.variance["replicate_estimates"].numpy()
    g = len(subj)
    for r in (0, 7, 17):
        d = df[df["Subject"] != subj[r]].copy()
        d["w1"] *= g / (g - 1)
        d["w2"] *= g / (g - 1)
        sep = _quiet_mix(F2, d, weights=["w1", "w2"])
        np.testing.assert_allclose(est[r], np.concatenate([sep.coef, sep.varcomp]), rtol=1e-8)
    full = np.concatenate([res.coef, res.varcomp])
    v = (g - 1) / g * ((est - full) ** 2).sum(0)
    np.testing.assert_allclose(res.se.to_numpy(), np.sqrt(v[:2]), rtol=1e-12)
    np.testing.assert_allclose(res.varcomp_se.to_numpy(), np.sqrt(v[2:]), rtol=1e-12)


def _simulated(n_groups=200, n_per=10, seed=3):
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(n_groups), n_per)
    x = rng.normal(size=g.size)
    u = rng.normal(scale=0.7, size=n_groups)
    y = 1 + 0.5 * x + u[g] + rng.normal(size=g.size)
    w2 = rng.uniform(1, 3, n_groups)[g]
    w1 = w2 * rng.uniform(1, 2, g.size)
    return pd.DataFrame({"y": y, "x": x, "g": [f"s{i:03d}" for i in g], "w1": w1, "w2": w2})


@pytest.mark.slow
def test_jk1_variance_close_to_sandwich():
    df = _simulated()
    rdf, cols, _ = _jk1_columns(df, "g", "w2")
    f = "y ~ x + (1 | g)"
    a = _quiet_mix(f, df, weights=["w1", "w2"])
    b = _quiet_mix(f, rdf, weights=["w1", "w2"], replicate_weights={"w2": cols}, replicate_method="JK1")
    ratio = b.se.to_numpy() / a.se.to_numpy()
    assert np.all(np.abs(ratio - 1) < 0.15), ratio


def _zones(df, group="Subject"):
    subj = sorted(df[group].unique(), key=str)
    zone = {s: i // 2 for i, s in enumerate(subj)}
    rep = {s: i % 2 for i, s in enumerate(subj)}
    out = df.copy()
    out["JKZONE"] = df[group].map(zone)
    out["JKREP"] = df[group].map(rep)
    return out


def test_jk2_zones_equal_explicit_columns_and_level1_columns():
    df = _zones(sleepstudy_weighted())
    z = _quiet_mix(F2, df, weights=["w1", "w2"], jk_zone="JKZONE", jk_rep="JKREP", jk_both_halves=True)
    # the same replicates as explicit top-level columns, and as level-1 (student) replicate columns
    n_z = df["JKZONE"].max() + 1
    top_cols, l1_cols = [], []
    for h in range(n_z):
        for half in (1, 0):
            a = np.where(df["JKZONE"] == h, 2.0 * (df["JKREP"] == half), 1.0)
            name = f"z{h}_{half}"
            df[name + "_top"] = df["w2"] * a
            df[name + "_l1"] = df["w1"] * a
            top_cols.append(name + "_top")
            l1_cols.append(name + "_l1")
    e = _quiet_mix(F2, df, weights=["w1", "w2"], replicate_weights={"w2": top_cols}, replicate_method="JK2",
                   scale=0.5)
    l1 = _quiet_mix(F2, df, weights=["w1", "w2"], replicate_weights=l1_cols, replicate_method="JK2", scale=0.5)
    for other in (e, l1):
        np.testing.assert_allclose(other.variance["replicate_estimates"].numpy(),
                                   z.variance["replicate_estimates"].numpy(), rtol=1e-10)
        np.testing.assert_allclose(other.se, z.se, rtol=1e-10)
        np.testing.assert_allclose(other.varcomp_se, z.varcomp_se, rtol=1e-10)


def test_fay_rho_zero_equals_brr():
    df = _zones(sleepstudy_weighted())
    cols = []
    for h in range(df["JKZONE"].max() + 1):
        a = np.where(df["JKZONE"] == h, 2.0 * (df["JKREP"] == 1), 1.0)
        df[f"r{h}"] = df["w1"] * a
        cols.append(f"r{h}")
    brr = _quiet_mix(F2, df, weights=["w1", "w2"], replicate_weights=cols, replicate_method="BRR")
    fay = _quiet_mix(F2, df, weights=["w1", "w2"], replicate_weights=cols, replicate_method="Fay", fay_rho=0.0)
    np.testing.assert_allclose(fay.se, brr.se, rtol=1e-14)
    assert "BRR" in str(brr.summary())


def test_uneven_level1_ratios_warn_naming_groups():
    df = sleepstudy_weighted()
    df["r1"] = df["w1"] * 1.1
    df["r2"] = df["w1"] * 0.9
    df.loc[df.index[0], "r1"] *= 1.5
    with pytest.warns(tm.TorchmixWarning, match="not constant within 1 top-level group"):
        tm.mix(F2, df, weights=["w1", "w2"], replicate_weights=["r1", "r2"], replicate_method="JK1", progress=False)


def test_conflicting_arguments_are_errors():
    df = _zones(sleepstudy_weighted())
    with pytest.raises(tm.ConfigError, match="not both"):
        _quiet_mix(F2, df, weights=["w1", "w2"], strata="JKZONE", jk_zone="JKZONE", jk_rep="JKREP")
    with pytest.raises(tm.ConfigError, match="se_type"):
        _quiet_mix(F2, df, weights=["w1", "w2"], se_type="sandwich", strata="JKZONE")
    with pytest.raises(tm.ConfigError, match="replicate_method is required"):
        _quiet_mix(F2, df, weights=["w1", "w2"], replicate_weights=["w1", "w2"])
    with pytest.raises(tm.ConfigError, match="needs replicate_weights"):
        _quiet_mix(F2, df, weights=["w1", "w2"], se_type="replicate")


# ----------------------------------------------------------------------------- families, levels, PVs

def test_binomial_and_poisson_replicates():
    df = tm.load_dataset("contraception")
    d = sorted(df["district"].unique(), key=str)
    df["JKZONE"] = df["district"].map({s: i // 2 for i, s in enumerate(d)})
    df["JKREP"] = df["district"].map({s: i % 2 for i, s in enumerate(d)})
    res = _quiet_mix("use ~ age + urban + (1 | district)", df, family="binomial", n_quad=3,
                     jk_zone="JKZONE", jk_rep="JKREP")
    est = res.variance["replicate_estimates"].numpy()
    full = np.concatenate([res.coef, res.varcomp])
    np.testing.assert_allclose(res.se.to_numpy() ** 2, ((est - full) ** 2).sum(0)[:3], rtol=1e-10)
    rng = np.random.default_rng(1)
    sim = _simulated(40, 8)
    sim["y"] = rng.poisson(np.exp(0.3 + 0.4 * sim["x"]))
    sim = _zones(sim, "g")
    pois = _quiet_mix("y ~ x + (1 | g)", sim, weights=["w1", "w2"], family="poisson", n_quad=3,
                      jk_zone="JKZONE", jk_rep="JKREP")
    assert np.isfinite(pois.se).all() and pois.variance["replicate_estimates"].shape[0] == 20


def test_three_level_linearization_and_replicates():
    from conftest import sleepstudy_three_level
    df = sleepstudy_three_level()
    f = "Reaction ~ Days + (1|Subject) + (1|Group)"
    kw = dict(weights=["c1", "c2", "c3"], cweights=True)
    a = _quiet_mix(f, df, **kw)
    b = _quiet_mix(f, df, se_type="linearization", **kw)
    np.testing.assert_allclose(b.se, a.se, rtol=1e-10)
    np.testing.assert_allclose(b.varcomp_se, a.varcomp_se, rtol=1e-10)
    # delete-one-Group jackknife: replicate 1 equals the fit without Group "1", others' weight x 4/3
    groups = ["1", "2", "3", "4"]
    cols = []
    for r, grp in enumerate(groups):
        df[f"rc3_{r}"] = df["c3"] * np.where(df["Group"] == grp, 0.0, 4 / 3)
        cols.append(f"rc3_{r}")
    c = _quiet_mix(f, df, replicate_weights={"c3": cols}, replicate_method="JK1", **kw)
    d = df[df["Group"] != "1"].copy()
    d["c3"] *= 4 / 3
    sep = _quiet_mix(f, d, **kw)
    np.testing.assert_allclose(c.variance["replicate_estimates"][0].numpy(),
                               np.concatenate([sep.coef, sep.varcomp]), rtol=1e-7)


def test_plausible_values_with_replicates_pooling_by_hand():
    df = _zones(sleepstudy_weighted())
    rng = np.random.default_rng(0)
    for m in range(3):
        df[f"pv{m}"] = df["Reaction"] + rng.normal(scale=15, size=len(df))
    pv = {"Reaction": ["pv0", "pv1", "pv2"]}
    kw = dict(weights=["w1", "w2"], plausible_values=pv, jk_zone="JKZONE", jk_rep="JKREP")
    res = _quiet_mix("Reaction ~ Days + (1 | Subject)", df, **kw)
    k = 3
    est = np.array([f.coef.to_numpy() for f in res.fits])
    samp = np.array([f.se.to_numpy() ** 2 for f in res.fits]).mean(0)
    between = est.var(0, ddof=1)
    np.testing.assert_allclose(res.coef.to_numpy(), est.mean(0), rtol=1e-12)
    np.testing.assert_allclose(res.se.to_numpy(), np.sqrt(samp + (1 + 1 / k) * between), rtol=1e-12)
    for f in res.fits:   # each value's sampling variance is its own replicate variance
        e = f.variance["replicate_estimates"].numpy()
        full = np.concatenate([f.coef, f.varcomp])
        np.testing.assert_allclose(f.se.to_numpy() ** 2, ((e - full) ** 2).sum(0)[:2], rtol=1e-10)
    first = _quiet_mix("Reaction ~ Days + (1 | Subject)", df, replicate_pv="first", **kw)
    for f in first.fits:
        np.testing.assert_allclose(f.se.to_numpy(), first.fits[0].se.to_numpy(), rtol=1e-14)
    assert first.df_complete == res.fits[0].variance["df"]


def test_config_variance_section(tmp_path):
    from torchmix.config import load_config, run_config
    df = _zones(sleepstudy_weighted())
    path = tmp_path / "d.csv"
    df.to_csv(path, index=False)
    cfg = tmp_path / "rep.toml"
    cfg.write_text(f'[data]\npath = "{path.name}"\n[model]\nformula = "{F1}"\nweights = ["w1", "w2"]\n'
                   '[fit]\nprogress = false\n[variance]\njk_zone = "JKZONE"\njk_rep = "JKREP"\n'
                   'jk_both_halves = true\n')
    res = run_config(load_config(cfg))
    direct = _quiet_mix(F1, df, weights=["w1", "w2"], jk_zone="JKZONE", jk_rep="JKREP", jk_both_halves=True)
    np.testing.assert_allclose(res.se, direct.se, rtol=1e-12)
    bad = tmp_path / "bad.toml"
    bad.write_text(f'[data]\npath = "{path.name}"\n[model]\nformula = "{F1}"\n[variance]\nfay_rho = 1.5\n')
    with pytest.raises(tm.ConfigError, match="fay_rho"):
        load_config(bad)
