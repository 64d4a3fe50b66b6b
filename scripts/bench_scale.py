"""Benchmark: fits at the scale of a whole PISA cycle, on 1 and 2 processes (torch.distributed).

Simulated data of the size of PISA 2022 (fixed seed): 613,744 students in 21,629 schools in 81
countries (country sizes and school sizes vary), three covariates, a binary outcome, unconditional
student and school weights. Cases:

* ``null``  -- 3-level linear null model ``y ~ 1 + (1 | school) + (1 | country)``;
* ``slope`` -- the same with 3 covariates and a random slope,
  ``y ~ x1 + x2 + x3 + (1 + x1 | school) + (1 | country)``;
* ``logit`` -- 2-level logit ``b ~ x1 + x2 + x3 + (1 | school)``, adaptive quadrature with 13 points;
* ``pv``    -- 20 plausible values of a 2-level logit (10^5 rows, 5,000 schools): task-parallel over
  the processes (:mod:`torchmix.distributed.tasks`);
* ``big``   -- a 10^7-row 2-level linear model ``y ~ x1 + (1 | school)`` (200,000 schools), in one
  process only: time and peak memory (goal: within 24 GiB).

Each case runs in fresh processes started by this script: one process (``python``), and P processes
under ``python -m torch.distributed.run --nproc_per_node=P`` (gloo, on the CPU), every process with
one torch thread. The time is that of the ``torchmix.mix`` call (including its first-fit warm-up,
and the import of the model code, ``torchmix.api``, that ``torchmix.mix`` triggers on first use:
shown apart in the ``import`` column, a cost that every process pays alike), the slowest process's
(wall clock, and CPU time of the busiest process, the steadier figure on a shared machine; the goals
are judged on wall time), the median of ``--repeat`` runs (default 3, 1 and P processes alternating)
with the range of the wall times; the memory is each process's peak resident set size. The ``pv``
case times the K fits after one small warm-up fit in each process. The script prints a table, the
speed-up of P processes over one, the largest relative difference between their estimates, and GOAL
lines (MET / NOT MET) for the goals of the distributed design:
2 processes >= 1.6x faster on the 3-level linear model and on the logit at PISA size, >= 1.8x on
the 20 plausible values, and the 10^7-row model within 24 GiB.

Single fits (``null``, ``slope``, ``logit``) are faster on several processes only where the
likelihood is data-parallel (each process holding the rows of its own top-level groups); otherwise
every process runs the whole fit and the speed-up is about 1.

Usage: ``python scripts/bench_scale.py [--cases null slope logit pv big] [--procs 1 2]
[--students 613744] [--big-rows 10000000] [--pv-rows 100000] [--k 20] [--repeat 3] [--timeout 3600]``
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import resource
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import pandas as pd

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

PISA = dict(students=613_744, schools=21_629, countries=81)
REFERENCE = {"null": 4.0, "slope": 1.9, "logit": 7.2}   # one process, 2 threads (seconds)
GOALS = {"null": 1.6, "logit": 1.6, "pv": 1.8}
BIG_GOAL_GIB = 24.0


# ----------------------------------------------------------------------------- data


def simulate_pisa(students: int, schools: int, countries: int, seed: int = 2022) -> pd.DataFrame:
    """Students in schools in countries, with covariates, weights, a score ``y`` and a binary ``b``."""
    rng = np.random.default_rng(seed)
    share = rng.lognormal(0.0, 0.8, countries)
    per_country = 1 + rng.multinomial(schools - countries, share / share.sum())
    country_of_school = np.repeat(np.arange(countries), per_country)
    size = rng.lognormal(0.0, 0.5, schools)
    per_school = 1 + rng.multinomial(students - schools, size / size.sum())
    school = np.repeat(np.arange(schools), per_school)
    country = country_of_school[school]
    x1, x2, x3 = rng.normal(size=students), rng.normal(size=students), rng.binomial(1, 0.5, students) * 1.0
    u_c = rng.normal(0, 0.3, countries)[country]
    u_s = rng.normal(0, 0.4, schools)[school]
    slope = rng.normal(0, 0.15, schools)[school]
    y = 0.1 + u_c + u_s + (0.3 + slope) * x1 - 0.2 * x2 + 0.1 * x3 + rng.normal(0, 0.9, students)
    eta = -0.2 + 0.6 * x1 - 0.3 * x2 + 0.2 * x3 + 2.0 * u_s
    w_school = rng.uniform(1.0, 30.0, schools)[school]
    return pd.DataFrame({"country": country, "school": school, "x1": x1, "x2": x2, "x3": x3, "y": y,
                         "b": (rng.uniform(size=students) < 1 / (1 + np.exp(-eta))).astype(float),
                         "w1": w_school * rng.uniform(1.0, 3.0, students), "w2": w_school, "w3": 1.0})


def simulate_pv(rows: int, k: int, group_size: int = 20, seed: int = 2024) -> pd.DataFrame:
    """Two-level data with weights and ``k`` binary plausible values ``pv1..pvK``."""
    rng = np.random.default_rng(seed)
    groups = rows // group_size
    school = np.repeat(np.arange(groups), group_size)
    x1, x2 = rng.normal(size=rows), rng.binomial(1, 0.5, rows) * 1.0
    eta = -0.3 + 0.8 * x1 - 0.5 * x2 + rng.normal(0, 0.8, groups)[school]
    w2 = rng.uniform(1.0, 20.0, groups)[school]
    data = {"school": school, "x1": x1, "x2": x2, "w1": w2 * rng.uniform(1.0, 5.0, rows), "w2": w2}
    for j in range(1, k + 1):
        p = 1 / (1 + np.exp(-(eta + rng.normal(0, 0.3, rows))))
        data[f"pv{j}"] = (rng.uniform(size=rows) < p).astype(float)
    return pd.DataFrame(data)


def simulate_big(rows: int, group_size: int = 50, seed: int = 7) -> pd.DataFrame:
    """A 2-level linear model's data, ``rows`` rows in groups of ``group_size``, with weights."""
    rng = np.random.default_rng(seed)
    groups = rows // group_size
    school = np.repeat(np.arange(groups, dtype=np.int64), group_size)
    x1 = rng.normal(size=rows)
    y = 1.0 + 0.5 * x1 + rng.normal(0, 0.6, groups)[school] + rng.normal(0, 1.0, rows)
    w2 = rng.uniform(1.0, 10.0, groups)
    return pd.DataFrame({"school": school, "x1": x1, "y": y, "w1": w2[school] * rng.uniform(1.0, 2.0, rows),
                         "w2": w2[school]})


def model_call(case: str, args):
    """``(data, formula, keyword arguments)`` of one case's ``torchmix.mix`` call."""
    if case in ("null", "slope", "logit"):
        data = simulate_pisa(args.students, max(int(round(args.students * PISA["schools"] / PISA["students"])), 2),
                             PISA["countries"] if args.students >= 100 * PISA["countries"] else 3)
        if case == "null":
            return data, "y ~ 1 + (1 | school) + (1 | country)", dict(weights=["w1", "w2", "w3"])
        if case == "slope":
            return data, "y ~ x1 + x2 + x3 + (1 + x1 | school) + (1 | country)", dict(weights=["w1", "w2", "w3"])
        return data, "b ~ x1 + x2 + x3 + (1 | school)", dict(weights=["w1", "w2"], family="binomial", n_quad=13)
    if case == "pv":
        data = simulate_pv(args.pv_rows, args.k)
        return data, "y ~ x1 + x2 + (1 | school)", dict(
            weights=["w1", "w2"], family="binomial", n_quad=13,
            plausible_values={"y": [f"pv{j}" for j in range(1, args.k + 1)]})
    if case == "big":
        return simulate_big(args.big_rows), "y ~ x1 + (1 | school)", dict(weights=["w1", "w2"])
    raise ValueError(case)


# ----------------------------------------------------------------------------- one process of a run


def peak_rss_gib() -> float:
    """This process's peak resident set size (GiB)."""
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib * (1 if sys.platform != "darwin" else 1 / 1024) / 2 ** 20


def worker(args) -> None:
    """Fit one case in this process (one of a torchrun group, or alone) and write the figures (rank 0)."""
    import torch

    import torchmix
    from torchmix.distributed import launched, process_group
    from torchmix.distributed.collect import all_gather

    torch.set_num_threads(1)
    with process_group("cpu", args.timeout):
        data, formula, kwargs = model_call(args.worker, args)
        group = launched()
        if args.worker == "pv":  # one small fit first: the figure is that of the K fits, not of start-up
            warm = simulate_pv(1000, 2)
            torchmix.mix("y ~ x1 + x2 + (1 | school)", warm, weights=["w1", "w2"], family="binomial",
                         plausible_values={"y": ["pv1", "pv2"]}, progress=False, num_threads=1)
        if group is not None:
            torch.distributed.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        importlib.import_module("torchmix.api")  # what torchmix.mix loads on first use (timed, reported apart)
        imported = time.perf_counter() - t0
        res = torchmix.mix(formula, data, progress=False, num_threads=1, **kwargs)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        figures = all_gather({"wall_s": wall, "cpu_s": cpu, "import_s": imported, "peak_rss_gib": peak_rss_gib()})
        if group is None or group.rank == 0:
            table = res.to_frame()
            out = {"case": args.worker, "world_size": 1 if group is None else group.size,
                   "rows": int(len(data)), "wall_s": max(f["wall_s"] for f in figures),
                   "cpu_s": max(f["cpu_s"] for f in figures), "import_s": max(f["import_s"] for f in figures),
                   "peak_rss_gib": [f["peak_rss_gib"] for f in figures],
                   "estimates": table["estimate"].tolist(), "std_errors": table["std_error"].tolist(),
                   "converged": bool(np.all(getattr(res, "converged", True)))}
            with open(args.out, "w") as fh:
                json.dump(out, fh)


# ----------------------------------------------------------------------------- the driver


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(case: str, procs: int, args) -> dict:
    """Run ``case`` in ``procs`` fresh processes; returns the figures rank 0 wrote."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "figures.json")
        script = [os.path.abspath(__file__), "--worker", case, "--out", out, "--students", str(args.students),
                  "--big-rows", str(args.big_rows), "--pv-rows", str(args.pv_rows), "--k", str(args.k),
                  "--timeout", str(args.timeout)]
        if procs == 1:
            cmd = [sys.executable, *script]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}", "--nnodes=1",
                   "--master_addr=127.0.0.1", f"--master_port={_free_port()}", *script]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"{case} on {procs} process(es) failed:\n{proc.stderr[-4000:]}")
        with open(out) as fh:
            figures = json.load(fh)
        figures["process_wall_s"] = time.perf_counter() - t0
        return figures


def rel_diff(a: list, b: list) -> float:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    ok = np.isfinite(a) & np.isfinite(b)
    return float(np.max(np.abs(a[ok] - b[ok]) / np.maximum(np.abs(a[ok]), 1e-12))) if ok.any() else 0.0


def median_run(runs):
    """The run of median wall time among ``runs`` (the lower middle one of an even number), with its
    median CPU time and the range of the wall times; None when a run failed."""
    if not runs:
        return None
    order = sorted(runs, key=lambda f: f["wall_s"])
    fig = dict(order[(len(order) - 1) // 2])
    fig["cpu_s"] = sorted(f["cpu_s"] for f in runs)[(len(runs) - 1) // 2]
    fig["wall_min"], fig["wall_max"] = order[0]["wall_s"], order[-1]["wall_s"]
    return fig


def goal_line(text: str, met: bool, detail: str) -> str:
    return f"GOAL {text}: {'MET' if met else 'NOT MET'} ({detail})"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", nargs="+", default=["null", "slope", "logit", "pv", "big"],
                   choices=["null", "slope", "logit", "pv", "big"])
    p.add_argument("--procs", nargs="+", type=int, default=[1, 2], help="process counts to compare (first: base)")
    p.add_argument("--students", type=int, default=PISA["students"], help="rows of the PISA-sized data")
    p.add_argument("--big-rows", type=int, default=10_000_000, help="rows of the one-process linear model")
    p.add_argument("--pv-rows", type=int, default=100_000, help="rows of the plausible-value logit")
    p.add_argument("--k", type=int, default=20, help="plausible values of the task-parallel case")
    p.add_argument("--repeat", type=int, default=3,
                   help="runs of each case and process count (alternating); the figures are the medians")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds one run may take")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0

    import torch

    print(f"torchmix bench_scale  {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC  "
          f"machine: {platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__}, 1 thread per process")
    print(f"PISA-sized data: {args.students:,} students; plausible values: {args.k} x {args.pv_rows:,}-row logit")
    print(f"{'case':<6} {'procs':>5} {'rows':>11} {'fit s':>8} {'import':>6} {'speed-up':>8} {'CPU s':>7} {'speed-up':>8} "
          f"{'peak GiB/process':>18} {'max rel diff':>12}")
    results, goals = {}, []
    for case in args.cases:
        counts = [1] if case == "big" else args.procs
        runs = {procs: [] for procs in counts}
        for _ in range(1 if case == "big" else args.repeat):  # alternating, so that drift hits every count alike
            for procs in counts:
                if runs[procs] is None:  # failed before
                    continue
                try:
                    runs[procs].append(launch(case, procs, args))
                except (RuntimeError, subprocess.TimeoutExpired) as exc:
                    print(f"{case:<6} {procs:>5}  FAILED: {str(exc).strip().splitlines()[-1]}")
                    runs[procs] = None
        base = None
        for procs in counts:
            fig = median_run(runs[procs])
            results[(case, procs)] = fig
            if fig is None:
                continue
            base = fig if base is None else base
            speed, cpu_speed = base["wall_s"] / fig["wall_s"], base["cpu_s"] / fig["cpu_s"]
            diff = rel_diff(base["estimates"] + base["std_errors"], fig["estimates"] + fig["std_errors"])
            mem = ", ".join(f"{m:.2f}" for m in fig["peak_rss_gib"])
            spread = "" if len(runs[procs]) == 1 else f"  (wall {fig['wall_min']:.2f}-{fig['wall_max']:.2f} s)"
            print(f"{case:<6} {procs:>5} {fig['rows']:>11,} {fig['wall_s']:>8.2f} {fig['import_s']:>6.2f} {speed:>7.2f}x "
                  f"{fig['cpu_s']:>7.2f} "
                  f"{cpu_speed:>7.2f}x {mem:>18} {diff:>12.1e}" + ("" if fig["converged"] else "  (not converged)")
                  + spread, flush=True)
    for case, goal in GOALS.items():
        if case not in args.cases or 2 not in args.procs or 1 not in args.procs:
            continue
        one, two = results.get((case, 1)), results.get((case, 2))
        what = {"null": "3-level linear model at PISA size", "logit": "2-level logit AGQ13 at PISA size",
                "pv": f"task-parallel {args.k} plausible values of a logit"}[case]
        if one is None or two is None:
            goals.append(goal_line(f"{what}, 2 processes >= {goal}x faster than 1", False, "a run failed"))
            continue
        speed, cpu_speed = one["wall_s"] / two["wall_s"], one["cpu_s"] / two["cpu_s"]
        goals.append(goal_line(f"{what}, 2 processes >= {goal}x faster than 1", speed >= goal,
                               f"wall {one['wall_s']:.2f} s / {two['wall_s']:.2f} s = {speed:.2f}x; CPU time of "
                               f"the busiest process {one['cpu_s']:.2f} s / {two['cpu_s']:.2f} s = {cpu_speed:.2f}x"))
    if "big" in args.cases:
        big = results.get(("big", 1))
        if big is None:
            goals.append(goal_line(f"{args.big_rows:,}-row 2-level linear model in one process within "
                                   f"{BIG_GOAL_GIB:g} GiB", False, "the run failed"))
        else:
            mem = big["peak_rss_gib"][0]
            goals.append(goal_line(f"{args.big_rows:,}-row 2-level linear model in one process within "
                                   f"{BIG_GOAL_GIB:g} GiB", mem <= BIG_GOAL_GIB and args.big_rows >= 10_000_000,
                                   f"{big['wall_s']:.1f} s, peak {mem:.2f} GiB"))
    print("reference (one process, 2 threads): " + ", ".join(f"{c} {s:g} s" for c, s in REFERENCE.items())
          + ", peak memory 0.9 GB")
    print("note: single fits are spread over processes only where the likelihood is data-parallel; "
          "on a shared machine wall times are noisy")
    for line in goals:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
