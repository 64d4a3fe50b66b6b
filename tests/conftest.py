"""Shared fixtures: the shipped datasets with the deterministic weights of MATH.md section 12."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import torchmix as tm


def sleepstudy_weighted() -> pd.DataFrame:
    """sleepstudy with the weights of reference (c): c1 = 1 + 0.5 (Days mod 3),
    c2 = 1 + 0.25 ((s - 1) mod 4), s the Subject's position in sorted order; unconditional
    (c1 c2, c2) in columns w1, w2 and conditional ones in c1, c2."""
    df = tm.load_dataset("sleepstudy")
    subjects = sorted(df["Subject"].unique(), key=int)
    pos = df["Subject"].map({s: i + 1 for i, s in enumerate(subjects)})
    df["c1"] = 1 + 0.5 * (df["Days"] % 3)
    df["c2"] = 1 + 0.25 * ((pos - 1) % 4)
    df["w1"] = df["c1"] * df["c2"]
    df["w2"] = df["c2"]
    return df


def sleepstudy_three_level() -> pd.DataFrame:
    """sleepstudy with the 3-level grouping and conditional weights of reference (d)."""
    df = tm.load_dataset("sleepstudy")
    groups = {"2": {"309", "310", "335", "349"}, "3": {"330", "337", "352", "369"}, "4": {"331", "332", "334", "372"}}
    df["Group"] = "1"
    for g, members in groups.items():
        df.loc[df["Subject"].isin(members), "Group"] = g
    df["c1"] = 1.0
    first4 = df.index[(df["Subject"] == "308") & (df["Days"] <= 3)]
    df.loc[first4, "c1"] = 2.0
    df["c2"] = np.where(df["Subject"] == "308", 2.0, 1.0)
    df["c3"] = np.where(df["Group"] == "1", 2.0, 1.0)
    return df


@pytest.fixture
def sleep_w():
    return sleepstudy_weighted()


@pytest.fixture
def sleep3():
    return sleepstudy_three_level()


def simulate_nested(n_top=12, n_mid=3, n_low=3, n_rows=4, seed=0, levels=4):
    """Simulated students in classes in schools in districts (or fewer levels), with
    integer-valued conditional weights at every level and informative noise."""
    rng = np.random.default_rng(seed)
    rows = []
    for d in range(n_top):
        ud = rng.normal(0, 1.0)
        wd = float(rng.integers(1, 3))
        for s in range(n_mid):
            us = rng.normal(0, 1.5)
            ws = float(rng.integers(1, 4))
            for c in range(n_low):
                uc = rng.normal(0, 0.8)
                wc = float(rng.integers(1, 3))
                n = int(rng.integers(2, n_rows + 2))
                x = rng.normal(size=n)
                y = 1.0 + 0.5 * x + ud + us + uc + rng.normal(0, 1.0, size=n)
                for i in range(n):
                    rows.append(dict(district=f"d{d}", school=f"d{d}s{s}", cls=f"d{d}s{s}c{c}", x=x[i], y=y[i],
                                     w1c=float(rng.integers(1, 4)), w2c=wc, w3c=ws, w4c=wd))
    return pd.DataFrame(rows)


def assert_same_fit(a, b, rtol=1e-8, se=True, ranef=True):
    """Two fits agree: lnl, coefficients, variance components (and SEs, random effects)."""
    np.testing.assert_allclose(a.lnl, b.lnl, rtol=rtol)
    np.testing.assert_allclose(a.coef.to_numpy(), b.coef.to_numpy(), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(a.varcomp.to_numpy(), b.varcomp.to_numpy(), rtol=1e-6, atol=1e-8)
    if se:
        np.testing.assert_allclose(a.se.to_numpy(), b.se.to_numpy(), rtol=1e-5)
        np.testing.assert_allclose(a.varcomp_se.to_numpy(), b.varcomp_se.to_numpy(), rtol=1e-5)
    if ranef:
        for name in a.ranef:
            ra, rb = a.ranef[name], b.ranef[name].loc[a.ranef[name].index]
            np.testing.assert_allclose(ra.to_numpy(), rb.to_numpy(), rtol=1e-5, atol=1e-7)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
