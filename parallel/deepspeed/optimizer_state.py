"""Each trained parameter's Adam state by name, whatever holds it, written beside DeepSpeed's own optimizer
files (which are tied to the layout): `optim_dense.pt` (rank 0) and, for the experts, one
`optim_experts_ep<r>_of_<ep>.pt` per expert-parallel rank. A resume at another world or EP size rebuilds
the optimizer from these."""

from __future__ import annotations

from pathlib import Path

import deepspeed.comm as ds_dist
import torch
from torch import nn

from competesmoe.parallel.deepspeed.engine import ensure_expert_groups, expert_params, marker
from competesmoe.parallel.deepspeed.expert_files import load_expert_state, write_expert_slices
from competesmoe.parallel.deepspeed.safe_load import safe_load

DENSE_FILE = "optim_dense.pt"
EXPERTS = "optim_experts"
"""Prefix of the expert moments' files (`optim_experts_ep000_of_002.pt`)."""
ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")


def save_by_name(engine, tag_dir: Path) -> None:
    """Write `named_optimizer_state` (experts sliced per EP rank). Collective under ZeRO 1/2."""
    state = named_optimizer_state(engine)
    experts = expert_params(engine.module)
    if ds_dist.get_rank() == 0:
        torch.save({n: s for n, s in state.items() if n not in experts}, tag_dir / DENSE_FILE)
    if experts:
        tensors = {f"{n}:{k}": v for n, s in state.items() if n in experts for k, v in s.items() if k != "step"}
        write_expert_slices(engine.module, str(tag_dir), EXPERTS, tensors)


def load_by_name(engine, tag_dir: Path) -> None:
    """Rebuild this rank's optimizer state from `save_by_name`'s files, whatever layout wrote them."""
    dense = safe_load(tag_dir / DENSE_FILE)
    state = dict(dense)
    expert_names = list(expert_params(engine.module))
    if expert_names:
        found = marker(engine.module)
        local = found.experts_per_rank
        kinds = [k for k in next(iter(dense.values())) if k != "step"]  # the moments (+ fp32 under ZeRO)
        keys = [f"{n}:{k}" for n in expert_names for k in kinds]
        tensors = load_expert_state(str(tag_dir), keys, ensure_expert_groups(found.ep_size).ep_rank * local, local,
                                    prefix=EXPERTS)
        step = next(iter(dense.values()))["step"]
        for name in expert_names:
            state[name] = {"step": step.clone(), **{k: tensors[f"{name}:{k}"] for k in kinds}}
    load_named_optimizer_state(engine, state)
    # The groups' lr lives in the optimizer state DeepSpeed did not load; the restored scheduler knows it.
    for group, lr in zip(engine.optimizer.param_groups, engine.lr_scheduler.get_last_lr()):
        group["lr"] = lr


def named_optimizer_state(engine) -> dict[str, dict[str, torch.Tensor]]:
    """Each trained parameter's Adam state by name, whole (this rank's experts only), whatever holds it:
    ZeRO 0 fp32 reads torch AdamW's own state; ZeRO 0 bf16 DeepSpeed's wrapper's fp32 masters ('fp32') and the
    state its AdamW keeps for them; ZeRO 1/2 (fp32 or bf16) gathers the partitions with DeepSpeed's
    safe_get_full_* (moments and 'fp32'). Collective under ZeRO 1/2 (same order everywhere).
    This is what a resume at another world or EP size rebuilds the optimizer from."""
    if not engine.zero_optimization():
        if isinstance(engine.optimizer, torch.optim.Optimizer):
            state = engine.optimizer.state
            return {n: dict(state[p]) for n, p in engine.module.named_parameters() if p in state}
        masters, state = _fp32_masters(engine), engine.optimizer.optimizer.state
        return {n: {**state[masters[p]], "fp32": masters[p].detach().clone()}
                for n, p in engine.module.named_parameters() if p in masters and masters[p] in state}
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    _link_zero_adam_state(engine)
    step = _zero_adam_step(engine)
    out = {}
    for name, param in engine.module.named_parameters():
        if not param.requires_grad:
            continue
        out[name] = {"step": step.clone(), "fp32": safe_get_full_fp32_param(param),
                     **{k: safe_get_full_optimizer_state(param, k) for k in ADAM_MOMENTS}}
    return out


def load_named_optimizer_state(engine, state: dict[str, dict[str, torch.Tensor]]) -> None:
    """Put `named_optimizer_state`'s output (rebuilt for this rank's layout) back into the optimizer."""
    if not engine.zero_optimization():
        plain = isinstance(engine.optimizer, torch.optim.Optimizer)
        masters = {} if plain else _fp32_masters(engine)
        for name, param in engine.module.named_parameters():
            if name not in state:
                continue
            if plain:
                engine.optimizer.state[param] = state[name]
                continue
            masters[param].data.copy_(state[name]["fp32"])
            engine.optimizer.optimizer.state[masters[param]] = {k: state[name][k] for k in ("step", *ADAM_MOMENTS)}
        return
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    _link_zero_adam_state(engine)
    for name, param in engine.module.named_parameters():
        if name not in state:
            continue
        safe_set_full_fp32_param(param, state[name]["fp32"])
        for key in ADAM_MOMENTS:
            safe_set_full_optimizer_state(param, state[name][key], key)
    step = next(iter(state.values()))["step"]
    for flat_state in engine.optimizer.optimizer.state.values():
        flat_state["step"] = step.clone().to(flat_state["step"].device)


def _fp32_masters(engine) -> dict[nn.Parameter, torch.Tensor]:
    """ZeRO 0 in bf16: DeepSpeed's FP16_UnfusedOptimizer keeps an fp32 master per module parameter."""
    optimizer = engine.optimizer
    return {low: master for masters, lows in zip(optimizer.fp32_groups, optimizer.fp16_groups)
            for master, low in zip(masters, lows)}


def _link_zero_adam_state(engine) -> None:
    """Give every flat partition Adam state and link each parameter's view into it. DeepSpeed links the views
    once, after the first step, and only to the partitions torch AdamW had made state for by then (those with a
    gradient on that step), and a fresh engine has none at all. Zero state is what AdamW starts from."""
    inner = engine.optimizer.optimizer
    for group in inner.param_groups:
        # Where torch's AdamW keeps its step: on the parameter's device when fused or capturable, else on the host.
        step_device = "cpu" if not (group.get("fused") or group.get("capturable")) else None
        for flat in group["params"]:
            inner.state.setdefault(flat, {"step": torch.zeros((), dtype=torch.float32, device=step_device or flat.device),
                                          **{k: torch.zeros_like(flat) for k in ADAM_MOMENTS}})
    engine.optimizer._hp_optimizer_states_linked = False
    engine.optimizer._lazy_init_hp_params_optimizer_state()


def _zero_adam_step(engine) -> torch.Tensor:
    """The Adam step count ZeRO's inner optimizer holds (the same for every flat partition)."""
    steps = [s["step"] for s in engine.optimizer.optimizer.state.values() if "step" in s]
    return torch.as_tensor(steps[0], device="cpu").detach().clone()
