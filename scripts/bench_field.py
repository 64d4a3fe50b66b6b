#!/usr/bin/env python3
"""Speed in the field: a fit on a quiet machine, then with one busy process beside it.

Two fits through ``torchmix.mix`` (the user's path, design included):

* linear: 10^5 rows, 4,000 groups of 25, string group ids, three covariates, random intercept and
  slope, informative weights at both levels, sandwich standard errors;
* logit: 5x10^4 rows, 2,000 groups of 25, random intercept, weights at both levels, AGQ with 13
  points.

Each is timed (median of ``--repeat``) quiet, then again while the script runs one busy process
(a pure-Python loop that keeps one core busy) beside it; the ratios loaded/quiet are printed
(goal: at most 1.5 for both). ``torch.get_num_threads()`` is printed before and after the fits to
show that the setting a fit chooses for itself is restored. With ``--threads N`` the fits are run
with ``num_threads=N`` instead of the automatic choice (``--threads 2`` shows what torch's own
default does on a 2-core machine).

Usage: ``python scripts/bench_field.py [--quick] [--repeat 3] [--threads N]``
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

import torchmix  # noqa: E402

BUSY = "while True:\n    pass\n"


def linear_data(n_rows: int = 100_000, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    n_groups = n_rows // 25
    g = np.repeat(np.arange(n_groups), 25)
    x = rng.normal(size=(n_rows, 3))
    u0, u1, e = rng.normal(0, 1.0, n_groups), rng.normal(0, 0.5, n_groups), rng.normal(0, 2.0, n_rows)
    y = 1 + x @ np.array([0.5, -0.3, 0.2]) + u0[g] + u1[g] * x[:, 0] + e
    w2 = np.exp(0.3 * u0 + rng.normal(0, 0.2, n_groups))
    w1 = w2[g] * np.exp(0.1 * e + rng.normal(0, 0.2, n_rows))
    return pd.DataFrame({"y": y, "x1": x[:, 0], "x2": x[:, 1], "x3": x[:, 2], "g": [f"school{k:05d}" for k in g],
                         "w1": w1, "w2": w2[g]})


def logit_data(n_rows: int = 50_000, seed: int = 1) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    n_groups = n_rows // 25
    g = np.repeat(np.arange(n_groups), 25)
    x = rng.normal(size=n_rows)
    u = rng.normal(size=n_groups)
    y = (rng.uniform(size=n_rows) < 1 / (1 + np.exp(-(-0.5 + 0.7 * x + u[g])))).astype(int)
    w2 = np.exp(0.5 * u)
    w1 = w2[g] * np.where(y == 1, 1.5, 1.0) * rng.uniform(0.8, 1.2, n_rows)
    return pd.DataFrame({"y": y, "x": x, "g": [f"school{k:05d}" for k in g], "w1": w1, "w2": w2[g]})


def median_time(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="one run of each (noisier)")
    ap.add_argument("--threads", type=int, default=None, help="num_threads for the fits (default: automatic)")
    args = ap.parse_args()
    repeat = 1 if args.quick else args.repeat

    lin, logit = linear_data(), logit_data()
    fits = {
        "linear 1e5 rows": lambda: torchmix.mix("y ~ x1 + x2 + x3 + (1 + x1 | g)", lin, ["w1", "w2"], progress=False,
                                                num_threads=args.threads),
        "logit 5e4 AGQ13": lambda: torchmix.mix("y ~ x + (1 | g)", logit, ["w1", "w2"], family="binomial",
                                                n_quad=13, progress=False, num_threads=args.threads),
    }
    print(f"bench_field: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{datetime.date.today()}, num_threads={'automatic' if args.threads is None else args.threads}, "
          f"median of {repeat}")
    before = torch.get_num_threads()
    print(f"torch.get_num_threads() before the fits: {before}")
    torchmix.mix("y ~ x1 + (1 | g)", lin.iloc[:2000], progress=False)  # warm-up: first-call costs
    quiet = {name: median_time(fn, repeat) for name, fn in fits.items()}
    busy = subprocess.Popen([sys.executable, "-c", BUSY])
    try:
        time.sleep(0.5)
        loaded = {name: median_time(fn, repeat) for name, fn in fits.items()}
    finally:
        busy.kill()
        busy.wait()
    after = torch.get_num_threads()
    print(f"torch.get_num_threads() after the fits:  {after} ({'restored' if after == before else 'CHANGED'})")
    print(f"{'fit':<18}{'quiet s':>9}{'loaded s':>10}{'loaded/quiet':>14}  goal <= 1.5")
    for name in fits:
        r = loaded[name] / quiet[name]
        print(f"{name:<18}{quiet[name]:>9.3f}{loaded[name]:>10.3f}{r:>14.2f}  {'MET' if r <= 1.5 else 'NOT MET'}")


if __name__ == "__main__":
    main()
