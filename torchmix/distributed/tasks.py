r"""Task-parallel fits: plausible values and replicate refits spread over the processes of a group.

Under a process group of :math:`P > 1` processes (:func:`~torchmix.distributed.context.world`),
the fits that multiply -- one per plausible value, one per replicate -- are shared out in
contiguous blocks (:func:`block`): rank :math:`r` of :math:`P` takes items
:math:`\lfloor rn/P\rfloor, \dots, \lfloor (r+1)n/P\rfloor - 1` of :math:`n`. Each rank fits its
block as a single process (inside :func:`~torchmix.distributed.context.run_locally`), and the
results are gathered (:func:`~torchmix.distributed.collect.together`) so that every rank holds
every fit, in the original order; pooling then runs on every rank alike.

The numbers are those of one process because every rank runs the single-process routine:

* Plausible values. One process fits the first value on its own, then values :math:`2..K`
  batched and warm-started from the first solution. Here the first value is fitted by every
  rank together (a data-parallel fit where the likelihood supports it, the same fit on every rank
  otherwise); then rank :math:`r` runs the same batched routine on its block of values
  :math:`2..K`, from the same first solution. A batched value moves on its own (its own line
  search and convergence test), so it does not depend on which other values share its batch.
* Replicates. :func:`~torchmix.fit.replicates.refit_replicates` runs on rank :math:`r`'s block
  of rows of the ``(R, G_L)`` replicate factors; the ``(R_r, p + n_tau)`` estimates are stacked
  in rank order and the failure counts added.

Ranks whose block is empty (more processes than fits) only take part in the exchange.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Optional

import torch

from .collect import to_device, together
from .context import run_locally, world

__all__ = ["block", "spread_plausible_values", "spread_replicates"]


def block(n: int, size: int, rank: int) -> range:
    r"""Items of rank ``rank`` among ``size`` when ``n`` items are cut into contiguous blocks.

    Block sizes differ by at most one: :math:`[\lfloor rn/P\rfloor, \lfloor (r+1)n/P\rfloor)`.
    """
    return range(rank * n // size, (rank + 1) * n // size)


def spread_plausible_values(fit_many: Callable, fit_one: Callable) -> Callable:
    """A ``fit_many`` for :func:`~torchmix.plausible.fit_plausible_values` that shares values out.

    Parameters
    ----------
    fit_many : ``fit_many(prepared, ys, advance=None, first=None) -> [results, ...]``, the
        single-process batched routine; given ``first`` (the fit of ``ys[0]``) it does not refit it.
    fit_one : ``fit_one(prepared, y) -> results``, one fit (its warnings are shown).

    Returns
    -------
    ``fit_many`` itself without a process group; otherwise a callable of the same signature
    that fits the first value on every rank, each rank's block of the others batched, and
    returns every value's results on every rank.
    """

    def spread(prepared, ys: list, advance: Optional[Callable] = None, first=None):
        w = world()
        if w is None:
            return fit_many(prepared, ys, advance=advance, first=first)
        if first is None:
            first = fit_one(prepared, ys[0])
        if advance is not None:
            advance(1)
        mine = block(len(ys) - 1, w.size, w.rank)

        def step():
            if not len(mine):
                return []
            with run_locally():
                fits = fit_many(prepared, [ys[0]] + [ys[1 + i] for i in mine], first=first)
            return [f._out for f in fits[1:]]

        outs = [out for part in together(step, "the plausible-value fits") for out in part]
        device = ys[0].device
        fits = [first]
        for y, out in zip(ys[1:], outs):
            design = replace(first.design, tensors=first.design.tensors.with_response(y))
            fits.append(type(first)(to_device(out, device), design, first.family, first.call, first.options))
        if advance is not None:
            advance(len(ys) - 1)
        return fits

    return fit_many if world() is None else spread


def spread_replicates(tensors, factors: torch.Tensor, fit: Callable, start, progress=None,
                      **kwargs) -> tuple[torch.Tensor, int]:
    """:func:`~torchmix.fit.replicates.refit_replicates`, its replicates shared out over the processes.

    Parameters
    ----------
    tensors, factors, fit, start, progress, kwargs : as for
        :func:`~torchmix.fit.replicates.refit_replicates` (``factors`` is ``(R, G_L)``); the
        progress bar is advanced on rank 0 only.

    Returns
    -------
    estimates : ``(R, p + n_tau)`` on ``tensors``' device, every replicate, in order (on every rank);
    n_failed : the replicates that did not converge, all ranks together.
    """
    from ..fit import replicates  # at call time: the routine as it is now

    w = world()
    if w is None:
        return replicates.refit_replicates(tensors, factors, fit, start, progress=progress, **kwargs)
    mine = block(int(factors.shape[0]), w.size, w.rank)
    bar = progress if w.rank == 0 else None

    def step():
        if not len(mine):
            return None, 0
        with run_locally():
            return replicates.refit_replicates(tensors, factors[mine.start:mine.stop], fit, start, progress=bar,
                                               **kwargs)

    parts = together(step, "the replicate refits")
    estimates = torch.cat([est for est, _ in parts if est is not None]).to(tensors.X.device)
    if bar is not None:
        bar.update(int(factors.shape[0]) - len(mine))
    return estimates, sum(int(n) for _, n in parts)
