"""Check that fits on CUDA equal the CPU fits, and time both.

Fits, on the GPU and on the CPU (float64, deterministic algorithms on the GPU):

* ``sleepstudy``    -- ``Reaction ~ Days + (1 + Days | Subject)`` (lme4's data, shipped);
* ``contraception`` -- ``use01 ~ age + I(age**2) + urban + livch + (1 | district)``, logit, AGQ 13;
* ``logit1e6``      -- a simulated 10^6-row 2-level logit ``b ~ x1 + x2 + (1 | school)`` (20,000
  schools), AGQ 13;
* ``pisa3``         -- the simulated PISA-2022-sized 3-level linear model of ``bench_scale.py``
  (613,744 students, 21,629 schools, 81 countries), ``y ~ x1 + x2 + x3 + (1 + x1 | school) + (1 | country)``.

For each it prints the CPU and GPU wall times (the GPU's first fit includes CUDA start-up) and the
largest relative differences of the log-likelihood, the coefficients, their standard errors and
the variance components; the last line says whether every difference is below ``--rtol``
(default 1e-6). Without a CUDA device it says so and exits with status 0 without fitting
(``--cpu-only`` then runs and times the CPU fits alone, to check the script itself).

Usage: ``python scripts/check_cuda.py [--cases sleepstudy contraception logit1e6 pisa3] [--rtol 1e-6]
[--scale 1.0] [--cpu-only]``; ``--scale 0.01`` shrinks the simulated data for a quick run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import numpy as np
import pandas as pd

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

CASES = ("sleepstudy", "contraception", "logit1e6", "pisa3")


def simulate_logit(rows: int, group_size: int = 50, seed: int = 11) -> pd.DataFrame:
    """A 2-level logit's data with student and school weights."""
    rng = np.random.default_rng(seed)
    groups = max(rows // group_size, 2)
    school = np.repeat(np.arange(groups), group_size)[:rows]
    x1, x2 = rng.normal(size=rows), rng.binomial(1, 0.5, rows) * 1.0
    eta = -0.4 + 0.7 * x1 - 0.3 * x2 + rng.normal(0, 0.9, groups)[school]
    w2 = rng.uniform(1.0, 20.0, groups)
    return pd.DataFrame({"school": school, "x1": x1, "x2": x2, "w1": w2[school] * rng.uniform(1, 3, rows),
                         "w2": w2[school], "b": (rng.uniform(size=rows) < 1 / (1 + np.exp(-eta))) * 1.0})


def model(case: str, scale: float):
    """``(data, formula, keyword arguments)`` of a case."""
    import torchmix as tm

    if case == "sleepstudy":
        return tm.load_dataset("sleepstudy"), "Reaction ~ Days + (1 + Days | Subject)", {}
    if case == "contraception":
        return (tm.load_dataset("contraception"), "use01 ~ age + I(age**2) + urban + livch + (1 | district)",
                dict(family="binomial", n_quad=13))
    if case == "logit1e6":
        return (simulate_logit(int(1_000_000 * scale)), "b ~ x1 + x2 + (1 | school)",
                dict(weights=["w1", "w2"], family="binomial", n_quad=13))
    if case == "pisa3":
        from bench_scale import PISA, simulate_pisa

        students = int(PISA["students"] * scale)
        data = simulate_pisa(students, max(int(PISA["schools"] * scale), 2), PISA["countries"] if scale >= 0.2 else 3)
        return data, "y ~ x1 + x2 + x3 + (1 + x1 | school) + (1 | country)", dict(weights=["w1", "w2", "w3"])
    raise ValueError(case)


def numbers(res) -> dict:
    return {"lnl": np.array([res.lnl]), "coef": res.coef.to_numpy(float), "se": res.se.to_numpy(float),
            "varcomp": res.varcomp.to_numpy(float)}


def rel(a: np.ndarray, b: np.ndarray) -> float:
    ok = np.isfinite(a) & np.isfinite(b)
    if not ok.any():
        return 0.0
    return float(np.max(np.abs(a[ok] - b[ok]) / np.maximum(np.abs(a[ok]), 1e-12)))


def fit(case: str, device: str, scale: float):
    import torch

    import torchmix as tm

    data, formula, kwargs = model(case, scale)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = tm.mix(formula, data, device=device, deterministic=device != "cpu", progress=False, **kwargs)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return res, time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    p.add_argument("--rtol", type=float, default=1e-6, help="largest relative difference accepted")
    p.add_argument("--scale", type=float, default=1.0, help="size factor of the simulated data sets")
    p.add_argument("--cpu-only", action="store_true", help="without CUDA: run and time the CPU fits only")
    args = p.parse_args(argv)

    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.cpu_only:
        print("check_cuda: no CUDA device on this machine (torch.cuda.is_available() is False); "
              "the CUDA check has not run")
        return 0
    name = torch.cuda.get_device_name(0) if cuda else "none"
    print(f"check_cuda: torch {torch.__version__}, CUDA {torch.version.cuda}, device: {name}, scale {args.scale:g}")
    print(f"{'case':<14} {'rows':>9} {'CPU s':>8} {'GPU s':>8}  largest relative difference (lnl, coef, se, varcomp)")
    worst = 0.0
    for case in args.cases:
        cpu, t_cpu = fit(case, "cpu", args.scale)
        if not cuda:
            print(f"{case:<14} {cpu.nobs:>9,} {t_cpu:>8.2f} {'-':>8}  (no CUDA device)", flush=True)
            continue
        gpu, t_gpu = fit(case, "cuda", args.scale)
        a, b = numbers(cpu), numbers(gpu)
        diffs = {k: rel(a[k], b[k]) for k in a}
        worst = max(worst, *diffs.values())
        text = ", ".join(f"{k} {v:.1e}" for k, v in diffs.items())
        print(f"{case:<14} {cpu.nobs:>9,} {t_cpu:>8.2f} {t_gpu:>8.2f}  {text}", flush=True)
    if cuda:
        verdict = "MET" if worst <= args.rtol else "NOT MET"
        print(f"GOAL CUDA fits equal the CPU fits to {args.rtol:g} relative: {verdict} (largest {worst:.1e})")
    else:
        print("check_cuda: CPU fits only; the CUDA check has not run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
