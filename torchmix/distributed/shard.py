r"""Split a model into per-process shards of whole top-level groups. Pure tensor math.

Every top-level group (with everything nested in it) goes to exactly one process. The groups are
dealt out in their order, contiguously, balanced by rows: with :math:`n_k` the rows of top-level
group :math:`k`, :math:`c_k = \sum_{k' \le k} n_{k'}` and :math:`N = c_{G_L}`, group :math:`k` goes to
process

.. math:: r(k) = \min\bigl(P - 1,\ \lfloor P\,(c_k - n_k/2)/N \rfloor\bigr),

the process whose equal share of the rows holds the group's middle row (a greedy prefix split of the
cumulative row counts). :math:`r(k)` never decreases with :math:`k`, so process :math:`r` holds a
contiguous range of top-level groups; a process may get one group, or none when there are fewer
groups than processes or one group is very large. The assignment depends only on the row counts,
so every process computes the same one.

A shard is an ordinary :class:`~torchmix.tensors.ModelTensors` (its rows in their original order,
group indices renumbered from 0 at every level), plus the global indices of its groups, which
put per-group results back together (:mod:`torchmix.distributed.collectives`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..tensors import ModelTensors

__all__ = ["Shard", "assign_top_groups", "top_ranges", "shard_tensors"]


def assign_top_groups(rows_per_group: torch.Tensor, size: int) -> torch.Tensor:
    r"""Process of each top-level group, int64 ``(G_L,)``, non-decreasing (formula above).

    Parameters
    ----------
    rows_per_group : ``(G_L,)`` row counts :math:`n_k` (or any non-negative loads).
    size : number of processes :math:`P \ge 1`.
    """
    n = rows_per_group.to(torch.float64).cpu()
    total = float(n.sum())
    if n.numel() == 0 or total <= 0:
        return torch.zeros(n.numel(), dtype=torch.int64)
    middle = torch.cumsum(n, 0) - 0.5 * n
    return torch.clamp(torch.floor(size * middle / total).to(torch.int64), 0, size - 1)


def top_ranges(rows_per_group: torch.Tensor, size: int) -> list:
    """``[(first, stop), ...]``: the top-level groups ``first <= k < stop`` of each process."""
    owner = assign_top_groups(rows_per_group, size)
    bounds = torch.searchsorted(owner, torch.arange(size + 1, dtype=torch.int64)).tolist()
    return [(int(bounds[r]), int(bounds[r + 1])) for r in range(size)]


@dataclass(frozen=True)
class Shard:
    """One process's part of a model.

    Attributes
    ----------
    tensors : the rows and groups of this process, group indices renumbered per level.
    rank, size : this process and the number of processes.
    top_range : ``(first, stop)``, the global top-level groups held.
    group_ids : per level (level 2 first), int64 ``(G_l^{(r)},)`` global index of each local group.
    all_group_ids : per process, the ``group_ids`` of that process (to put per-group results back).
    """

    tensors: ModelTensors
    rank: int
    size: int
    top_range: tuple
    group_ids: tuple
    all_group_ids: tuple

    @property
    def empty(self) -> bool:
        """True when this process holds no group (and no row)."""
        return self.top_range[0] == self.top_range[1]

    @property
    def top_counts(self) -> list:
        """Number of top-level groups held by each process."""
        return [int(ids[-1].numel()) for ids in self.all_group_ids]


def _level_ids(tensors: ModelTensors, first: int, stop: int) -> list:
    return [torch.nonzero((lv.top >= first) & (lv.top < stop)).flatten() for lv in tensors.levels]


def shard_tensors(tensors: ModelTensors, rank: int, size: int) -> Shard:
    r"""The shard of process ``rank`` among ``size`` (module docstring).

    Rows are kept in their original order; at every level the kept groups keep their relative
    order and are renumbered :math:`0, 1, \dots`; ``group``, ``parent`` and ``top`` are mapped to
    the new numbers, group weights and ``Z``, ``X``, ``y``, weights and offset are subset.
    """
    if not 0 <= rank < size:
        raise ValueError(f"rank {rank} is not in [0, {size})")
    top = tensors.levels[-1]
    row_top = tensors.row_top
    counts = torch.bincount(row_top.cpu(), minlength=top.n_groups)
    ranges = top_ranges(counts, size)
    first, stop = ranges[rank]
    ids = _level_ids(tensors, first, stop)
    dev = row_top.device
    rows = torch.nonzero((row_top >= first) & (row_top < stop)).flatten()
    new_index = []
    for lv, keep in zip(tensors.levels, ids):
        m = torch.full((lv.n_groups,), -1, dtype=torch.int64, device=dev)
        m[keep] = torch.arange(keep.numel(), dtype=torch.int64, device=dev)
        new_index.append(m)
    levels = []
    for l, (lv, keep) in enumerate(zip(tensors.levels, ids)):
        parent = None if lv.parent is None else new_index[l + 1][lv.parent[keep]]
        levels.append(replace(lv, Z=lv.Z[rows], group=new_index[l][lv.group[rows]], parent=parent,
                              n_groups=int(keep.numel()), w_cond=lv.w_cond[keep], w_uncond=lv.w_uncond[keep],
                              top=lv.top[keep] - first))
    local = ModelTensors(X=tensors.X[rows], y=tensors.y[rows], w1_cond=tensors.w1_cond[rows],
                         w1_uncond=tensors.w1_uncond[rows], levels=tuple(levels),
                         offset=None if tensors.offset is None else tensors.offset[rows])
    everyone = tuple(tuple(_level_ids(tensors, a, b)) for a, b in ranges)
    return Shard(tensors=local, rank=rank, size=size, top_range=(first, stop), group_ids=tuple(ids),
                 all_group_ids=everyone)
