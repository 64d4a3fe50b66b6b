"""Benchmark: replicate-weight standard errors against one single fit, measured in the same run.

* 80 Fay replicates (rho = 0.5) x 5 plausible values of a 10^5-row 2-level linear model;
* 80 Fay replicates of a 10^4-row 2-level logit model (AGQ 13).

Prints the total time of the replicate fits divided by the time of one ordinary fit (with its
sandwich standard errors) of the same model. Goal: <= 20 for both.

    python3 scripts/bench_replicates.py [--quick] [--models linear,logit] [--threads K]

The logit ratio is also printed on CPU (process) time, far less disturbed than wall time when other
work shares the machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # this checkout's torchmix
import torchmix as tm  # noqa: E402


def simulate(n_groups: int, n_per: int, n_rep: int = 80, n_pv: int = 5, logit: bool = False, seed: int = 0):
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(n_groups), n_per)
    x = rng.normal(size=g.size)
    u = rng.normal(scale=0.6, size=n_groups)
    w2 = rng.uniform(1, 3, n_groups)
    w1 = w2[g] * rng.uniform(1, 2, g.size)
    cols = {"x": x, "g": np.char.add("s", g.astype(str)), "w1": w1, "w2": w2[g]}
    eta = 0.2 + 0.5 * x + u[g]
    if logit:
        cols["y"] = (rng.uniform(size=g.size) < 1 / (1 + np.exp(-eta))).astype(float)
    else:
        for m in range(n_pv):
            cols[f"pv{m + 1}"] = eta + rng.normal(size=g.size)
    # Fay replicates: groups paired; in each replicate one of a pair x1.5, the other x0.5
    sign = rng.choice([-1.0, 1.0], size=(n_rep, n_groups // 2))
    fac = 1.0 + 0.5 * np.repeat(sign, 2, axis=1) * np.tile([1.0, -1.0], n_groups // 2)
    reps = {f"W_FSTR{r + 1}": w1 * fac[r, g] for r in range(n_rep)}
    return pd.DataFrame({**cols, **reps})


def timed(fn):
    """Wall-clock time and the result; the CPU (process) time of the call is kept in ``CPU[0]``."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    CPU[0] = time.process_time() - c0
    return time.perf_counter() - t0, out


CPU = [0.0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller problems (a smoke test)")
    ap.add_argument("--models", default="linear,logit", help="comma-separated subset of linear,logit")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    n_groups = 400 if args.quick else 4000
    kw = dict(weights=["w1", "w2"], progress=False)
    rep = dict(replicate_weights=r"W_FSTR\d+", replicate_method="Fay", fay_rho=0.5)

    models = {m.strip() for m in args.models.split(",")}
    f = "y ~ x + (1 | g)"
    if "linear" in models:
        bench_linear(n_groups, f, kw, rep)
    if "logit" in models:
        bench_logit(n_groups, f, kw, rep)


def bench_linear(n_groups, f, kw, rep):
    df = simulate(n_groups, 25)
    pv = {"y": [f"pv{m + 1}" for m in range(5)]}
    tm.mix(f.replace("y ~", "pv1 ~"), df.head(2000), **kw)   # warm-up
    t_single, _ = timed(lambda: tm.mix(f.replace("y ~", "pv1 ~"), df, **kw))
    t_rep, res = timed(lambda: tm.mix(f, df, plausible_values=pv, **rep, **kw))
    print(f"linear {len(df):,} rows, 80 Fay replicates x 5 plausible values: single fit {t_single:.3f} s, "
          f"replicates {t_rep:.2f} s, ratio {t_rep / t_single:.1f} single fits (goal <= 20)")


def bench_logit(n_groups, f, kw, rep):
    dl = simulate(n_groups // 10, 25, logit=True)
    tm.mix(f, dl.head(2000), family="binomial", **kw)   # warm-up
    t_single, c_single = float("inf"), float("inf")
    for _ in range(2):  # the faster of two single fits (the first may still pay one-time costs)
        t_single = min(t_single, timed(lambda: tm.mix(f, dl, family="binomial", **kw))[0])
        c_single = min(c_single, CPU[0])
    t_rep, res = timed(lambda: tm.mix(f, dl, family="binomial", **rep, **kw))
    print(f"logit {len(dl):,} rows, 80 Fay replicates: single fit {t_single:.3f} s, replicates {t_rep:.2f} s, "
          f"ratio {t_rep / t_single:.1f} single fits (CPU {CPU[0] / c_single:.1f}; goal <= 20)")


if __name__ == "__main__":
    main()
