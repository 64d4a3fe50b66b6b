"""Coverage of the 95% fixed-effect intervals on simulated survey-weighted two-level data.

Model: y_ij = 1 + 0.5 x_ij + 0.3 z_j + u_j + e_ij, u_j ~ N(0, 0.5), e_ij ~ N(0, 1).
Clusters are sampled informatively: a cluster with random effect u is kept with probability
pi(u) = 0.2 + 0.6 Phi(u / sd(u)), so the sample over-represents high-u clusters and an unweighted
intercept is biased upwards; the cluster weight is 1 / pi(u). Within a cluster 5 to 25 units are
kept with conditional weights drawn from U(1, 3) (not informative). Fits use conditional weights
(cweights=True), sandwich standard errors and t intervals with (clusters - 1) degrees of freedom.

Usage: python scripts/coverage_intervals.py [--reps 200] [--clusters 100] [--seed 1]
"""

from __future__ import annotations

import argparse
import math
import time
import warnings

import numpy as np
import pandas as pd

import torchmix as tm

TRUTH = {"(Intercept)": 1.0, "x": 0.5, "z": 0.3}
SD_U = math.sqrt(0.5)


def simulate(rng: np.random.Generator, n_clusters: int) -> pd.DataFrame:
    rows = []
    kept = 0
    while kept < n_clusters:
        u = rng.normal(0.0, SD_U)
        pi = 0.2 + 0.6 * 0.5 * math.erfc(-u / SD_U / math.sqrt(2.0))
        if rng.uniform() > pi:
            continue
        n = int(rng.integers(5, 26))
        z = rng.normal()
        x = rng.normal(size=n)
        y = TRUTH["(Intercept)"] + TRUTH["x"] * x + TRUTH["z"] * z + u + rng.normal(size=n)
        rows.append(pd.DataFrame({"y": y, "x": x, "z": z, "g": kept, "w1": rng.uniform(1.0, 3.0, size=n),
                                  "w2": 1.0 / pi}))
        kept += 1
    return pd.concat(rows, ignore_index=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--clusters", type=int, default=100)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--contrast", action="store_true", help="also fit without weights, for contrast")
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    hits = {k: 0 for k in TRUTH}
    hits_unweighted = {k: 0 for k in TRUTH}
    t0 = time.perf_counter()
    for rep in range(args.reps):
        d = simulate(rng, args.clusters)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = tm.mix("y ~ x + z + (1 | g)", d, weights=["w1", "w2"], cweights=True, progress=False)
            plain = tm.mix("y ~ x + z + (1 | g)", d, progress=False) if args.contrast else None
        for fit, store in ((res, hits), (plain, hits_unweighted)):
            if fit is None:
                continue
            ci = fit.conf_int(0.05)
            for k, v in TRUTH.items():
                store[k] += int(ci.loc[k, "lower"] <= v <= ci.loc[k, "upper"])
        if (rep + 1) % 20 == 0:
            print(f"  {rep + 1} datasets, {time.perf_counter() - t0:.0f} s", flush=True)
    n = args.reps
    print(f"{n} datasets, {args.clusters} clusters each, 95% t intervals (df = {args.clusters - 1}), "
          f"{time.perf_counter() - t0:.0f} s")
    results = [("weighted (sandwich)", hits)] + ([("unweighted, for contrast", hits_unweighted)] if args.contrast else [])
    for name, store in results:
        per = ", ".join(f"{k} {100 * h / n:.1f}%" for k, h in store.items())
        print(f"{name}: {per}; all {100 * sum(store.values()) / (n * len(store)):.1f}%")


if __name__ == "__main__":
    main()
