"""Helpers for the GLMM tests: model tensors built by hand, simulated data, brute-force integrals."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from torchmix.families import Link
from torchmix.tensors import LevelTensors, ModelTensors

F64 = torch.float64


def _t(a):
    return torch.as_tensor(np.array(a, dtype=float), dtype=F64)


def _per_group(values, codes, n):
    out = torch.zeros(n, dtype=F64)
    return out.index_copy(0, torch.as_tensor(codes, dtype=torch.int64), _t(values))


def make_tensors(y, X, Z2, g2, c1, c2, Z3=None, g3=None, c3=None, term_sizes2=None, term_sizes3=None):
    """ModelTensors from arrays and *conditional* weights (c1 per row, c2/c3 per row, constant in groups).

    Group codes come from ``pd.factorize``; level-2 ids are made unique within their parent.
    """
    y, X = _t(y), _t(X)
    n = y.shape[0]
    Z2 = _t(Z2).reshape(n, -1)
    ts2 = tuple(term_sizes2 or (Z2.shape[1],))
    if g3 is None:
        codes2, uniq2 = pd.factorize(pd.Series(np.asarray(g2)).astype(str))
        G2 = len(uniq2)
        w2 = _per_group(c2, codes2, G2)
        code2 = torch.as_tensor(codes2, dtype=torch.int64)
        lv2 = LevelTensors(Z=Z2, term_sizes=ts2, group=code2, parent=None, n_groups=G2, w_cond=w2, w_uncond=w2,
                           top=torch.arange(G2))
        return ModelTensors(X=X, y=y, w1_cond=_t(c1), w1_uncond=_t(c1) * w2[code2], levels=(lv2,))
    key2 = pd.Series(np.asarray(g3)).astype(str) + "/" + pd.Series(np.asarray(g2)).astype(str)
    codes2, uniq2 = pd.factorize(key2)
    codes3, uniq3 = pd.factorize(pd.Series(np.asarray(g3)).astype(str))
    G2, G3 = len(uniq2), len(uniq3)
    code2 = torch.as_tensor(codes2, dtype=torch.int64)
    code3 = torch.as_tensor(codes3, dtype=torch.int64)
    w2 = _per_group(c2, codes2, G2)
    w3 = _per_group(c3, codes3, G3)
    parent = torch.zeros(G2, dtype=torch.int64).index_copy(0, code2, code3)
    Z3 = _t(Z3).reshape(n, -1)
    ts3 = tuple(term_sizes3 or (Z3.shape[1],))
    lv2 = LevelTensors(Z=Z2, term_sizes=ts2, group=code2, parent=parent, n_groups=G2, w_cond=w2,
                       w_uncond=w2 * w3[parent], top=parent)
    lv3 = LevelTensors(Z=Z3, term_sizes=ts3, group=code3, parent=None, n_groups=G3, w_cond=w3, w_uncond=w3,
                       top=torch.arange(G3))
    w1u = _t(c1) * w2[code2] * w3[code3]
    return ModelTensors(X=X, y=y, w1_cond=_t(c1), w1_uncond=w1u, levels=(lv2, lv3))


def simulate(family: str, n_top=8, n_mid=3, rows=(3, 7), levels=2, slope=False, seed=0, link="logit"):
    """Simulated clustered data (DataFrame) with integer conditional weights c1, c2, c3.

    Two levels: groups ``g`` (n_top of them). Three levels: ``g`` nested in ``k``.
    """
    rng = np.random.default_rng(seed)
    out = []
    n2 = n_top if levels == 2 else n_top * n_mid
    vk = rng.normal(0, 1.0, size=n_top)
    for j in range(n2):
        k = j // n_mid
        n = int(rng.integers(rows[0], rows[1] + 1))
        x = rng.normal(size=n)
        u = rng.normal(0, 0.8)
        v = vk[k] if levels == 3 else 0.0
        b = rng.normal(0, 0.4) if slope else 0.0
        eta = -0.2 + 0.6 * x + u + v + b * x
        if family == "poisson":
            y = rng.poisson(np.exp(0.3 * eta))
        elif link == "probit":
            y = (rng.normal(size=n) < eta).astype(int)
        else:
            y = (rng.uniform(size=n) < 1 / (1 + np.exp(-eta))).astype(int)
        for i in range(n):
            out.append(dict(y=float(y[i]), x=float(x[i]), g=f"g{j}", k=f"k{k}", c1=float(rng.integers(1, 4)),
                            c2=float(1 + (j % 3)), c3=float(1 + (k % 2))))
    return pd.DataFrame(out)


def frame_tensors(df, levels=2, slope=False):
    """ModelTensors of ``y ~ x + (1 [+ x] | g) [+ (1 | k)]`` with conditional weights c1, c2, c3."""
    X = np.c_[np.ones(len(df)), df["x"]]
    Z2 = np.c_[np.ones(len(df)), df["x"]] if slope else np.ones(len(df))
    if levels == 2:
        return make_tensors(df["y"], X, Z2, df["g"], df["c1"], df["c2"])
    return make_tensors(df["y"], X, Z2, df["g"], df["c1"], df["c2"], Z3=np.ones(len(df)), g3=df["k"], c3=df["c3"])


def brute_force_loglik(df, beta, sd2, sd3=None, logf=None, n_grid=401, width=9.0):
    """Weighted pseudo log-likelihood (2.1)/(2.2) for random intercepts by dense trapezoid grids.

    ``logf(y, eta)`` is vectorised numpy; weights are the conditional c1, c2, c3 of ``df``.
    """
    z = np.linspace(-width, width, n_grid)
    dz = z[1] - z[0]
    log_phi = -0.5 * z ** 2 - 0.5 * math.log(2 * math.pi)
    log_trap = np.log(np.full(n_grid, dz))
    log_trap[[0, -1]] -= math.log(2.0)

    def lse(a, axis):
        m = a.max(axis=axis, keepdims=True)
        return (m + np.log(np.exp(a - m).sum(axis=axis, keepdims=True))).squeeze(axis)

    def inner(rows, shift):  # log of int prod f^{c1} phi(u) du, for each outer value in shift (K,)
        eta0 = beta[0] + beta[1] * rows["x"].to_numpy()
        eta = eta0[None, :, None] + shift[:, None, None] + sd2 * z[None, None, :]
        ll = (rows["c1"].to_numpy()[None, :, None] * logf(rows["y"].to_numpy()[None, :, None], eta)).sum(1)
        return lse(ll + log_phi + log_trap, axis=-1)

    total = 0.0
    if sd3 is None:
        for _, rows in df.groupby("g", sort=False):
            total += rows["c2"].iloc[0] * inner(rows, np.zeros(1))[0]
        return total
    for _, top in df.groupby("k", sort=False):
        acc = np.zeros(n_grid)
        for _, rows in top.groupby("g", sort=False):
            acc += rows["c2"].iloc[0] * inner(rows, sd3 * z)
        total += top["c3"].iloc[0] * lse(acc + log_phi + log_trap, axis=0)
    return total


def logit_logf(y, eta):
    return y * eta - np.logaddexp(0.0, eta)


class CauchitLink(Link):
    """The cauchit link, defined outside the package: one small class (README "Adding a link")."""

    name = "cauchit"

    def inverse(self, eta):
        return 0.5 + torch.atan(eta) / math.pi

    def link(self, mu):
        return torch.tan(math.pi * (mu - 0.5))


@pytest.fixture(autouse=True)
def one_thread():
    """These problems are tiny: run them on one thread, where a shared CPU cannot stall OpenMP
    barriers (results do not depend on the thread count)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def binary_values(k: int = 3):
    """``(tensors, family, ys (N, k))``: ``k`` binary plausible values of a weighted 3-level
    random-intercept logit (``simulate_nested``, 12 top-level groups), prepared as ``mix()`` would."""
    from torchmix.api import _prepare

    from conftest import simulate_nested

    df = simulate_nested(n_top=12, levels=3, seed=6)
    rng = np.random.default_rng(3)
    cols = []
    for j in range(k):
        df[f"v{j}"] = (df["y"] + rng.normal(0, 1, len(df)) > 1.5).astype(float)
        cols.append(f"v{j}")
    prep = _prepare("y ~ x + (1 | cls)", df, ["w1c", "w2c"], cweights=True, family="binomial", progress=False,
                    plausible_values={"y": cols})
    return prep.design.tensors, prep.family, torch.stack([prep.responses[c] for c in cols], dim=1)
