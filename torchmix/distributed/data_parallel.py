r"""One fit spread over the processes of a :mod:`torch.distributed` group (data parallelism).

When ``mix()`` runs under an initialised process group of more than one process (and not inside
:func:`~torchmix.distributed.context.run_locally`), every process builds the design from the full
data (so centering, scaling and standardisation are global), keeps the rows of its share of the
top-level groups (:mod:`~torchmix.distributed.shard`) and evaluates the likelihood there; the sums
over top-level groups are summed over processes at every evaluation
(:mod:`~torchmix.distributed.gaussian`, :mod:`~torchmix.distributed.agq`). The optimiser runs on
every process with the same numbers, and every process returns the complete fit: estimates,
standard errors, per-group scores and random effects equal those of one process to rounding.

Exception: two-level linear models within reach of the one-process Newton fit are fitted by every
process on its own (:data:`REPLICATE_TWO_LEVEL_NEWTON`). Every process must make the same call (same model, same data: checked when the fit starts); fits
that one process makes alone belong inside :func:`~torchmix.distributed.context.run_locally`.
Only rank 0 shows progress and issues warnings (every process takes the same decisions). A process
that fails ends the fit on every process (:mod:`~torchmix.distributed.collectives`).
"""

from __future__ import annotations

import warnings

import torch

from ..tensors import FitOutput, ModelTensors
from .agq import agq_factory
from .collectives import Collectives, guarded
from .context import World
from ..fit.gaussian import fit_gaussian
from ..likelihood import gaussian_profiled
from .gaussian import fit_gaussian_data_parallel

__all__ = ["fit_data_parallel", "packet_size", "spreads", "REPLICATE_TWO_LEVEL_NEWTON"]

#: Two-level linear models that one process fits by Newton's method with the exact profiled Hessian
#: (:mod:`~torchmix.likelihood.gaussian_profiled`: one pass over the rows, then a few passes over the
#: groups) are fitted by every process on its own: spreading them would trade Newton for L-BFGS and
#: cost more than it saves. The numbers are those of one process, bit for bit. ``False``: spread
#: them like the other models.
REPLICATE_TWO_LEVEL_NEWTON = True


def spreads(tensors: ModelTensors, gaussian: bool) -> bool:
    """Whether a fit of ``tensors`` is spread over the processes (otherwise every process makes it)."""
    if not gaussian or not REPLICATE_TWO_LEVEL_NEWTON:
        return True
    return not (len(tensors.levels) == 1 and tensors.levels[0].q <= gaussian_profiled.MAX_Q)


def packet_size(tensors: ModelTensors) -> int:
    r"""Packet length of the fit's collectives: a flag and the largest sum of the optimiser's loop,
    :math:`\max\{(p+1)^2 + 1,\ 1 + p + \sum_l q_l^2\}` (gaussian profile; AGQ value and gradient)."""
    p = tensors.n_fixed
    q2 = sum(lv.q ** 2 for lv in tensors.levels)
    return 2 + max((p + 1) ** 2 + 1, 1 + p + q2, 10)


def fingerprint(tensors: ModelTensors, gaussian: bool) -> torch.Tensor:
    """A few numbers that differ between processes that hold different models or data (or would take
    different paths)."""
    t = tensors
    vals = [t.n_obs, t.n_fixed, t.n_levels, sum(lv.n_groups for lv in t.levels), float(t.w1_uncond.sum()),
            float(t.y.sum()), float(t.X.sum()), float(gaussian), float(spreads(tensors, gaussian))]
    return torch.tensor(vals, dtype=torch.float64)


def fit_data_parallel(tensors: ModelTensors, family, world: World, *, gaussian: bool, n_quad: int = 13,
                      start=None, max_iter: int = 200, tol: float = 1e-8, small_sample="G/(G-1)",
                      progress: bool = True, timeout=None) -> FitOutput:
    """Fit ``tensors`` (the full model, the same on every process) across the processes of ``world``.

    Arguments as for :func:`~torchmix.fit.gaussian.fit_gaussian` (``gaussian=True``) or
    :func:`~torchmix.fit.glmm.fit_glmm`; ``timeout`` overrides the collective timeout (seconds).
    Returns the same :class:`~torchmix.tensors.FitOutput` on every process, with
    ``extra["world_size"]``.

    Raises
    ------
    DistributedError
        On the other processes when one process fails, and on a process whose collective fails
        or times out.
    """
    coll = Collectives(world, timeout, packet=packet_size(tensors))
    main = world.rank == 0
    with guarded(coll), warnings.catch_warnings():
        if not main:
            warnings.simplefilter("ignore")
        coll.agree(fingerprint(tensors, gaussian), "models or data")
        if not spreads(tensors, gaussian):
            out = fit_gaussian(tensors, start=start, max_iter=max_iter, tol=tol, small_sample=small_sample,
                               progress=progress and main)
        elif gaussian:
            out = fit_gaussian_data_parallel(tensors, coll, start=start, max_iter=max_iter, tol=tol,
                                             small_sample=small_sample, progress=progress and main)
        else:
            from ..fit.glmm import fit_glmm
            out = fit_glmm(tensors, family, n_quad=n_quad, start=start, max_iter=max_iter, tol=tol,
                           small_sample=small_sample, progress=progress and main, likelihood=agq_factory(coll))
    out.extra["world_size"] = world.size
    out.extra["data_parallel"] = spreads(tensors, gaussian)
    return out
