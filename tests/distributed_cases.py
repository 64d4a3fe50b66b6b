"""Models fitted both in one process and across a gloo group by tests/test_distributed.py."""

from __future__ import annotations

import warnings
from contextlib import contextmanager

import numpy as np
import pandas as pd

import torchmix as tm
from conftest import sleepstudy_three_level, sleepstudy_weighted


def contraception_weighted() -> pd.DataFrame:
    """contraception with deterministic unconditional weights at both levels."""
    df = tm.load_dataset("contraception")
    codes = pd.factorize(df["district"], sort=True)[0]
    df["w2"] = 1.0 + 0.5 * (codes % 3)
    df["w1"] = df["w2"] * (1.0 + 0.25 * (np.arange(len(df)) % 4))
    return df


def sleepstudy_two_tops() -> pd.DataFrame:
    """3-level sleepstudy whose top level has two groups of 9 subjects (90 rows each)."""
    df = sleepstudy_three_level()
    subjects = sorted(df["Subject"].unique(), key=int)
    first = set(subjects[:9])
    df["Group"] = np.where(df["Subject"].isin(first), "A", "B")
    df["c3"] = np.where(df["Group"] == "A", 2.0, 1.0)
    return df


@contextmanager
def failing_evaluations(after: int):
    """Within the block, this process's ``after``-th gaussian likelihood evaluation raises."""
    from torchmix.likelihood.gaussian import GaussianLikelihood

    original, calls = GaussianLikelihood.integrate, {"n": 0}

    def integrate(self, thetas):
        calls["n"] += 1
        if calls["n"] >= after:
            raise RuntimeError("injected failure in a likelihood evaluation")
        return original(self, thetas)

    GaussianLikelihood.integrate = integrate
    try:
        yield
    finally:
        GaussianLikelihood.integrate = original


def fit(name: str, rank: int = 0):
    """Fit case ``name`` (warnings silenced: the comparison is about numbers). Case ``mismatch`` is
    ``slope2`` with one response value changed on process 1 (processes holding different data);
    case ``raise`` is ``slope2`` whose 4th likelihood evaluation raises on process 1 (spread over the
    processes); ``slope2_spread`` is ``slope2`` spread over the processes."""
    if name == "slope2_spread":  # the two-level linear fit spread over the processes as well
        from torchmix.distributed import data_parallel

        data_parallel.REPLICATE_TWO_LEVEL_NEWTON = False
        try:
            return fit("slope2")
        finally:
            data_parallel.REPLICATE_TWO_LEVEL_NEWTON = True
    if name == "raise":
        if rank != 1:
            return fit("slope2_spread")
        with failing_evaluations(4):
            return fit("slope2_spread")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name in ("slope2", "mismatch"):
            df = sleepstudy_weighted()
            if name == "mismatch" and rank == 1:
                df.loc[df.index[0], "Reaction"] += 1e-6
            return tm.mix("Reaction ~ Days + (1 + Days | Subject)", df, weights=["w1", "w2"],
                          progress=False, num_threads=1)
        if name == "three":
            return tm.mix("Reaction ~ Days + (1 | Subject) + (1 | Group)", sleepstudy_three_level(),
                          weights=["c1", "c2", "c3"], cweights=True, progress=False, num_threads=1)
        if name == "two_tops":
            return tm.mix("Reaction ~ Days + (1 | Subject) + (1 | Group)", sleepstudy_two_tops(),
                          weights=["c1", "c2", "c3"], cweights=True, progress=False, num_threads=1)
        if name == "four":
            from conftest import simulate_nested

            return tm.mix("y ~ x + (1|cls) + (1|school) + (1|district)", simulate_nested(seed=11),
                          weights=["w1c", "w2c", "w3c", "w4c"], cweights=True, progress=False, num_threads=1)
        if name == "logit3":
            from glmm_support import simulate

            return tm.mix("y ~ x + (1 | g) + (1 | k)", simulate("binomial", n_top=8, levels=3, seed=3),
                          weights=["c1", "c2", "c3"], cweights=True, family="binomial", n_quad=5, progress=False,
                          num_threads=1)
        if name == "logit":
            return tm.mix("use ~ age + urban + (1 | district)", contraception_weighted(), weights=["w1", "w2"],
                          family="binomial", n_quad=7, progress=False, num_threads=1)
    raise KeyError(name)


def extract(res) -> dict:
    """The numbers compared: estimates, SEs, variance components, lnl, random effects, scores."""
    out = res._out
    d = {"coef": res.coef.to_numpy(), "se": res.se.to_numpy(), "varcomp": res.varcomp.to_numpy(),
         "varcomp_se": res.varcomp_se.to_numpy(), "lnl": np.array([res.lnl]),
         "scores": out.scores.numpy(), "converged": np.array([res.converged])}
    for l, b in enumerate(out.b):
        d[f"b{l}"] = b.numpy()
    if res.sigma is not None:
        d["sigma"] = np.array([res.sigma])
    return d
