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
    input projection), 'full' every transformer block (the least memory, about one extra forward) except the
    outputs of its collectives and top-Ks, which are kept: backward never re-enters an all-to-all."""

    overlap_comm: bool = True
    """ZeRO 1/2: reduce gradients bucket by bucket while backward still runs (DeepSpeed's
    zero_optimization.overlap_comm). ZeRO 0 reduces them after backward."""
    reduce_bucket_size: int = 50_000_000
    """Elements per gradient-reduction bucket (ZeRO 1/2): smaller buckets start communicating earlier in backward
    and hold less memory, larger ones send fewer, larger messages (DeepSpeed's default, 5e8, rarely overlaps)."""
    allgather_bucket_size: int = 50_000_000
    """Elements per bucket of the parameter all-gather after a ZeRO 1/2 optimizer step."""
    grad_reduce_dtype: Literal["fp32", "bf16"] = "fp32"
    """The dtype gradients are reduced over the ranks in (DeepSpeed's communication_data_type): fp32 adds bf16
    gradients without rounding every partial sum to bf16's 8-bit mantissa; bf16 halves the bytes."""
    deepspeed_config: str | None = None
    """A JSON or YAML file of further DeepSpeed settings merged into the engine's config (e.g. comms_logger,
    zero_optimization.round_robin_gradients). Settings the run controls (batch sizes, precision, ZeRO stage,
    clipping, optimizer, scheduler and the fields above: parallel/deepspeed/config.py CONTROLLED) must be left out
    or equal the run's own; the merged config must pass DeepSpeed's validation."""

    def validate(self) -> None:
        for name in ("reduce_bucket_size", "allgather_bucket_size"):
            value = getattr(self, name)
            check(value >= 1, f"parallel.{name} ({value}) must be at least 1 element")
        for name in ("expert_parallel_size", "threads_per_rank"):
            value = getattr(self, name)
            check(value >= 1, f"parallel.{name} ({value}) must be at least 1")

    def validate_world(self, world_size: int) -> None:
        """Checks that need the number of ranks, made once the launcher has told us."""
        ep = self.expert_parallel_size
        check(world_size % ep == 0,
              f"world size ({world_size} ranks) must be divisible by parallel.expert_parallel_size ({ep}); "
              f"launch a multiple of {ep} ranks or lower the EP size")
