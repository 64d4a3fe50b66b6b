#!/usr/bin/env python3
"""Side by side with lme4: the same simulated data fitted by torchmix and by R's lme4.

* linear: 10^5 rows, 4,000 groups of 25 with string ids, three covariates, random intercept;
  ``lmer(y ~ x1 + x2 + x3 + (1 | g), REML = FALSE)`` against ``torchmix.mix`` (unweighted, same
  model; goal: torchmix at most 0.1x lmer);
* logit: 5x10^4 rows, 2,000 groups of 25, random intercept; ``glmer(y ~ x + (1 | g), binomial,
  nAGQ = 13)`` against ``torchmix.mix(..., family="binomial", n_quad=13)`` (goal: at most 0.05x).

The data go to a temporary CSV read by ``Rscript``; R times only the fitting call (data read and
lme4 loaded beforehand). torchmix is timed in this process after warm-up fits, including its
design step (median of the runs; the minimum is printed beside it). Both sides are timed in wall
time and in CPU time (R: user + system of ``system.time``; both run on one thread here, R on the
reference BLAS). On a shared machine wall time depends on how the scheduler shares the cores with
other work, so the goals are judged on CPU time; the wall-time ratio is printed beside it. Both sets of estimates are printed so that the fits can be seen to agree. R is not a
dependency of torchmix or its tests: without ``Rscript`` (and lme4) the script says so and exits.

Usage: ``python scripts/bench_lme4.py [--quick]`` (``--quick``: one run of each, smaller R budget).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

import torchmix  # noqa: E402

R_CODE = r"""
suppressMessages(library(lme4))
args <- commandArgs(trailingOnly = TRUE)
lin <- read.csv(args[1], colClasses = c(g = "character"))
lgt <- read.csv(args[2], colClasses = c(g = "character"))
reps <- as.integer(args[3])
cpu <- function(st) st[["user.self"]] + st[["sys.self"]]
t_lin <- numeric(0)
c_lin <- numeric(0)
for (i in seq_len(reps)) {
  st <- system.time(m1 <- lmer(y ~ x1 + x2 + x3 + (1 | g), lin, REML = FALSE))
  t_lin <- c(t_lin, st[["elapsed"]])
  c_lin <- c(c_lin, cpu(st))
}
st <- system.time(m2 <- glmer(y ~ x + (1 | g), lgt, family = binomial, nAGQ = 13))
t_lgt <- st[["elapsed"]]
c_lgt <- cpu(st)
num <- function(key, x) cat(key, format(as.numeric(x), digits = 15), "\n")
num("lmer_time", median(t_lin))
num("lmer_cpu", median(c_lin))
num("lmer_coef", fixef(m1))
num("lmer_var", as.data.frame(VarCorr(m1))$vcov)
num("lmer_loglik", as.numeric(logLik(m1)))
num("glmer_time", t_lgt)
num("glmer_cpu", c_lgt)
num("glmer_coef", fixef(m2))
num("glmer_var", as.data.frame(VarCorr(m2))$vcov)
num("glmer_loglik", as.numeric(logLik(m2)))
"""


def linear_data(n_rows: int = 100_000, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    n_groups = n_rows // 25
    g = np.repeat(np.arange(n_groups), 25)
    x = rng.normal(size=(n_rows, 3))
    y = 1 + x @ np.array([0.5, -0.3, 0.2]) + rng.normal(0, 1.0, n_groups)[g] + rng.normal(0, 2.0, n_rows)
    return pd.DataFrame({"y": y, "x1": x[:, 0], "x2": x[:, 1], "x3": x[:, 2], "g": [f"school{k:05d}" for k in g]})


def logit_data(n_rows: int = 50_000, seed: int = 1) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    n_groups = n_rows // 25
    g = np.repeat(np.arange(n_groups), 25)
    x = rng.normal(size=n_rows)
    eta = -0.5 + 0.7 * x + rng.normal(size=n_groups)[g]
    y = (rng.uniform(size=n_rows) < 1 / (1 + np.exp(-eta))).astype(int)
    return pd.DataFrame({"y": y, "x": x, "g": [f"school{k:05d}" for k in g]})


def median_time(fn, repeat):
    """``((median wall, median CPU, min wall, min CPU), last result)`` of ``repeat`` calls."""
    walls, cpus, out = [], [], None
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return (statistics.median(walls), statistics.median(cpus), min(walls), min(cpus)), out


def run_r(lin: pd.DataFrame, lgt: pd.DataFrame, reps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        paths = [Path(tmp) / "linear.csv", Path(tmp) / "logit.csv", Path(tmp) / "bench.R"]
        lin.to_csv(paths[0], index=False, float_format="%.17g")
        lgt.to_csv(paths[1], index=False, float_format="%.17g")
        paths[2].write_text(R_CODE)
        proc = subprocess.run(["Rscript", str(paths[2]), str(paths[0]), str(paths[1]), str(reps)],
                              capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"Rscript failed (is lme4 installed?):\n{proc.stderr[-2000:]}")
    out = {}
    for line in proc.stdout.splitlines():
        key, *vals = line.split()
        out[key] = [float(v) for v in vals]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one run of each fit")
    args = ap.parse_args()
    if shutil.which("Rscript") is None:
        print("Rscript not found: install R and lme4 to run this comparison (torchmix does not need R).")
        return
    reps = 1 if args.quick else 3
    lin, lgt = linear_data(), logit_data()
    print(f"bench_lme4: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{datetime.date.today()}; R fits timed inside R, torchmix in-process after a warm-up")
    r = run_r(lin, lgt, reps)
    torchmix.mix("y ~ x1 + (1 | g)", lin.iloc[:2000], progress=False)  # warm-up
    # and of the quadrature path, whose first fit in a process pays one-off costs like the linear one
    torchmix.mix("y ~ x + (1 | g)", lgt.iloc[:2000], family="binomial", n_quad=13, progress=False)
    t_lin, m_lin = median_time(lambda: torchmix.mix("y ~ x1 + x2 + x3 + (1 | g)", lin, progress=False), reps)
    t_lgt, m_lgt = median_time(lambda: torchmix.mix("y ~ x + (1 | g)", lgt, family="binomial", n_quad=13,
                                                    progress=False), reps)
    rows = [("linear 1e5, lmer(REML=FALSE)", t_lin, (r["lmer_time"][0], r["lmer_cpu"][0]), 0.1),
            ("logit 5e4, glmer(nAGQ=13)", t_lgt, (r["glmer_time"][0], r["glmer_cpu"][0]), 0.05)]
    print("times in s: CPU (wall); torchmix median of the runs [min CPU]; the goal is judged on CPU time")
    print(f"{'model':<30}{'torchmix s':>22}{'lme4 s':>16}{'ratio CPU (wall)':>19}  goal")
    for name, tt, tr, goal in rows:
        ratio, ratio_wall = tt[1] / tr[1], tt[0] / tr[0]
        print(f"{name:<30}{tt[1]:>7.3f} ({tt[0]:.3f}) [{tt[3]:.3f}]{tr[1]:>8.3f} ({tr[0]:.3f}){ratio:>9.3f} "
              f"({ratio_wall:.3f})  <= {goal}  {'MET' if ratio <= goal else 'NOT MET'}")
    print(f"load average {os.getloadavg()[0]:.1f}: other work on the machine disturbs the figures")
    print("agreement (torchmix vs lme4):")
    print(f"  linear coef max |diff| {np.max(np.abs(m_lin.coef.to_numpy() - r['lmer_coef'])):.2e}, "
          f"lnl {m_lin.lnl:.4f} vs {r['lmer_loglik'][0]:.4f}, "
          f"variances {np.round(m_lin.varcomp.to_numpy(), 5)} vs {np.round(r['lmer_var'], 5)}")
    print(f"  logit coef max |diff| {np.max(np.abs(m_lgt.coef.to_numpy() - r['glmer_coef'])):.2e}, "
          f"lnl {m_lgt.lnl:.4f} vs {r['glmer_loglik'][0]:.4f}, "
          f"variance {np.round(m_lgt.varcomp.to_numpy(), 5)} vs {np.round(r['glmer_var'], 5)}")


if __name__ == "__main__":
    main()
