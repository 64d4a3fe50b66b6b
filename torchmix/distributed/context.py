r"""Which process this is, among how many, and whether a fit spans them.

torchmix never starts processes itself: a process group exists when the program was launched by
``torchrun`` (or another launcher) and :func:`torch.distributed.init_process_group` was called,
by the user or by the command line. Everything here reads that state; nothing changes it.

Two views of the process group:

* :func:`world` is the group a *fit* spans. Inside :func:`run_locally` (a rank fitting its own
  share of plausible values or replicates) it is ``None``, so the fit runs as in a single process.
  A group of one process is also ``None``: one process is the ordinary single-process path.
* :func:`is_main` is about the *program*: rank 0 of the launched group (or the only process)
  prints, shows progress and writes outputs, whatever :func:`run_locally` says.
"""

from __future__ import annotations

import functools
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

__all__ = ["World", "world", "launched", "is_main", "run_locally", "warnings_on_main", "all_reduce_sum"]

_local = threading.local()


@dataclass(frozen=True)
class World:
    """The process group a fit spans: this process's ``rank`` among ``size`` processes."""

    rank: int
    size: int
    backend: str


def launched() -> Optional[World]:
    """The initialised default process group, whatever :func:`run_locally` says; ``None`` without one."""
    dist = torch.distributed
    if not dist.is_available() or not dist.is_initialized():
        return None
    return World(dist.get_rank(), dist.get_world_size(), str(dist.get_backend()))


def world() -> Optional[World]:
    """The process group the current fit spans, or ``None`` for a single-process fit.

    ``None`` without an initialised group, with a group of one process, and inside
    :func:`run_locally`.
    """
    if getattr(_local, "depth", 0):
        return None
    w = launched()
    if w is None or w.size == 1:
        return None
    return w


def is_main() -> bool:
    """True on rank 0 of the launched group, and in a process without one."""
    w = launched()
    return w is None or w.rank == 0


def warnings_on_main(fn):
    """Decorator: on processes other than rank 0 of a launched group, the warnings raised by ``fn``
    are not shown, so that a program run by ``torchrun`` warns once, not once per process (every
    process takes the same decisions; fits a rank makes alone report their failures to rank 0
    through the gathered results). Errors are raised on every process. Without a group, ``fn``
    runs as it is."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if is_main():
            return fn(*args, **kwargs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn(*args, **kwargs)

    return wrapper


@contextmanager
def run_locally() -> Iterator[None]:
    """Within the block (this thread only), fits run as in a single process."""
    _local.depth = getattr(_local, "depth", 0) + 1
    try:
        yield
    finally:
        _local.depth -= 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    r"""Sum of ``t`` over the processes of :func:`world` (``t`` itself in a single-process fit).

    Returns a new tensor of ``t``'s shape, dtype and device: :math:`\sum_r t^{(r)}`. With the gloo
    backend a CUDA tensor travels through host memory. Not differentiable: reduce values and
    gradients separately.
    """
    w = world()
    if w is None:
        return t
    out = t.detach().clone()
    if w.backend == "gloo" and out.device.type != "cpu":
        host = out.cpu()
        torch.distributed.all_reduce(host)
        return host.to(out.device)
    torch.distributed.all_reduce(out)
    return out
