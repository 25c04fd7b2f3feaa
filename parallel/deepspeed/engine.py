"""The engine: DeepSpeed's expert-parallel groups, the MoE marker that switches on its expert code paths,
the optimizer's parameter groups, the refused settings, and `make_engine`, which puts them together."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import deepspeed
import deepspeed.comm as ds_dist
import torch
from deepspeed.moe.layer import MoE as _DeepSpeedMoE
from deepspeed.moe.utils import is_moe_param, split_params_into_different_moe_groups_for_optimizer
from deepspeed.utils import groups as _ds_groups
from torch import nn

MARKER_ATTR = "_deepspeed_moe_marker"


def group_name(ep_size: int) -> str:
    """DeepSpeed's name for the EP/EDP groups of one expert-parallel size."""
    return f"ep_size_{ep_size}"


@dataclass(frozen=True)
class ExpertGroups:
    ep_size: int
    ep_group: object  # torch ProcessGroup: ranks that split the experts (all-to-all)
    edp_group: object  # torch ProcessGroup: ranks that hold the same experts (grad all-reduce)
    ep_rank: int
    edp_rank: int
    ep_ranks: tuple[int, ...]
    edp_ranks: tuple[int, ...]


def ensure_expert_groups(ep_size: int, use_data_before_expert_parallel: bool = False) -> ExpertGroups:
    """Create (once) DeepSpeed's expert-parallel and expert-data-parallel groups and return them.

    Collective: every rank must call it, in the same order. Default layout (DeepSpeed's legacy E+D):
    EP groups are consecutive ranks [0..ep), [ep..2ep), ...; rank r has ep_rank r % ep and holds
    experts [ep_rank * E_local, (ep_rank + 1) * E_local). `use_data_before_expert_parallel` must
    match the engine config's `use_data_before_expert_parallelism` (default false).
    """
    if not ds_dist.is_initialized():
        raise RuntimeError("call deepspeed.init_distributed() first")
    world = ds_dist.get_world_size()
    if ep_size < 1 or world % ep_size:
        raise ValueError(f"ep_size {ep_size} must divide the world size {world}")
    name = group_name(ep_size)
    if name not in _ds_groups._get_expert_parallel_group_dict():
        _ds_groups._create_expert_and_data_parallel(
            ep_size, use_data_before_expert_parallel_=use_data_before_expert_parallel)
    ep_group = _ds_groups._get_expert_parallel_group(name)
    edp_group = _ds_groups._get_expert_data_parallel_group(name)
    return ExpertGroups(
        ep_size=ep_size,
        ep_group=ep_group,
        edp_group=edp_group,
        ep_rank=ds_dist.get_rank(group=ep_group),
        edp_rank=ds_dist.get_rank(group=edp_group),
        ep_ranks=tuple(_ds_groups._get_expert_parallel_group_ranks(name)),
        edp_ranks=tuple(_ds_groups._get_expert_data_parallel_group_ranks(name)),
    )


class DeepSpeedMoEMarker(_DeepSpeedMoE):
    """Parameter-less stand-in that makes `DeepSpeedEngine` switch on its MoE code paths.

    The engine finds MoE layers only via `isinstance(m, deepspeed.moe.layer.MoE)` and reads
    `num_experts`, `num_local_experts`, `expert_group_name`, `ep_size` from them and calls
    `set_deepspeed_parallelism`. `MoE.__init__` (which builds a gate and experts) is bypassed.

    `num_local_experts` is deliberately 0: DeepSpeed's own expert-checkpoint files
    (`layer_<i>_expert_<j>_...`) are neither written nor expected for this marker; our stacked
    experts are checkpointed by `expert_files.save_checkpoint` / `load_checkpoint`.
    """

    def __init__(self, num_experts: int, ep_size: int, use_data_before_expert_parallel: bool = False):
        nn.Module.__init__(self)  # not MoE.__init__: no gate, no experts, no parameters
        if num_experts % ep_size:
            raise ValueError(f"num_experts {num_experts} not divisible by ep_size {ep_size}")
        self.num_experts = num_experts
        self.ep_size = ep_size
        self.expert_group_name = group_name(ep_size)
        self.num_local_experts = 0  # see class docstring
        self.experts_per_rank = num_experts // ep_size
        self.use_residual = False
        self.enable_expert_tensor_parallelism = False
        self._use_data_before_expert_parallel = use_data_before_expert_parallel

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        # Called by the engine during initialize (collective).
        if use_data_before_expert_parallel_ != self._use_data_before_expert_parallel:
            raise ValueError("config use_data_before_expert_parallelism does not match the groups our "
                             "dispatch was built with")
        ensure_expert_groups(self.ep_size, use_data_before_expert_parallel_)

    def forward(self, *args, **kwargs):  # pragma: no cover - never part of the forward pass
        raise RuntimeError("DeepSpeedMoEMarker is a marker for the DeepSpeed engine; it has no forward")


def default_is_expert(name: str, param: nn.Parameter) -> bool:
    """Expert params live under a module named `experts` (moe.experts.GroupedExperts)."""
    return ".experts." in f".{name}"


def mark_expert_params(model: nn.Module,
                       ep_size: int,
                       num_experts: int,
                       is_expert: Callable[[str, nn.Parameter], bool] = default_is_expert,
                       use_data_before_expert_parallel: bool = False) -> list[str]:
    """Tag expert params for DeepSpeed and attach the MoE marker to `model`. Call before
    `deepspeed.initialize`. Returns the names of the expert params (stacked along dim 0).

    DeepSpeed's contract (deepspeed.moe.utils.is_moe_param): `param.allreduce is False` and
    `param.group_name` names the EP/EDP group pair.
    """
    names = []
    for name, p in model.named_parameters():
        if is_expert(name, p):
            p.allreduce = False
            p.group_name = group_name(ep_size)
            names.append(name)
        elif getattr(p, "allreduce", True) is False:
            raise ValueError(f"{name} is tagged allreduce=False but is not an expert param")
    if not names:
        raise ValueError("no expert params found")
    existing = getattr(model, MARKER_ATTR, None)
    if existing is not None and existing.ep_size != ep_size:
        raise ValueError("model already marked with another ep_size")
    if existing is None:
        # add_module, not attribute assignment, so it is a registered (state-less) child.
        model.add_module(MARKER_ATTR, DeepSpeedMoEMarker(num_experts, ep_size, use_data_before_expert_parallel))
    return names


def optimizer_param_groups(model_or_groups, **defaults) -> list[dict]:
    """Param groups with expert params split into DeepSpeed `moe` groups (needed by ZeRO 1/2,
    harmless at stage 0). Accepts a module, an iterable of params, or a list of group dicts
    (each group keeps its options; a `name` is added when missing)."""
    if isinstance(model_or_groups, nn.Module):
        groups = [{"params": [p for p in model_or_groups.parameters() if p.requires_grad]}]
    else:
        items = list(model_or_groups)
        groups = [dict(g) for g in items] if items and isinstance(items[0], dict) else [{"params": items}]
    for i, g in enumerate(groups):
        g.setdefault("name", f"group{i}")
        g["params"] = list(g["params"])
        for k, v in defaults.items():
            g.setdefault(k, v)
    groups = split_params_into_different_moe_groups_for_optimizer(groups)
    return [g for g in groups if g["params"]]


def check_config(config: dict) -> None:
    """Refuse the DeepSpeed settings under which expert gradients come out wrong."""
    zero = config.get("zero_optimization", {}) or {}
    stage = int(zero.get("stage", 0))
    if stage >= 3:
        raise ValueError("ZeRO 3 is not supported with our stacked-expert MoE marker")
    if stage in (1, 2) and zero.get("reduce_scatter", True) is False:
        # DeepSpeed asserts this itself for MoE; fail early with the reason.
        raise ValueError("ZeRO 1/2 with MoE needs reduce_scatter=true")
    if stage == 1 and zero.get("contiguous_gradients", True) is False:
        # DeepSpeed only warns; its non-contiguous fallback averages expert grads over all ranks.
        raise ValueError("ZeRO 1 with contiguous_gradients=false reduces expert grads over all ranks (wrong)")
    if stage == 0 and float(config.get("gradient_clipping", 0.0) or 0.0) > 0.0:
        # fp32: clip_grad_norm_ averages per-rank norms; fp16/bf16 (FP16_UnfusedOptimizer) leaves the
        # expert grads out of the norm. Neither equals EP=1.
        raise ValueError("DeepSpeed's ZeRO-0 gradient clipping is wrong with expert parallelism; set "
                         "gradient_clipping=0 and call clip_grad_norm_ep between backward and step, "
                         "or use ZeRO 1/2")


def make_engine(model: nn.Module,
                config: dict,
                ep_size: int,
                num_experts: int,
                optimizer_factory: Callable[[list[dict]], torch.optim.Optimizer],
                is_expert: Callable[[str, nn.Parameter], bool] = default_is_expert,
                param_groups=None,
                **initialize_kwargs):
    """Mark the model, build the client optimizer over MoE-split param groups, initialize DeepSpeed.

    `optimizer_factory(groups)` builds a torch optimizer (e.g. `lambda g: torch.optim.AdamW(g, lr=..)`);
    `param_groups` optionally gives the dense grouping (e.g. weight-decay groups) to split.
    """
    check_config(config)
    use_dbe = bool(config.get("use_data_before_expert_parallelism", False))
    ensure_expert_groups(ep_size, use_dbe)
    mark_expert_params(model, ep_size, num_experts, is_expert, use_dbe)
    groups = optimizer_param_groups(model if param_groups is None else param_groups)
    optimizer = optimizer_factory(groups)
    engine, optimizer, _, lr_scheduler = deepspeed.initialize(model=model,
                                                              optimizer=optimizer,
                                                              config=config,
                                                              **initialize_kwargs)
    assert engine.has_moe_layers, "DeepSpeed did not pick up the MoE marker"
    return engine, optimizer, lr_scheduler


def marker(model: nn.Module) -> DeepSpeedMoEMarker:
    """The marker `mark_expert_params` attached (its EP size and expert counts)."""
    found = getattr(model, MARKER_ATTR, None)
    if found is None:
        raise ValueError("model has no DeepSpeedMoEMarker; call mark_expert_params first")
    return found


def expert_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """The tagged expert parameters by name (stacked, expert dim first)."""
    return {n: p for n, p in model.named_parameters() if is_moe_param(p)}
