"""The parallelize step: turns the single-process model into its distributed form.

The model is built whole (every rank the same weights from the same seed); this step then
applies expert parallelism (shard each MoE layer's experts, swap in the all-to-all transport)
and tags expert parameters for DeepSpeed's expert-data-parallel gradient reduction, which stays
on at EP 1 too so checkpoints always store experts the same way (one file per EP rank).
"""

from __future__ import annotations

from torch import nn

from competesmoe.launcher.config import Config
from competesmoe.moe.model import TransformerLM
from competesmoe.parallel import deepspeed_moe
from competesmoe.parallel.groups import ParallelGroups


def parallelize(model: TransformerLM, cfg: Config, groups: ParallelGroups) -> TransformerLM:
    if groups.ep_size > 1:
        apply_expert_parallel(model, cfg, groups)
    if model.moe_layers:
        deepspeed_moe.mark_expert_params(model, groups.ep_size, cfg.moe.num_experts)
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
