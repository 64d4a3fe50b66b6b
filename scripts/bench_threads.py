#!/usr/bin/env python3
"""Where more intra-op threads start to pay: the same fits with 1 thread and with all cores.

For gaussian fits (random intercept and slope, weights, groups of 25) and AGQ13 logit fits
(random intercept) of growing size, prints the best of ``--repeat`` times with ``num_threads=1``
and with ``num_threads=os.cpu_count()``, their ratio, and the problem size
:func:`torchmix.threads.problem_work` that the automatic choice compares with
``CROSSOVER_WORK``. Run it on a quiet machine: with other processes running, extra threads lose
at every size.

Usage: ``python scripts/bench_threads.py [--quick] [--repeat 3]``
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import torchmix  # noqa: E402
from bench_field import linear_data, logit_data  # noqa: E402
from torchmix.threads import CROSSOVER_WORK, problem_work  # noqa: E402


def best(fn, repeat):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    many = os.cpu_count() or 1
    repeat = 1 if args.quick else args.repeat
    lin_sizes = [10_000, 100_000] if args.quick else [10_000, 100_000, 1_000_000]
    lgt_sizes = [10_000, 50_000] if args.quick else [10_000, 50_000, 200_000]
    print(f"bench_threads: {platform.machine()}, {many} cores, torch {torch.__version__}, {datetime.date.today()}, "
          f"best of {repeat}; CROSSOVER_WORK = {CROSSOVER_WORK:.0e}")
    print(f"{'fit':<22}{'work':>10}{'1 thread s':>12}{f'{many} threads s':>14}{'ratio':>8}")
    torchmix.mix("y ~ x1 + (1 | g)", linear_data(2_000), progress=False)
    cases = [(f"gaussian {n:.0e}", linear_data(n), "y ~ x1 + x2 + x3 + (1 + x1 | g)", {}, problem_work(n, 4, 2))
             for n in lin_sizes]
    cases += [(f"logit AGQ13 {n:.0e}", logit_data(n), "y ~ x + (1 | g)", {"family": "binomial"},
               problem_work(n, 2, 1, 13)) for n in lgt_sizes]
    for name, df, formula, kw, work in cases:
        t = [best(lambda k=k: torchmix.mix(formula, df, ["w1", "w2"], progress=False, num_threads=k, **kw), repeat)
             for k in (1, many)]
        print(f"{name:<22}{work:>10.1e}{t[0]:>12.3f}{t[1]:>14.3f}{t[1] / t[0]:>8.2f}", flush=True)


if __name__ == "__main__":
    main()
