r"""The collectives of a data-parallel fit, each guarded by an error flag and a timeout.

Every collective of a fit goes through :class:`Collectives`. Each one first exchanges a one-number
flag (0 = this process is fine): a process whose fit raised takes part in that exchange with flag 1
(:func:`guarded`) and re-raises its own error, and the others, seeing the flag, raise
:class:`~torchmix.errors.DistributedError` instead of waiting for data that will never come. A
process that has died (its connections closed) and a collective that does not complete within the
*collective timeout* also end in :class:`~torchmix.errors.DistributedError`, so no process hangs.

The collective timeout is, in this order of precedence: :func:`set_collective_timeout`, the
environment variable ``TORCHMIX_COLLECTIVE_TIMEOUT`` (seconds), the timeout of the process group
(``init_process_group(timeout=...)``; the command line's ``--timeout``), or :data:`DEFAULT_TIMEOUT`.
It bounds the wait of one collective -- the time between two synchronisation points of a fit (one
likelihood evaluation; at the start, the time the slowest process takes to build its design) --
not the whole fit.

A collective whose data fit in a fixed-size *packet* (set for the fit from the model's dimensions,
so that every process, even one that failed early, uses the same size) carries the flag in the same
exchange as the data: one exchange per sum in the optimiser's loop. Larger data (per-group results
at the end of a fit) take a flag exchange and then a data exchange.

Sums are formed by gathering every process's part and adding them in rank order, so every process
gets bit-for-bit the same numbers (whatever algorithm the backend uses), and so takes the same
decisions in the optimiser.
"""

from __future__ import annotations

import datetime
import os
from contextlib import contextmanager
from typing import Iterator, Optional, Sequence

import torch

from ..errors import DistributedError
from .context import World

__all__ = ["DEFAULT_TIMEOUT", "collective_timeout", "set_collective_timeout", "Collectives", "guarded"]

DEFAULT_TIMEOUT = 1800.0
_timeout: Optional[float] = None


def set_collective_timeout(seconds: Optional[float]) -> None:
    """Set the collective timeout in seconds (``None``: back to the environment or the default)."""
    global _timeout
    if seconds is not None and not float(seconds) > 0:
        raise ValueError(f"the collective timeout must be a positive number of seconds, got {seconds!r}")
    _timeout = None if seconds is None else float(seconds)


def collective_timeout() -> float:
    """The collective timeout in seconds (module docstring)."""
    if _timeout is not None:
        return _timeout
    env = os.environ.get("TORCHMIX_COLLECTIVE_TIMEOUT")
    if env:
        try:
            value = float(env)
        except ValueError:
            value = 0.0
        if value > 0:
            return value
    return _group_timeout() or DEFAULT_TIMEOUT


def _group_timeout() -> Optional[float]:
    """The default process group's timeout in seconds, where torch exposes it."""
    dist = torch.distributed
    try:
        group = dist.distributed_c10d._get_default_group()
        device = torch.device("cpu" if dist.get_backend() == "gloo" else "cuda")
        seconds = group._get_backend(device).options._timeout.total_seconds()
    except Exception:  # no group, or a torch without these internals
        return None
    return float(seconds) if seconds > 0 else None


class Collectives:
    """Guarded collectives over the processes of ``world`` (module docstring).

    Parameters
    ----------
    world : the process group of the fit (:func:`~torchmix.distributed.context.world`).
    timeout : seconds; default :func:`collective_timeout`.
    """

    def __init__(self, world: World, timeout: Optional[float] = None, packet: int = 64):
        self.rank, self.size, self.backend = world.rank, world.size, world.backend
        self.timeout = float(timeout) if timeout is not None else collective_timeout()
        self.packet = max(int(packet), 2)
        # gloo exchanges host memory; other backends (NCCL) the current CUDA device's
        gloo = self.backend == "gloo" or not torch.cuda.is_available()
        self.device = torch.device("cpu") if gloo else torch.device("cuda", torch.cuda.current_device())

    # ------------------------------------------------------------------ plumbing
    def _host(self, t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(self.device).contiguous()

    def _wait(self, work) -> None:
        try:
            work.wait(timeout=datetime.timedelta(seconds=self.timeout))
        except DistributedError:
            raise
        except Exception as exc:  # timeout, or a peer that closed its connections
            raise DistributedError(
                f"process {self.rank} of {self.size}: a collective of the data-parallel fit failed or got no "
                f"answer within {self.timeout:g} s (collective timeout; another process may have died or "
                f"hung; every process must make the same fit: call mix() on all of them, or wrap fits made "
                f"by one process in torchmix.distributed.run_locally()): {exc}") from exc

    def _all_gather(self, t: torch.Tensor) -> list:
        bufs = [torch.empty_like(t) for _ in range(self.size)]
        try:
            work = torch.distributed.all_gather(bufs, t, async_op=True)
        except Exception as exc:
            raise DistributedError(f"process {self.rank} of {self.size}: a collective of the data-parallel "
                                   f"fit could not start: {exc}") from exc
        self._wait(work)
        return bufs

    def _exchange(self, payload: Optional[torch.Tensor], failed: bool = False) -> list:
        """One packet exchange: ``[flag, payload, zeros]`` (float64, ``self.packet`` long) from every
        process; raises :class:`DistributedError` when a flag is set."""
        packet = torch.zeros(self.packet, dtype=torch.float64, device=self.device)
        packet[0] = 1.0 if failed else 0.0
        if payload is not None:
            packet[1:1 + payload.numel()] = payload.reshape(-1).to(self.device)
        bufs = self._all_gather(packet)
        if not failed:
            self._raise_if_failed([float(b[0]) for b in bufs])
        return bufs

    # ------------------------------------------------------------------ guard
    def check(self) -> None:
        """Exchange the flags; raise :class:`DistributedError` when another process has failed."""
        self._exchange(None)

    def _raise_if_failed(self, flags) -> None:
        bad = [r for r, f in enumerate(flags) if f]
        if bad:
            names = ", ".join(str(r) for r in bad)
            raise DistributedError(f"process {self.rank} of {self.size}: the data-parallel fit was stopped because "
                                   f"process(es) {names} failed (their own error messages say why)")

    def signal_failure(self) -> None:
        """Tell the other processes that this one failed (its part of the next flag exchange)."""
        try:
            self._exchange(None, failed=True)
        except DistributedError:
            pass

    # ------------------------------------------------------------------ data
    def allsum(self, t: torch.Tensor) -> torch.Tensor:
        r""":math:`\sum_r t^{(r)}`, added in rank order: the same bits on every process. Same shape,
        dtype and device as ``t`` (detached)."""
        bufs = self.gather(t)
        out = bufs[0].clone()
        for b in bufs[1:]:
            out += b
        return out.to(t.device)

    def gather(self, t: torch.Tensor) -> list:
        """Every process's ``t`` (same shape everywhere), by rank, on the exchange device."""
        host = self._host(t)
        if host.dtype == torch.float64 and host.numel() < self.packet:
            return [b[1:1 + host.numel()].reshape(host.shape) for b in self._exchange(host)]
        self.check()
        return self._all_gather(host)

    def agree(self, values: torch.Tensor, what: str) -> None:
        """Raise :class:`DistributedError` on every process unless all processes hold the same ``values``."""
        bufs = self.gather(values)
        differ = [r for r, b in enumerate(bufs) if not torch.equal(b, bufs[0])]
        if differ:
            raise DistributedError(f"process {self.rank} of {self.size}: the processes hold different {what} "
                                   f"(process(es) {', '.join(map(str, differ))} differ from process 0); every "
                                   "process of a data-parallel fit must call mix() with the same model and data")

    def _gather_padded(self, t: torch.Tensor, counts: Sequence[int]) -> list:
        """Every process's ``t`` (``(counts[r], ...)``), padded to the longest for the exchange."""
        host = self._host(t)
        longest = max(max(counts), 1)
        pad = torch.zeros((longest,) + tuple(host.shape[1:]), dtype=host.dtype, device=host.device)
        pad[:host.shape[0]] = host
        self.check()
        bufs = self._all_gather(pad)
        return [b[:n] for b, n in zip(bufs, counts)]

    def cat_rows(self, t: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        """Rows of every process, concatenated in rank order: ``(sum(counts), ...)`` on ``t``'s device."""
        parts = self._gather_padded(t, counts)
        return torch.cat(parts, dim=0).to(t.device)

    def put_rows(self, t: torch.Tensor, ids: Sequence[torch.Tensor], n: int) -> torch.Tensor:
        """Rows of every process put at their global indices ``ids[r]``: ``(n, ...)``."""
        counts = [int(i.numel()) for i in ids]
        parts = self._gather_padded(t, counts)
        out = torch.zeros((n,) + tuple(t.shape[1:]), dtype=t.dtype)
        for part, idx in zip(parts, ids):
            out[idx.cpu()] = part.cpu()
        return out.to(t.device)


@contextmanager
def guarded(coll: Collectives) -> Iterator[Collectives]:
    """Run a data-parallel fit: an error here is announced to the other processes (which then
    raise :class:`DistributedError`) and re-raised; a fit that ends normally exchanges the flags a
    last time, so that a failure after the last data exchange is not missed either."""
    try:
        yield coll
    except DistributedError:
        raise
    except BaseException:
        coll.signal_failure()
        raise
    coll.check()
