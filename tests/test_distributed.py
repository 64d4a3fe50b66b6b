"""Data-parallel fits over gloo processes equal the single-process fit; a failing process ends all.

Each test starts its own group of Python processes (tests/distributed_worker.py) on the loopback
interface; they fit the models of tests/distributed_cases.py with one thread each and write their
numbers to files, which are compared with the same fit in this process.
"""

from __future__ import annotations

import json
import os
import pickle
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import distributed_cases  # noqa: E402


def _gloo_available() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_gloo_available()


pytestmark = pytest.mark.skipif(not _gloo_available(), reason="torch.distributed with gloo is not available")

TOL = dict(rtol=1e-10, atol=1e-12)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp_path, size: int, cases, timeout: float = 30.0, wall: float = 90.0, grace: float = 5.0, **extra):
    """Start ``size`` worker processes; return ``[(returncode, results, output), ...]`` by rank and the
    time rank 0 took. The other ranks get ``grace`` seconds after rank 0 has ended, then are killed."""
    port = _free_port()
    out = str(tmp_path / "rank{rank}.pkl")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               MKL_NUM_THREADS="1")
    procs = []
    t0 = time.monotonic()
    for rank in range(size):
        spec = dict(rank=rank, size=size, port=port, out=out, cases=list(cases), timeout=timeout, **extra)
        procs.append(subprocess.Popen([sys.executable, os.path.join(HERE, "distributed_worker.py"), json.dumps(spec)],
                                      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    codes, logs, first_done = [], [], None
    try:
        for p in procs:
            left = max(1.0, wall - (time.monotonic() - t0))
            if first_done is not None:  # the others end with rank 0 (a hanging one is killed)
                left = min(left, max(1.0, first_done + grace - time.monotonic()))
            try:
                stdout, _ = p.communicate(timeout=left)
            except subprocess.TimeoutExpired:  # a process that hangs on purpose
                p.kill()
                stdout, _ = p.communicate()
            codes.append(p.returncode)
            logs.append(stdout.decode(errors="replace"))
            if first_done is None:
                first_done = time.monotonic()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    elapsed = first_done - t0
    results = []
    for rank, code in enumerate(codes):
        path = out.format(rank=rank)
        data = None
        if os.path.exists(path):
            with open(path, "rb") as fh:
                data = pickle.load(fh)
        results.append((code, data, logs[rank]))
    return results, elapsed


_SINGLE: dict = {}


def _single(name: str) -> dict:
    if name not in _SINGLE:
        _SINGLE[name] = distributed_cases.extract(distributed_cases.fit(name))
    return _SINGLE[name]


def _assert_same(name: str, got: dict) -> None:
    want = _single("slope2" if name == "slope2_spread" else name)
    assert set(got) == set(want)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], err_msg=f"{name}: {key}", **TOL)


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    cases = ["slope2", "slope2_spread", "three", "four", "logit", "logit3"]
    results, _ = _launch(tmp_path, 2, ["mismatch", "raise"] + cases)
    for rank, (code, data, log) in enumerate(results):
        assert data is not None, f"rank {rank} failed:\n{log}"
        # processes holding different data are stopped at the start of the fit, all of them
        assert data["mismatch"]["error"] == "DistributedError", log
        assert "different models or data" in data["mismatch"]["message"]
        # an error in one process's likelihood ends the fit on every process, with a clear message
        if rank == 1:
            assert data["raise"]["error"] == "RuntimeError" and "injected" in data["raise"]["message"]
        else:
            assert data["raise"]["error"] == "DistributedError"
            assert "process(es) 1 failed" in data["raise"]["message"]
        # ... and the group stays usable: the fits that follow succeed
        for name in cases:
            assert "error" not in data[name], data[name]
            assert data[name + "/world_size"] == 2
            # spread over the processes, except the two-level linear fit (every process makes it)
            assert data[name + "/data_parallel"] == (name != "slope2")
            _assert_same(name, data[name])


@pytest.mark.slow
def test_uneven_shards(tmp_path):
    # two top-level groups over three processes: ranks 0 and 2 hold one group each, rank 1 none
    from torchmix.distributed.shard import top_ranges

    assert top_ranges(torch.tensor([90, 90]), 3) == [(0, 1), (1, 1), (1, 2)]
    results, _ = _launch(tmp_path, 3, ["two_tops"])
    for rank, (code, data, log) in enumerate(results):
        assert code == 0, f"rank {rank} failed:\n{log}"
        assert data["two_tops/world_size"] == 3 and data["two_tops/data_parallel"]
        _assert_same("two_tops", data["two_tops"])


@pytest.mark.slow
@pytest.mark.parametrize("how", ["exit", "hang"])
def test_failing_process_ends_every_process(tmp_path, how):
    # rank 1 dies or hangs in its 4th likelihood evaluation; rank 0 must end with a
    # DistributedError (at the latest after the collective timeout), not wait for ever
    # (a process that raises: test_two_processes_equal_one)
    timeout = 5.0 if how == "hang" else 20.0
    results, elapsed = _launch(tmp_path, 2, ["slope2_spread"], timeout=timeout, wall=40.0, grace=1.0, fail_rank=1,
                               fail_after=4, fail_how=how)
    (code0, data0, log0), (code1, data1, log1) = results
    assert code0 == 3, log0
    data0 = data0["slope2_spread"]
    assert data0["error"] == "DistributedError", log0
    assert elapsed < 35.0
    if how == "exit":
        assert code1 == 7
    else:
        assert f"within {timeout:g} s" in data0["message"]
