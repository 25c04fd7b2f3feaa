"""The parallelize step: turns the single-process model into its distributed form.

The model is built whole (every rank the same weights from the same seed); this step then
applies expert parallelism (shard each MoE layer's experts and swap in the all-to-all transport) and
activation checkpointing. ZeRO and the expert-data-parallel gradient reduction come next, from the
DeepSpeed engine (`parallel.deepspeed.engine.make_engine`).
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torch.distributed._composable import checkpoint
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from competesmoe.moe.layer import MoELayer
from competesmoe.moe.model import TransformerLM
from competesmoe.parallel.collectives import SAVED_OPS
from competesmoe.parallel.expert_parallel import AllToAllDispatcher
from competesmoe.parallel.groups import ParallelGroups


def parallelize(model: TransformerLM, groups: ParallelGroups, *, gather: str = "scores",
                activation_checkpointing: str = "none") -> TransformerLM:
    """gather: moe.competition.gather; activation_checkpointing: parallel.activation_checkpointing."""
    if groups.ep_size > 1:
        for layer in model.moe_layers:
            shard_experts(layer, groups, gather)
    apply_activation_checkpointing(model, activation_checkpointing)
    return model


def shard_experts(layer: MoELayer, groups: ParallelGroups, gather: str = "scores") -> None:
    """Keep this rank's contiguous slice of the layer's experts and route its tokens by all-to-all."""
    local = layer.num_experts // groups.ep_size
    first = groups.ep_rank * local
    experts = layer.experts
    experts.w_in_EDF = nn.Parameter(experts.w_in_EDF.detach()[first:first + local].clone())
    experts.w_out_EFD = nn.Parameter(experts.w_out_EFD.detach()[first:first + local].clone())
    layer.dispatcher = AllToAllDispatcher(layer.num_experts, groups, gather)


KEPT_FROM_FORWARD = frozenset({*SAVED_OPS, torch.ops.aten.topk.default})
"""What 'full' activation checkpointing keeps instead of recomputing: every collective's output (a recomputation
that re-entered one would talk to ranks that are not there) and every top-K (on CUDA, ties may resolve otherwise
the second time: other experts, other split sizes, and the ranks' all-to-alls would no longer match)."""


def _keep_collectives_and_topk(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in KEPT_FROM_FORWARD else CheckpointPolicy.PREFER_RECOMPUTE


def apply_activation_checkpointing(model: TransformerLM, mode: str) -> None:
    """Recompute in backward what forward would keep ('none' | 'experts' | 'full', see ParallelConfig).

    'experts': the experts' hidden layers are recomputed (GroupedExperts.recompute_hidden), on router and
    competition steps; no collective is inside. 'full': torch's composable checkpoint on every block, hooked in place
    so parameter names, DeepSpeed's parameter groups and checkpoints are unchanged, with a selective policy (as
    torchtitan's): the block's forward is recomputed except the outputs of its collectives and top-Ks
    (`KEPT_FROM_FORWARD`), which backward takes from forward. So backward never re-enters a forward collective and
    recomputes the routing from the same expert choices.
    """
    if mode == "full":
        for block in model.blocks:
            checkpoint(block, context_fn=partial(create_selective_checkpoint_contexts, _keep_collectives_and_topk))
    elif mode == "experts":
        for layer in model.moe_layers:
            layer.experts.recompute_hidden = True
