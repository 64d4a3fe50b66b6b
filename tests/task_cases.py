"""Models fitted both in one process and under a process group by tests/test_distributed_tasks.py.

Run as a script under ``torch.distributed.run`` it fits the cases named on the command line in
every process and rank 0 writes what :func:`numbers` extracts to a pickle file::

    python -m torch.distributed.run --nproc_per_node=2 tests/task_cases.py OUT.pkl pv_gauss ...
"""

from __future__ import annotations

import pickle
import sys

import numpy as np
import pandas as pd

import torchmix as tm


def pv_data(n_groups=30, n_rows=12, n_pv=5, seed=3) -> pd.DataFrame:
    """Two-level data with weights, a covariate, ``n_pv`` gaussian and ``n_pv`` binary plausible values."""
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(n_groups), n_rows)
    n = g.size
    u = rng.normal(0, 1.0, n_groups)[g]
    slope = rng.normal(0, 0.3, n_groups)[g]
    x = rng.normal(size=n)
    base = 1.0 + 0.5 * x + u + slope * x
    frame = {"g": g.astype(str), "x": x, "w1": rng.uniform(1, 3, n), "w2": rng.uniform(1, 2, n_groups)[g]}
    for k in range(n_pv):
        frame[f"pv{k + 1}"] = base + rng.normal(0, 1.0, n)
        frame[f"b{k + 1}"] = (rng.uniform(size=n) < 1 / (1 + np.exp(-(base - 1.0 + 0.3 * rng.normal(size=n))))
                              ).astype(float)
    data = pd.DataFrame(frame)
    fay = rng.integers(0, 2, size=(8, n_groups)) * 1.0 + 0.5      # Fay factors 0.5 / 1.5 per group
    for r in range(fay.shape[0]):
        data[f"rw{r + 1}"] = data["w1"] * data["w2"] * fay[r][g]
    return data


def fit_case(name: str, n_pv: int = 5):
    """The fit of case ``name`` (the same call in one process and under a process group)."""
    data = pv_data(n_pv=n_pv)
    pv = [f"pv{k + 1}" for k in range(n_pv)]
    common = dict(weights=["w1", "w2"], progress=False)
    if name == "pv_gauss":
        return tm.mix("y ~ x + (1 + x | g)", data, plausible_values={"y": pv}, **common)
    if name == "pv_logit":
        return tm.mix("y ~ x + (1 | g)", data, family="binomial", n_quad=7,
                      plausible_values={"y": [f"b{k + 1}" for k in range(n_pv)]}, **common)
    if name == "rep_gauss":
        return tm.mix("pv1 ~ x + (1 | g)", data, replicate_weights="rw\\d+", replicate_method="Fay", fay_rho=0.5,
                      **common)
    if name == "rep_logit":
        return tm.mix("b1 ~ x + (1 | g)", data, family="binomial", n_quad=7, replicate_weights="rw\\d+",
                      replicate_method="Fay", fay_rho=0.5, **common)
    if name == "rep_pv":
        return tm.mix("y ~ x + (1 | g)", data, plausible_values={"y": pv[:3]}, replicate_weights="rw\\d+",
                      replicate_method="JK1", **common)
    if name == "pv2":  # fewer values than processes
        return tm.mix("y ~ x + (1 | g)", data, plausible_values={"y": pv[:2]}, **common)
    raise ValueError(name)


def numbers(res) -> dict:
    """Every number the tests compare: the pooled table and, per fit, estimates, SEs and lnl."""
    fits = getattr(res, "fits", None) or [res]
    out = {"frame": res.to_frame()[["estimate", "std_error"]].to_numpy(dtype=float), "fits": []}
    for f in fits:
        out["fits"].append({"coef": f.coef.to_numpy(dtype=float), "se": f.se.to_numpy(dtype=float),
                            "varcomp": f.varcomp.to_numpy(dtype=float),
                            "varcomp_se": f.varcomp_se.to_numpy(dtype=float), "lnl": float(f.lnl)})
    return out


def failure_messages(w) -> list:
    """The errors every process raises when the last one fails in a task-parallel step."""
    from torchmix.distributed.collect import all_gather, together
    from torchmix.errors import DataError

    def step():
        if w.rank == w.size - 1:
            raise DataError("column 'zz' is broken")
        return w.rank

    try:
        together(step, "a test step")
        mine = "no error"
    except Exception as exc:  # noqa: BLE001 - reported to the test
        mine = f"{type(exc).__name__}: {exc}"
    return all_gather(mine)


def main(argv) -> None:
    import torch.distributed as dist

    from torchmix.distributed import launched, process_group

    path, names = argv[0], argv[1:]
    with process_group():
        w = launched()
        got = {name: numbers(fit_case(name)) for name in names if name != "fail"}
        if "fail" in names:  # the last process raises; every process must hear of it
            got["fail"] = failure_messages(w)
        if w.rank == 0:
            got["world_size"] = w.size
            with open(path, "wb") as fh:
                pickle.dump(got, fh)
        dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1:])
