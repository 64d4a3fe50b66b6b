"""Task-parallel fits under a process group: the same numbers as one process, to 1e-10.

The tests launch 2 or 3 gloo processes on the CPU themselves (``python -m torch.distributed.run``
in a subprocess, with a timeout) and compare what process 0 returns with the same fits in this
process: plausible values (gaussian with a random slope, logit), replicate variance (Fay gaussian and
logit, JK1 with plausible values), more processes than fits, a failing process, and the command line.
"""

from __future__ import annotations

import json
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import task_cases as cases
from torchmix.distributed import launched, process_group, world
from torchmix.distributed.collect import all_gather, to_device, together
from torchmix.distributed.launch import launcher_env, rank_device
from torchmix.distributed.tasks import block

ROOT = Path(__file__).resolve().parents[1]
gloo = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                          reason="torch.distributed with the gloo backend is not available")
TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(nproc: int, args: list, cwd=ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _run_cases(tmp_path_factory, nproc: int, names: list) -> dict:
    out = tmp_path_factory.mktemp(f"dist{nproc}") / "numbers.pkl"
    _launch(nproc, [str(ROOT / "tests" / "task_cases.py"), str(out), *names])
    with open(out, "rb") as fh:
        return pickle.load(fh)


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    return _run_cases(tmp_path_factory, 2, ["pv_gauss", "pv_logit", "rep_gauss", "rep_logit", "rep_pv"])


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    return _run_cases(tmp_path_factory, 3, ["pv2", "rep_gauss", "fail"])


def _assert_same(got: dict, ref: dict):
    """Pooled table, and per fit coefficients, SEs, variance components and lnl, to 1e-10 (relative)."""
    np.testing.assert_allclose(got["frame"], ref["frame"], rtol=1e-10, atol=1e-10)
    assert len(got["fits"]) == len(ref["fits"])
    for g, r in zip(got["fits"], ref["fits"]):
        for key in ("coef", "se", "varcomp", "varcomp_se", "lnl"):
            np.testing.assert_allclose(g[key], r[key], rtol=1e-10, atol=1e-10, err_msg=key)


@gloo
@pytest.mark.slow
@pytest.mark.parametrize("name", ["pv_gauss", "pv_logit", "rep_gauss", "rep_logit", "rep_pv"])
def test_two_processes_equal_one(two, name):
    assert two["world_size"] == 2
    ref = cases.numbers(cases.fit_case(name))
    _assert_same(two[name], ref)
    if name.startswith("pv"):
        assert len(ref["fits"]) == 5
        # the values differ from each other: the comparison is not of one fit repeated
        assert np.ptp([f["coef"][1] for f in ref["fits"]]) > 1e-3


@gloo
@pytest.mark.slow
@pytest.mark.parametrize("name", ["pv2", "rep_gauss"])
def test_more_processes_than_fits(three, name):
    """3 processes, 2 plausible values (one process has no value of its own); 8 replicates in blocks 2/3/3."""
    assert three["world_size"] == 3
    _assert_same(three[name], cases.numbers(cases.fit_case(name)))


@gloo
@pytest.mark.slow
def test_a_failing_process_fails_every_process(three):
    messages = three["fail"]
    assert messages[2] == "DataError: column 'zz' is broken"
    for m in messages[:2]:
        assert m.startswith("DataError: process 2 of 3 failed during a test step") and "'zz' is broken" in m


@gloo
@pytest.mark.slow
def test_torchrun_command_writes_one_set_of_outputs(tmp_path):
    config = ROOT / "configs" / "pisa2012_nz.toml"
    single, multi = tmp_path / "single", tmp_path / "multi"
    one = subprocess.run([sys.executable, "-m", "torchmix", "fit", str(config), "--out", str(single), "--quiet"],
                         cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                         timeout=TIMEOUT_S)
    assert one.returncode == 0, one.stderr
    proc = _launch(2, ["-m", "torchmix", "fit", str(config), "--out", str(multi), "--timeout", "120"], cwd=tmp_path)
    assert proc.stdout.count("Fixed Effects:") == 1           # process 0 alone prints the summary
    assert proc.stderr.count("results written to") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["multi", "single"]   # nothing else written
    assert sorted(p.name for p in multi.iterdir()) == sorted(p.name for p in single.iterdir())
    a, b = pd.read_csv(single / "estimates.csv"), pd.read_csv(multi / "estimates.csv")
    assert list(a.columns) == list(b.columns) and (a["term"] == b["term"]).all()
    num = a.select_dtypes("number").columns
    np.testing.assert_allclose(b[num].to_numpy(), a[num].to_numpy(), rtol=1e-10, atol=1e-10)
    run = json.loads((multi / "run.json").read_text())
    assert run["world_size"] == 2
    assert json.loads((single / "run.json").read_text())["world_size"] == 1
    assert run["config"]["distributed"]["timeout"] == 1800.0


_WARNING_SCRIPT = """
import sys, warnings
import numpy as np
import torchmix
from torchmix.distributed import launched, process_group

with process_group("cpu", 120):
    data = torchmix.load_dataset("sleepstudy").copy()
    data.loc[3, "Reaction"] = np.nan  # dropped, with a DataWarning
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = torchmix.mix("Reaction ~ Days + (Days | Subject)", data, progress=False)
    names = sorted(type(w.message).__name__ for w in caught)
    with open(f"rank{launched().rank}.txt", "w") as fh:
        fh.write(f"WARNINGS {','.join(names) or '-'} ROWS {res.nobs}")
"""


@gloo
@pytest.mark.slow
def test_python_api_warns_on_process_0_only(tmp_path):
    """mix() under torchrun: the same fit on both processes, its warnings shown by process 0 alone."""
    script = tmp_path / "warns.py"
    script.write_text(_WARNING_SCRIPT)
    _launch(2, [str(script)], cwd=tmp_path)
    first, second = ((tmp_path / f"rank{r}.txt").read_text().split() for r in (0, 1))
    assert "DataWarning" in first[1] and "SmallSampleWarning" in first[1]
    assert second[1] == "-"
    assert first[3] == second[3] == "179"  # both fitted the 179 complete rows


# ----------------------------------------------------------------------------- in one process


def test_blocks_cover_every_item_once():
    for n in range(0, 12):
        for size in range(1, 6):
            parts = [block(n, size, r) for r in range(size)]
            assert [i for p in parts for i in p] == list(range(n))
            assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1


def test_without_a_group_everything_is_one_process(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    assert launcher_env() is None and launched() is None
    with process_group("cpu") as device:
        assert device == "cpu" and world() is None
        assert all_gather({"a": 1}) == [{"a": 1}]
        assert together(lambda: 5) == [5]
    with pytest.raises(ValueError, match="boom"):
        together(lambda: (_ for _ in ()).throw(ValueError("boom")))
    with pytest.raises(Exception, match="timeout"):
        with process_group("cpu", timeout_s=0):
            pass


def test_rank_device_and_moves():
    assert rank_device("cuda", 3) == "cuda:3" and rank_device("cuda:1", 3) == "cuda:1"
    assert rank_device("cpu", 3) == "cpu"
    moved = to_device({"x": [torch.ones(2)], "y": (1, torch.zeros(1))}, "cpu")
    assert moved["x"][0].device.type == "cpu" and moved["y"][0] == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_cuda_check_script_says_it_has_not_run_without_cuda():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_cuda.py")], capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert proc.returncode == 0 and "has not run" in proc.stdout
