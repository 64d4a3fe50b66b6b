r"""Joining the process group a launcher such as ``torchrun`` prepared, and leaving it.

``torchrun --nproc_per_node=P ...`` starts :math:`P` copies of a program with the environment
variables ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` set.
:func:`process_group` turns them into an initialised default process group for the duration of a
block, with the backend the device needs (gloo on the CPU, NCCL on CUDA, each process on the GPU
``cuda:LOCAL_RANK`` of its machine) and a timeout after which a collective that waits for a
process that died or hangs fails instead of waiting for ever. The command line uses it; a script
can too::

    import torchmix as tm
    from torchmix.distributed import is_main, process_group

    with process_group(device="cuda") as device:      # "cuda:LOCAL_RANK" under torchrun
        res = tm.mix(formula, data, ..., device=device)
        if is_main():
            print(res.summary())

Without the launcher's variables, or when a group is already initialised (by the caller, who then
also destroys it), the block runs unchanged.
"""

from __future__ import annotations

import inspect
import os
from contextlib import contextmanager
from datetime import timedelta
from typing import Iterator, Optional

import torch

from ..errors import ConfigError

__all__ = ["DEFAULT_TIMEOUT_S", "launcher_env", "rank_device", "process_group"]

#: Seconds a collective waits for the other processes before it fails.
DEFAULT_TIMEOUT_S = 1800.0

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launcher_env() -> Optional[dict]:
    """``{"rank", "world_size", "local_rank"}`` from a launcher's environment, or None outside one."""
    if not all(k in os.environ for k in _ENV):
        return None
    try:
        return {"rank": int(os.environ["RANK"]), "world_size": int(os.environ["WORLD_SIZE"]),
                "local_rank": int(os.environ["LOCAL_RANK"])}
    except ValueError:
        raise ConfigError("the launcher's RANK, WORLD_SIZE and LOCAL_RANK environment variables must be "
                          f"integers, got {[os.environ[k] for k in _ENV[:3]]}") from None


def rank_device(device, local_rank: Optional[int] = None) -> str:
    """The device of this process: ``"cuda"`` without an index becomes ``"cuda:LOCAL_RANK"``."""
    dev = torch.device(device)
    if dev.type != "cuda" or dev.index is not None:
        return str(device)
    if local_rank is None:
        env = launcher_env()
        local_rank = 0 if env is None else env["local_rank"]
    return f"cuda:{local_rank}"


def _check_timeout(timeout_s) -> float:
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
        raise ConfigError(f"the process-group timeout must be a positive number of seconds, got {timeout_s!r}")
    return float(timeout_s)


@contextmanager
def process_group(device="cpu", timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[str]:
    """Run the block in the process group of a launcher (``torchrun``), then destroy the group.

    Parameters
    ----------
    device : the device the fits run on; ``"cuda"`` selects the NCCL backend and this process's
        GPU ``cuda:LOCAL_RANK``, anything else the gloo backend.
    timeout_s : seconds a collective waits for the other processes before it fails.

    Yields
    ------
    The device this process fits on (``device``, or ``"cuda:LOCAL_RANK"`` for ``"cuda"``).
    """
    timeout_s = _check_timeout(timeout_s)
    env = launcher_env()
    dist = torch.distributed
    if env is None or not dist.is_available() or dist.is_initialized():
        yield str(device)
        return
    cuda = torch.device(device).type == "cuda"
    if cuda:
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} requested but CUDA is not available on this machine")
        device = rank_device(device, env["local_rank"])
        torch.cuda.set_device(torch.device(device))
    backend = "nccl" if cuda else "gloo"
    kwargs = {}
    if cuda and "device_id" in inspect.signature(dist.init_process_group).parameters:
        kwargs["device_id"] = torch.device(device)   # binds the NCCL communicator to this GPU
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s), **kwargs)
    try:
        yield str(device)
    finally:
        dist.destroy_process_group()
