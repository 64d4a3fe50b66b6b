r"""Gathering Python objects from every process, and failing together.

Task-parallel work (plausible values, replicate refits) ends with every process holding the
results of every other: :func:`all_gather` pickles an object on each rank (tensors moved to host
memory first, so that a CUDA tensor of rank 1 does not land on rank 0's device) and returns the
list of them in rank order, on every rank.

A process that raises while the others wait in a collective would leave them waiting until the
group's timeout. :func:`together` runs a step on every rank and exchanges its outcome, so that an
exception on one rank raises on every rank: the failing rank's own exception there; elsewhere the
same torchmix error class (a :class:`~torchmix.errors.NumericalError` for any other exception)
naming the failing rank and its message.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import torch

from .. import errors
from ..errors import NumericalError
from .context import launched

__all__ = ["to_device", "all_gather", "together"]


def to_device(obj: Any, device) -> Any:
    """``obj`` with every tensor in it (dataclass fields, lists, tuples, dict values) moved to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: to_device(getattr(obj, f.name), device)
                                           for f in dataclasses.fields(obj) if f.init})
    if isinstance(obj, list):
        return [to_device(v, device) for v in obj]
    if isinstance(obj, tuple):
        return tuple(to_device(v, device) for v in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def all_gather(obj: Any) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank of the launched group (``[obj]`` without one).

    Tensors travel through host memory and arrive on the CPU; move them where they are needed.
    """
    w = launched()
    if w is None or w.size == 1:
        return [obj]
    out: list = [None] * w.size
    torch.distributed.all_gather_object(out, to_device(obj, "cpu"))
    return out


def together(step: Callable[[], Any], what: str = "a step") -> list:
    """Run ``step()`` on every rank and gather its results; if it raised on any rank, raise on every rank.

    Parameters
    ----------
    step : the work of this rank (no collectives of its own inside: the ranks exchange only here).
    what : what the step does, for the error message of the ranks that did not fail.

    Returns
    -------
    list of every rank's ``step()`` result, in rank order (tensors on the CPU).
    """
    error: Optional[BaseException] = None
    try:
        payload = ("ok", step())
    except Exception as exc:  # noqa: BLE001 - re-raised below, after the others have heard of it
        error = exc
        payload = ("error", (type(exc).__name__, str(exc)))
    gathered = all_gather(payload)
    if error is not None:
        raise error
    failed = [(r, value) for r, (kind, value) in enumerate(gathered) if kind == "error"]
    if failed:
        rank, (name, msg) = failed[0]
        cls = getattr(errors, name, None)
        if not (isinstance(cls, type) and issubclass(cls, errors.TorchmixError)):
            cls, msg = NumericalError, f"{name}: {msg}"
        raise cls(f"process {rank} of {len(gathered)} failed during {what}: {msg}")
    return [value for _, value in gathered]
