#!/usr/bin/env python3
"""Cold start: what a fresh process pays to import torchmix and fit a small model.

Runs ``--runs`` fresh Python processes (default 5) that only ``import torch``, and as many that
import torchmix, load the sleepstudy data and fit ``Reaction ~ Days + (1 + Days | Subject)``; prints
the median wall time of each and the difference (goal: at most 1.5 s). The processes alternate so
that a change of machine load affects both the same way. A last process reports whether the fit
imported ``torch._dynamo`` (it should not) and where the time goes inside it.

Usage: ``python scripts/bench_coldstart.py [--runs 5]`` (from the repository root or anywhere:
the torchmix next to this script is used).
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

ROOT = Path(__file__).resolve().parent.parent

BASELINE = "import torch"
FIT = ("import torchmix\n"
       "r = torchmix.mix('Reaction ~ Days + (1 + Days | Subject)', torchmix.load_dataset('sleepstudy'), "
       "progress=False)\n"
       "assert r.converged\n")
DETAIL = ("import sys, time\n"
          "t0 = time.perf_counter(); import torch; t1 = time.perf_counter()\n"
          "import torchmix; from torchmix import mix, load_dataset; t2 = time.perf_counter()\n"
          "d = load_dataset('sleepstudy'); t3 = time.perf_counter()\n"
          "r = mix('Reaction ~ Days + (1 + Days | Subject)', d, progress=False); t4 = time.perf_counter()\n"
          "print(f'  import torch {t1 - t0:.2f} s, import torchmix and its dependencies {t2 - t1:.2f} s, '\n"
          "      f'load data {t3 - t2:.2f} s, fit {t4 - t3:.2f} s')\n"
          "print('  torch._dynamo imported by the fit:', 'torch._dynamo' in sys.modules)\n")


def run(code: str) -> float:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=str(ROOT))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    import torch  # noqa: F401  (only for the version line; the children are fresh processes)

    print(f"cold start, {platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"torch {torch.__version__}, {datetime.date.today()}")
    run(BASELINE)  # file-system cache warm for both
    base, fit = [], []
    for _ in range(args.runs):
        base.append(run(BASELINE))
        fit.append(run(FIT))
    mb, mf = statistics.median(base), statistics.median(fit)
    print(f"  import torch only:                 median {mb:.2f} s  ({', '.join(f'{t:.2f}' for t in base)})")
    print(f"  import torchmix + fit sleepstudy:  median {mf:.2f} s  ({', '.join(f'{t:.2f}' for t in fit)})")
    print(f"  difference {mf - mb:.2f} s (goal <= 1.5 s): {'MET' if mf - mb <= 1.5 else 'NOT MET'}")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    subprocess.run([sys.executable, "-c", DETAIL], check=True, env=env, cwd=str(ROOT))


if __name__ == "__main__":
    main()
