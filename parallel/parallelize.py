"""The parallelize step: turns the single-process model into its distributed form.

The model is built whole (every rank the same weights from the same seed); this step then
applies expert parallelism: shard each MoE layer's experts and swap in the all-to-all transport.
ZeRO and the expert-data-parallel gradient reduction come next, from the DeepSpeed engine
(`deepspeed_moe.make_engine`).
"""

from __future__ import annotations

from torch import nn

from competesmoe.launcher.config import Config
from competesmoe.moe.model import TransformerLM
from competesmoe.parallel.groups import ParallelGroups


def parallelize(model: TransformerLM, cfg: Config, groups: ParallelGroups) -> TransformerLM:
    if groups.ep_size > 1:
        apply_expert_parallel(model, cfg, groups)
    return model


def apply_expert_parallel(model: TransformerLM, cfg: Config, groups: ParallelGroups) -> None:
    """Keep this rank's contiguous slice of each layer's experts and route tokens by all-to-all."""
    from competesmoe.parallel.expert_parallel import AllToAllDispatcher

    for layer in model.moe_layers:
        local = layer.num_experts // groups.ep_size
        first = groups.ep_rank * local
        experts = layer.experts
        experts.w_in_EDF = nn.Parameter(experts.w_in_EDF.detach()[first:first + local].clone())
        experts.w_out_EFD = nn.Parameter(experts.w_out_EFD.detach()[first:first + local].clone())
        layer.dispatcher = AllToAllDispatcher(layer.num_experts, groups, cfg.moe.competition.gather)
