"""One process of a gloo group started by tests/test_distributed.py.

``python distributed_worker.py SPEC``: SPEC is JSON with ``rank``, ``size``, ``port``, ``out`` (a file
name with ``{rank}``), ``cases`` (names in distributed_cases.py), ``timeout`` (seconds) and optionally
``fail_rank``/``fail_after``/``fail_how`` (this rank exits or hangs in its ``fail_after``-th
likelihood evaluation). Writes a pickle of ``{case: numbers or {"error": ..., "message": ...}}``.
"""

from __future__ import annotations

import datetime
import json
import os
import pickle
import sys
import time


def _inject_failure(after: int, how: str) -> None:
    """This process's ``after``-th gaussian likelihood evaluation exits (``how="exit"``) or hangs."""
    from torchmix.likelihood.gaussian import GaussianLikelihood

    original = GaussianLikelihood.integrate
    calls = {"n": 0}

    def integrate(self, thetas):
        calls["n"] += 1
        if calls["n"] >= after:
            if how == "exit":
                os._exit(7)
            time.sleep(3600)
        return original(self, thetas)

    GaussianLikelihood.integrate = integrate


def main() -> int:
    spec = json.loads(sys.argv[1])
    rank, size = int(spec["rank"]), int(spec["size"])
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(spec["port"]), RANK=str(rank),
                      WORLD_SIZE=str(size), OMP_NUM_THREADS="1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    from torchmix.distributed.collectives import set_collective_timeout

    set_collective_timeout(float(spec["timeout"]))
    if spec.get("fail_rank") == rank:
        _inject_failure(int(spec.get("fail_after", 3)), spec.get("fail_how", "raise"))
    import distributed_cases

    out, code = {}, 0
    for name in spec["cases"]:
        try:
            res = distributed_cases.fit(name, rank)
        except Exception as exc:  # reported to the test through the file
            out[name], code = {"error": type(exc).__name__, "message": str(exc)}, 3
            continue
        out[name] = distributed_cases.extract(res)
        out[name + "/world_size"] = res._out.extra.get("world_size")
        out[name + "/data_parallel"] = res._out.extra.get("data_parallel")
    with open(spec["out"].format(rank=rank), "wb") as fh:
        pickle.dump(out, fh)
    if code:
        # after a failed collective the group is unusable, and tearing it down can wait on the
        # peer until the group's own timeout: leave at once (as a launcher would end the process)
        sys.stdout.flush()
        os._exit(code)
    dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
