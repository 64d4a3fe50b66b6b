r"""Per-group weighted crossproducts of design blocks, the one pass over the rows of a linear fit.

:math:`CP_g = \sum_{i\in g} w_i m_i m_i^\top` for the rows :math:`m_i` of :math:`[Z | X | y]`; see
:func:`weighted_crossproducts`. Pure tensor math.
"""

from __future__ import annotations

import torch

__all__ = ["weighted_crossproducts"]

_CHUNK_ROWS = 1 << 17


def weighted_crossproducts(m, w: torch.Tensor, group: torch.Tensor, n_groups: int,
                           chunk_rows: int = _CHUNK_ROWS) -> torch.Tensor:
    r"""Per-group weighted crossproducts :math:`CP_g = \sum_{i\in g} w_i m_i m_i^\top`.

    Parameters
    ----------
    m : ``(N, d)``, or a list of ``(N, d_k)`` column blocks (``m`` is their concatenation; passing
        the blocks saves a copy); w : ``(N,)`` positive; group : int64 ``(N,)`` in ``[0, n_groups)``.

    Returns
    -------
    ``(n_groups, d, d)``.

    Notes
    -----
    When groups are of similar size the rows :math:`\sqrt{w_i}m_i` are laid into a zero-padded
    ``(G, n_max, d)`` tensor and multiplied with one batched GEMM (when the rows are sorted by group
    and every group has ``n_max`` rows, the scaled rows are that tensor already: no scatter);
    otherwise outer products are accumulated with ``index_add`` in chunks of ``chunk_rows`` rows
    (extra memory ``chunk_rows * d * d`` values).
    """
    return _crossproducts_and_counts(m, w, group, n_groups, chunk_rows)[0]


def _crossproducts_and_counts(m, w: torch.Tensor, group: torch.Tensor, n_groups: int, chunk_rows: int = _CHUNK_ROWS):
    """:func:`weighted_crossproducts` and the number of rows of each group, int64 ``(n_groups,)``."""
    blocks = [m] if torch.is_tensor(m) else list(m)
    n, d = blocks[0].shape[0], sum(b.shape[1] for b in blocks)
    ref = blocks[0]
    counts = torch.bincount(group, minlength=n_groups)
    n_max = int(counts.max()) if n else 0
    if n and n_groups * n_max <= 3 * n:
        order = None if bool((group[1:] >= group[:-1]).all()) else torch.sort(group, stable=True)[1]
        return _sorted_crossproducts(blocks, w, counts, n_groups, n_max, chunk_rows, order), counts
    if n and n_groups * n_max <= 3 * n:
        rows = torch.empty(n, d, dtype=ref.dtype, device=ref.device)
        sw = torch.sqrt(w)[:, None]
        col = 0
        for b in blocks:  # scaled rows written in place, block by block (one pass)
            torch.mul(b, sw, out=rows[:, col:col + b.shape[1]])
            col += b.shape[1]
        is_sorted = bool((group[1:] >= group[:-1]).all())
        if is_sorted and n_groups * n_max == n:
            padded = rows.reshape(n_groups, n_max, d)
        else:
            if is_sorted:
                order, sorted_group = None, group
            else:
                sorted_group, order = torch.sort(group, stable=True)
            start = torch.cumsum(counts, 0) - counts
            rank = torch.arange(n, device=ref.device) - start[sorted_group]
            padded = torch.zeros(n_groups * n_max, d, dtype=ref.dtype, device=ref.device)
            padded[sorted_group * n_max + rank] = rows if order is None else rows[order]
            padded = padded.reshape(n_groups, n_max, d)
        out = padded.transpose(1, 2) @ padded
    else:
        m = torch.cat(blocks, dim=1) if len(blocks) > 1 else blocks[0]
        out = torch.zeros(n_groups, d * d, dtype=m.dtype, device=m.device)
        for first in range(0, n, chunk_rows):
            sl = slice(first, first + chunk_rows)
            mc = m[sl]
            outer = (mc * w[sl, None]).unsqueeze(2) * mc.unsqueeze(1)
            out.index_add_(0, group[sl], outer.reshape(-1, d * d))
        out = out.reshape(n_groups, d, d)
    return 0.5 * (out + out.transpose(1, 2)), counts


def _sorted_crossproducts(blocks, w, counts, n_groups: int, n_max: int, chunk_rows: int,
                          order: torch.Tensor | None = None) -> torch.Tensor:
    r""":func:`weighted_crossproducts` in chunks of whole groups, for rows sorted by group or taken in
    the order ``order`` (a stable sort of the rows by group).

    Each chunk's rows :math:`\sqrt{w_i}m_i` are written as columns of one reused ``(d, rows)`` buffer
    (reading the blocks column by column, which is how column-major data lie) and the chunk's groups
    are multiplied with one batched GEMM; groups shorter than ``n_max`` are zero-padded within their
    chunk. No allocation grows with the number of rows, beyond :math:`\sqrt{w}` (and ``order``).
    """
    ref = blocks[0]
    kw = dict(dtype=ref.dtype, device=ref.device)
    d = sum(b.shape[1] for b in blocks)
    per_chunk = max(1, min(chunk_rows, (8 * chunk_rows) // d) // n_max)   # at most 8 * chunk_rows buffer values
    equal = bool((counts == n_max).all())
    sw = torch.sqrt(w if order is None else w[order])
    out = torch.empty(n_groups, d, d, **kw)
    buf = torch.empty(d, per_chunk * n_max, **kw)
    if not equal:
        ends = torch.cumsum(counts, 0)
        bounds = [0] + ends[per_chunk - 1::per_chunk].tolist()
        if bounds[-1] != int(ends[-1]):
            bounds.append(int(ends[-1]))
        padded = torch.zeros(d, per_chunk * n_max, **kw)
    for c, g0 in enumerate(range(0, n_groups, per_chunk)):
        g1 = min(g0 + per_chunk, n_groups)
        r0, r1 = (g0 * n_max, g1 * n_max) if equal else (bounds[c], bounds[c + 1])
        col = 0
        for b in blocks:
            if order is None:
                part = b[r0:r1].transpose(0, 1)
            elif b.stride(0) == 1:  # column-major: gather within each column
                part = b.transpose(0, 1).index_select(1, order[r0:r1])
            else:
                part = b.index_select(0, order[r0:r1]).transpose(0, 1)
            torch.mul(part, sw[r0:r1], out=buf[col:col + b.shape[1], :r1 - r0])
            col += b.shape[1]
        if equal:
            rows = buf[:, :r1 - r0]
        else:  # place each row at (its group in the chunk) * n_max + (its rank in the group)
            cnt = counts[g0:g1]
            first = torch.cumsum(cnt, 0) - cnt
            grp = torch.repeat_interleave(torch.arange(g1 - g0, device=ref.device), cnt)
            pos = grp * n_max + torch.arange(r1 - r0, device=ref.device) - first[grp]
            rows = padded[:, :(g1 - g0) * n_max].zero_()
            rows.index_copy_(1, pos, buf[:, :r1 - r0])
        a = rows.reshape(d, g1 - g0, n_max).permute(1, 0, 2)
        torch.bmm(a, a.transpose(1, 2), out=out[g0:g1])
    return 0.5 * (out + out.transpose(1, 2))
