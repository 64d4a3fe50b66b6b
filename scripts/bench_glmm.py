#!/usr/bin/env python3
"""Benchmark of the GLMM quadrature likelihood and fit.

Model: two-level random-intercept logit with informative weights (level-2 weights depend on the
random effect, level-1 weights on the response), ``n_quad`` = 13. For each size N it prints

* the time of one likelihood-and-gradient evaluation (modes re-adapted, warm-started from a nearby
  point, as inside the optimiser) and its ratio to one ``softplus`` pass over an (N x 13) float64
  tensor measured in the same run (goal: <= 4);
* the time of a full fit with standard errors (after a warm-up fit on small data, since the first
  optimiser of a process pays a one-off import) and that time in units of one evaluation (goal at
  N = 1e5: <= 60), with the number of likelihood evaluations the fit made.

Times are CPU times of this process (less disturbed than wall time when other work shares the
machine). Evaluations and softplus passes are timed alternately, so that both see the same load;
the ratio is given as min(eval) / min(softplus) (the least disturbed runs; used for the goal) and as
the median of the ratios of adjacent pairs. By default the benchmark runs on the number of intra-op
threads that a fit of this size runs on (:func:`torchmix.threads.choose_threads`; one thread at these
sizes), so the figure is that of an evaluation inside a fit; ``--threads`` overrides it. The last line
states the goal at 10^5 rows: one evaluation with gradient costs at most 4 softplus passes (MET or NOT MET).

Usage: ``python scripts/bench_glmm.py [--sizes 1e4 1e5 1e6] [--fit-sizes ...] [--threads K] [--reps R]``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # this checkout's torchmix

from torchmix.families import get_family  # noqa: E402
from torchmix.fit.glmm import fit_glmm  # noqa: E402
from torchmix.likelihood.agq import AGQLogLik  # noqa: E402
from torchmix.tensors import LevelTensors, ModelTensors  # noqa: E402
from torchmix.threads import choose_threads, fit_threads, problem_work  # noqa: E402


def simulate(n_rows: int, group_size: int, seed: int) -> ModelTensors:
    rng = np.random.default_rng(seed)
    n_groups = max(n_rows // group_size, 2)
    g = np.sort(rng.integers(0, n_groups, n_rows))
    g = np.unique(g, return_inverse=True)[1]
    n_groups = int(g.max()) + 1
    x = rng.normal(size=n_rows)
    u = rng.normal(size=n_groups)
    eta = -0.5 + 0.7 * x + u[g]
    y = (rng.uniform(size=n_rows) < 1.0 / (1.0 + np.exp(-eta))).astype(float)
    w2 = np.exp(0.5 * u)  # informative: groups with large effects are over-represented
    c1 = np.where(y == 1.0, 1.5, 1.0) * rng.uniform(0.8, 1.2, n_rows)
    f64 = torch.float64
    group = torch.as_tensor(g, dtype=torch.int64)
    w2t = torch.as_tensor(w2, dtype=f64)
    lv = LevelTensors(Z=torch.ones(n_rows, 1, dtype=f64), term_sizes=(1,), group=group, parent=None,
                      n_groups=n_groups, w_cond=w2t, w_uncond=w2t, top=torch.arange(n_groups))
    X = torch.as_tensor(np.c_[np.ones(n_rows), x], dtype=f64)
    c1t = torch.as_tensor(c1, dtype=f64)
    return ModelTensors(X=X, y=torch.as_tensor(y, dtype=f64), w1_cond=c1t, w1_uncond=c1t * w2t[group], levels=(lv,))


def best(times):
    return min(times), statistics.median(times)


def bench_size(n_rows: int, args) -> dict:
    work = problem_work(n_rows, 2, 1, args.n_quad)
    with fit_threads(choose_threads(work, args.threads)):
        out = _bench_size(n_rows, args)
    out["threads"] = args.threads or choose_threads(work) or torch.get_num_threads()
    return out


def _bench_size(n_rows: int, args) -> dict:
    tens = simulate(n_rows, args.group_size, args.seed)
    fam = get_family("binomial")
    mod = AGQLogLik(tens, fam, args.n_quad)
    points = [(torch.tensor([-0.5, 0.7], dtype=torch.float64), torch.tensor([[1.0]], dtype=torch.float64)),
              (torch.tensor([-0.499, 0.701], dtype=torch.float64), torch.tensor([[1.001]], dtype=torch.float64))]

    def evaluate(k):
        beta = points[k % 2][0].clone().requires_grad_(True)
        lam = points[k % 2][1].clone().requires_grad_(True)
        val = mod.loglik(beta, [lam]).sum()
        val.backward()

    ref = torch.randn(n_rows, args.n_quad, dtype=torch.float64)
    evaluate(0)
    evaluate(1)
    t_eval, t_soft = [], []
    clock = time.process_time
    for k in range(args.reps):
        t0 = clock()
        evaluate(k)
        t_eval.append(clock() - t0)
        t0 = clock()
        torch.nn.functional.softplus(ref)
        t_soft.append(clock() - t0)
    out = {"n": n_rows, "groups": tens.levels[0].n_groups, "eval": best(t_eval), "softplus": best(t_soft),
           "paired": statistics.median(e / s for e, s in zip(t_eval, t_soft))}
    if n_rows in args.fit_sizes:
        t0, c0 = time.perf_counter(), clock()
        fit = fit_glmm(tens, fam, n_quad=args.n_quad, progress=False)
        out["fit"], out["fit_wall"] = clock() - c0, time.perf_counter() - t0
        out["fit_evals"] = fit.extra["n_evals"] + fit.extra["n_evals_laplace"]
        out["converged"] = fit.converged
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e4, 1e5, 1e6])
    parser.add_argument("--fit-sizes", type=float, nargs="*", default=None,
                        help="sizes for which the full fit is timed (default: all)")
    parser.add_argument("--group-size", type=int, default=20, help="mean rows per group")
    parser.add_argument("--n-quad", type=int, default=13)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: those a fit of each size runs on)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    args.sizes = [int(s) for s in args.sizes]
    args.fit_sizes = set(args.sizes if args.fit_sizes is None else [int(s) for s in args.fit_sizes])
    print(f"torchmix GLMM benchmark, {datetime.date.today().isoformat()}")
    print(f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__} (process default {torch.get_num_threads()} threads), "
          f"python {platform.python_version()}")
    print(f"model: 2-level random-intercept logit, informative weights, n_quad={args.n_quad}, "
          f"~{args.group_size} rows per group; times are min (median) of {args.reps} runs; ratio = "
          "min eval / min softplus (median of paired ratios); fit+SE is CPU time (wall time)\n")
    # warm-up: the first optimiser in a process imports torch._dynamo (about a second), not ours to time
    fit_glmm(simulate(2000, args.group_size, args.seed), get_family("binomial"), n_quad=args.n_quad, progress=False)
    header = (f"{'rows':>9} {'groups':>7} {'thr':>3} {'eval+grad s':>19} {'softplus s':>19} {'ratio':>13} "
              f"{'fit+SE s':>15} {'fit/eval':>8} {'evals':>6}")
    print(header)
    print("-" * len(header))
    goal = None
    for n in args.sizes:
        r = bench_size(n, args)
        ratio = r["eval"][0] / r["softplus"][0]
        if n == 100_000:
            goal = (ratio, r["paired"])
        line = (f"{r['n']:>9d} {r['groups']:>7d} {r['threads']:>3d} {r['eval'][0]:>9.4f} ({r['eval'][1]:.4f}) "
                f"{r['softplus'][0]:>9.5f} ({r['softplus'][1]:.5f}) {ratio:>6.2f} ({r['paired']:.2f})")
        if "fit" in r:
            line += f" {r['fit']:>7.2f} ({r['fit_wall']:.2f}) {r['fit'] / r['eval'][0]:>8.1f} {r['fit_evals']:>6d}"
            if not r["converged"]:
                line += "  (not converged)"
        print(line, flush=True)
    print("\ngoals: ratio <= 4; fit/eval <= 60 at 1e5 rows")
    if goal is not None:
        print(f"GOAL one AGQ evaluation with gradient <= 4 softplus passes over N x {args.n_quad} at 10^5 rows: "
              f"{goal[0]:.2f} (min/min; median of paired ratios {goal[1]:.2f}) -> "
              f"{'MET' if goal[0] <= 4 else 'NOT MET'} (load average {os.getloadavg()[0]:.1f}; "
              "other work on the machine disturbs the figures)")


if __name__ == "__main__":
    main()
