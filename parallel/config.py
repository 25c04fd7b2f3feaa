"""Configuration of the distributed layout: `parallel.*` of a run's YAML."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from competesmoe.common.typed_config import check


@dataclass
class ParallelConfig:
    expert_parallel_size: int = 1
    """Ranks one MoE layer's experts are spread over (EP); must divide moe.num_experts and the world size."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """torch.distributed backend; auto = nccl on CUDA, gloo otherwise."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto = cuda when available, else cpu."""
    threads_per_rank: int = 1
    """Intra-op threads per rank (torch.set_num_threads)."""
    activation_checkpointing: Literal["none", "experts", "full"] = "none"
    """Recompute activations in backward instead of keeping them: 'experts' the experts' hidden layers, one
    expert at a time (the largest activations of an MoE model, above all on competition steps; costs one extra
    input projection), 'full' every transformer block (the least memory, about one extra forward)."""

    def validate(self) -> None:
        for name in ("expert_parallel_size", "threads_per_rank"):
            value = getattr(self, name)
            check(value >= 1, f"parallel.{name} ({value}) must be at least 1")

    def validate_world(self, world_size: int) -> None:
        """Checks that need the number of ranks, made once the launcher has told us."""
        ep = self.expert_parallel_size
        check(world_size % ep == 0,
              f"world size ({world_size} ranks) must be divisible by parallel.expert_parallel_size ({ep}); "
              f"launch a multiple of {ep} ranks or lower the EP size")
