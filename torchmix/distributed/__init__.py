"""Running fits over several processes with :mod:`torch.distributed` (launched by ``torchrun``).

:mod:`.context` says which process this is and whether fits run across processes; the other
modules of this package build on it (data-parallel likelihoods, task-parallel fits).
"""

from .context import World, all_reduce_sum, is_main, run_locally, world

__all__ = ["World", "world", "is_main", "run_locally", "all_reduce_sum"]
