"""Running fits over several processes with :mod:`torch.distributed` (launched by ``torchrun``).

:mod:`.context` says which process this is and whether fits run across processes; the other
modules of this package build on it (data-parallel likelihoods, task-parallel fits).
:mod:`.launch` joins the process group ``torchrun`` prepared; :mod:`.tasks` spreads plausible
values and replicate refits over the processes.
"""

from .context import World, all_reduce_sum, is_main, launched, run_locally, world
from .launch import process_group

__all__ = ["World", "world", "launched", "is_main", "run_locally", "all_reduce_sum", "process_group"]
