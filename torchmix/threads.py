r"""How many intra-op threads a fit uses, chosen by the size of the problem.

A mixed-model fit is many small operations (per-group reductions, small dense blocks, a few
hundred optimiser evaluations). Below a certain size torch's intra-op threads cost more than
they save — the threads synchronise on every operation, and on a shared machine a busy neighbour
makes each synchronisation wait for a descheduled thread, so a fit can become several times slower.
Small problems therefore run on one thread; large ones keep the process's setting.

:func:`fit_threads` sets the count for the duration of a fit and restores it afterwards, also on
error. ``torch.set_num_threads`` is process-wide state (with OpenMP it is also copied into each new
thread), so concurrent fits in threads coordinate through a lock: the setting in force before the
first of them started (the *baseline*) is what every thread is restored to, and it is what the
process is left with when the last one finishes, whatever the order of entry and exit. Results
never depend on the thread count (torch's CPU reductions used here are deterministic per
operation, and the tests check 1 against 2 threads to 1e-10).
"""

from __future__ import annotations

import numbers
import threading
from contextlib import contextmanager
from typing import Optional

import torch

from .errors import ConfigError

__all__ = ["CROSSOVER_WORK", "problem_work", "choose_threads", "check_num_threads", "fit_threads"]

#: Problem size (:func:`problem_work`) from which more than one thread is used. Measured with
#: ``scripts/bench_threads.py`` on a 2-core x86-64 machine: one thread was faster at every size
#: tried (gaussian with random intercept and slope up to 10^5 rows, AGQ13 logit up to 5x10^4 rows;
#: 5-18x faster with other processes running), so the switch is set well above these sizes.
CROSSOVER_WORK = 2e8

_lock = threading.Lock()
_active = 0            # fits currently inside fit_threads, all threads together
_baseline: Optional[int] = None
_local = threading.local()


def problem_work(n_rows: int, n_fixed: int, q_total: int, n_nodes: int = 1) -> float:
    r"""Size of a fit: :math:`N \times (p + q) \times n_\text{nodes}`.

    Parameters
    ----------
    n_rows : :math:`N`, observations; n_fixed : :math:`p`; q_total : :math:`q`, random effects
        over all levels; n_nodes : quadrature points per group (1 for the closed-form gaussian fit,
        :math:`n_Q^{q}` for adaptive quadrature).
    """
    return float(n_rows) * float(n_fixed + q_total) * float(n_nodes)


def check_num_threads(value) -> Optional[int]:
    """``None`` (automatic) or a positive integer; anything else is a :class:`ConfigError`."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"num_threads must be a positive integer or None (automatic), got {value!r}")
    value = int(value)
    if value < 1:
        raise ConfigError(f"num_threads must be a positive integer or None (automatic), got {value!r}")
    return value


def choose_threads(work: float, requested: Optional[int] = None) -> Optional[int]:
    """Threads for a fit of size ``work``: ``requested`` if given, 1 below :data:`CROSSOVER_WORK`,
    else ``None`` (keep the current setting)."""
    if requested is not None:
        return requested
    return 1 if work < CROSSOVER_WORK else None


@contextmanager
def fit_threads(n: Optional[int]):
    """Run the block with ``n`` intra-op threads (``None``: unchanged), then restore.

    Nested use in one thread changes nothing inside the outer block. Concurrent use from several
    threads restores every thread, and finally the process, to the setting in force before the
    first concurrent fit began.
    """
    global _active, _baseline
    with _lock:
        depth = getattr(_local, "depth", 0)
        if _active == 0:
            _baseline = torch.get_num_threads()
        restore_to = _baseline
        _active += 1
        _local.depth = depth + 1
        if depth == 0 and n is not None:
            # set even when torch reports ``n`` already: the BLAS keeps its own per-thread count
            torch.set_num_threads(n)
    try:
        yield
    finally:
        with _lock:
            _local.depth -= 1
            _active -= 1
            if _local.depth == 0 and (n is not None or torch.get_num_threads() != restore_to):
                torch.set_num_threads(restore_to)
            if _active == 0:
                if torch.get_num_threads() != restore_to:
                    torch.set_num_threads(restore_to)
                _baseline = None
