"""The data-parallel x expert-parallel grid, as an explicit object passed to whoever needs it.

With world W and EP size p, expert-parallel groups are runs of p consecutive ranks
([0..p-1], [p..2p-1], ...), so all-to-all stays inside a node when p <= GPUs per node; the
expert-data-parallel groups join the ranks that hold the same experts ({i, i+p, i+2p, ...}).
This is the layout DeepSpeed's `groups._create_expert_and_data_parallel` builds too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from competesmoe.common.errors import UserError


@dataclass(frozen=True)
class ParallelGroups:
    world_size: int
    rank: int
    ep_size: int
    ep: dist.ProcessGroup | None
    """Ranks that share one layer's experts between them (all-to-all, competition gathers)."""
    edp: dist.ProcessGroup | None
    """Ranks that hold the same experts (expert gradients are reduced here)."""
    dp: dist.ProcessGroup | None
    """All ranks (dense gradients, metrics)."""

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep_size

    @property
    def dp_size(self) -> int:
        return self.world_size

    @property
    def edp_size(self) -> int:
        return self.world_size // self.ep_size


def single_process_groups() -> ParallelGroups:
    return ParallelGroups(world_size=1, rank=0, ep_size=1, ep=None, edp=None, dp=None)


def build_groups(ep_size: int) -> ParallelGroups:
    """Create the grid on the initialised default process group (every rank must call this)."""
    if not dist.is_initialized():
        if ep_size != 1:
            raise UserError(f"parallel.expert_parallel_size ({ep_size}) needs {ep_size} ranks; "
                            f"start the job with `competesmoe launch --nproc {ep_size} ...`")
        return single_process_groups()
    from competesmoe.parallel.deepspeed.engine import ensure_expert_groups

    world, rank = dist.get_world_size(), dist.get_rank()
    if world % ep_size:
        raise UserError(f"world size ({world} ranks) must be divisible by parallel.expert_parallel_size ({ep_size})")
    # DeepSpeed reduces expert gradients over its own EDP groups: share them, one source of truth.
    ds_groups = ensure_expert_groups(ep_size)
    return ParallelGroups(world_size=world, rank=rank, ep_size=ep_size, ep=ds_groups.ep_group,
                          edp=ds_groups.edp_group, dp=dist.group.WORLD)
