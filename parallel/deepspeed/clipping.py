"""EP-correct gradient clipping for ZeRO 0, where DeepSpeed's own is wrong with expert parallelism: fp32
(runtime.utils.clip_grad_norm_) averages the per-rank norms; bf16/fp16 (FP16_UnfusedOptimizer) leaves the
expert grads out of the norm. ZeRO 1/2 clip correctly themselves."""

from __future__ import annotations

import torch
from deepspeed.moe.utils import is_moe_param
from deepspeed.utils import groups as _ds_groups
from torch import nn

from competesmoe.parallel import collectives


@torch.no_grad()
def global_grad_norm(model: nn.Module, device: torch.device | None = None, norm_type: float = 2.0) -> torch.Tensor:
    """Global grad norm equal to EP=1, for already-reduced grads (call after engine.backward at
    the accumulation boundary, ZeRO 0): dense grads are identical on all ranks, expert grads are
    summed over the EP group (each expert counted once). device: where the norm is made and reduced (None: the
    model's); nothing waits for it."""
    if norm_type != 2.0:
        raise NotImplementedError
    device = device if device is not None else next(model.parameters()).device
    dense = torch.zeros((), dtype=torch.float32, device=device)
    expert = {}
    for p in model.parameters():
        if p.grad is None:
            continue
        sq = p.grad.detach().float().pow(2).sum()
        if is_moe_param(p):
            expert[p.group_name] = expert.get(p.group_name, 0.0) + sq
        else:
            dense += sq
    total = dense
    for name in sorted(expert):
        e = expert[name].clone()
        collectives.all_reduce_(e, device, group=_ds_groups._get_expert_parallel_group(name))
        total = total + e
    return total.sqrt()


@torch.no_grad()
def clip_grad_norm_ep(model: nn.Module, max_norm: float, device: torch.device | None = None) -> torch.Tensor:
    """EP-correct replacement for DeepSpeed's ZeRO-0 fp32 clipping (same formula as
    deepspeed.runtime.utils.clip_grad_norm_: coef = min(1, max_norm / (norm + 1e-6))). max_norm 0
    only measures; a non-finite norm leaves the gradients alone. Nothing waits for the device: the caller reads the
    norm when it must decide."""
    norm = global_grad_norm(model, device)
    if max_norm <= 0:
        return norm
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    coef = torch.where(torch.isfinite(norm), coef, torch.ones_like(coef))
    for p in model.parameters():
        if p.grad is not None:
            p.grad.mul_(coef.to(p.grad.dtype))
    return norm
