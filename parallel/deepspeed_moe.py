"""DeepSpeed engine support for our own expert-parallel MoE layers (stacked expert weights).

Our MoE layers hold all experts of a rank as stacked parameters ([E_local, ...], expert dim first)
and do their own all-to-all; they do not subclass `deepspeed.moe.layer.MoE`. The DeepSpeed engine
(0.19.x) turns on its expert-parallel machinery only when it finds an instance of that class in the
model, and then needs, per expert parameter, `param.allreduce = False` and `param.group_name`. With
that in place it does, for ZeRO 0, 1 and 2 (fp32 and bf16):

  * broadcast at init: expert params only inside their expert-data-parallel (EDP) group (ranks that
    hold the same experts); dense params over all ranks;
  * gradients: expert grads summed over the EDP group and divided by the full data-parallel world
    size W (so the result equals EP=1); dense grads averaged over W;
  * ZeRO 1/2: expert params go into separate optimizer param groups partitioned over the EDP group;
  * ZeRO 1/2 grad-norm clipping: global norm equals EP=1.

The recipe:

  1. `ensure_expert_groups(ep_size)` after `deepspeed.init_distributed()` and before building the
     layers' all-to-all: our dispatch must use exactly DeepSpeed's EP group (`ExpertGroups.ep_group`).
  2. `mark_expert_params(model, ep_size, num_experts)` before `deepspeed.initialize`: tags the expert
     parameters and attaches a parameter-less `DeepSpeedMoEMarker` (a `deepspeed.moe.layer.MoE`
     subclass whose `__init__` is bypassed) so the engine sees an MoE model.
  3. Build the optimizer from `optimizer_param_groups(model)` (expert params split into `moe`
     groups, which ZeRO 1/2 require) or call `make_engine`.
  4. Checkpoints: DeepSpeed's MoE checkpoint path cannot save stacked experts (it keys on
     `deepspeed_moe.experts.deepspeed_experts.N` names of `MoE` modules); with the marker it saves
     nothing for experts and its model file would hold only DP-rank-0's expert slice, which
     `load_checkpoint` would copy onto every rank. Use `save_checkpoint` / `load_checkpoint` here:
     expert tensors are stripped from DeepSpeed's model file and written once per expert-parallel
     rank (by EDP rank 0) to `<dir>/<tag>/experts_ep<r>_of_<ep>.pt`; on load they are merged back
     into the module state through DeepSpeed's `custom_load_fn`, i.e. before the engine restores
     ZeRO partitions / refreshes fp32 master weights.

Known DeepSpeed shortfalls (0.19.8), refused by `check_config`:
  * ZeRO 0 gradient clipping is not EP=1: fp32 (runtime.utils.clip_grad_norm_) averages the
    per-rank norms; bf16/fp16 (FP16_UnfusedOptimizer) leaves expert grads out of the norm. Set
    `gradient_clipping: 0` and call `clip_grad_norm_ep(model, max_norm)` between `engine.backward`
    and `engine.step` (at the accumulation boundary), or use ZeRO 1/2 (their clipping is right).
  * ZeRO 1 with `contiguous_gradients: false` silently all-reduces expert grads over all ranks
    (DeepSpeed only warns). ZeRO 2 asserts contiguous_gradients, ZeRO 1/2 assert reduce_scatter.
  * ZeRO 3 is not supported with this marker (DeepSpeed refuses native MoE layers at stage 3).
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass
from typing import Callable, Iterable

import deepspeed
import deepspeed.comm as ds_dist
import torch
from deepspeed.moe.layer import MoE as _DeepSpeedMoE
from deepspeed.moe.utils import is_moe_param, split_params_into_different_moe_groups_for_optimizer
from deepspeed.utils import groups as _ds_groups
from torch import nn

MARKER_ATTR = "_deepspeed_moe_marker"
EXPERT_FILE_RE = re.compile(r"_ep(\d+)_of_(\d+)\.pt$")


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
    experts are checkpointed by `save_checkpoint` / `load_checkpoint` below.
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


# --------------------------------------------------------------------------- gradient clipping


@torch.no_grad()
def global_grad_norm(model: nn.Module, norm_type: float = 2.0) -> torch.Tensor:
    """Global grad norm equal to EP=1, for already-reduced grads (call after engine.backward at
    the accumulation boundary, ZeRO 0): dense grads are identical on all ranks, expert grads are
    summed over the EP group (each expert counted once)."""
    if norm_type != 2.0:
        raise NotImplementedError
    params = [p for p in model.parameters() if p.grad is not None]
    dev = params[0].grad.device if params else torch.device("cpu")
    dense = torch.zeros((), dtype=torch.float32, device=dev)
    expert = {}
    for p in params:
        sq = p.grad.detach().float().pow(2).sum()
        if is_moe_param(p):
            expert[p.group_name] = expert.get(p.group_name, 0.0) + sq
        else:
            dense += sq
    total = dense
    for name in sorted(expert):
        e = expert[name].clone()
        ds_dist.all_reduce(e, group=_ds_groups._get_expert_parallel_group(name))
        total = total + e
    return total.sqrt()


@torch.no_grad()
def clip_grad_norm_ep(model: nn.Module, max_norm: float) -> torch.Tensor:
    """EP-correct replacement for DeepSpeed's ZeRO-0 fp32 clipping (same formula as
    deepspeed.runtime.utils.clip_grad_norm_: coef = min(1, max_norm / (norm + 1e-6))). max_norm 0
    only measures; a non-finite norm is returned without touching the gradients."""
    norm = global_grad_norm(model)
    if max_norm <= 0 or not torch.isfinite(norm):
        return norm
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for p in model.parameters():
        if p.grad is not None:
            p.grad.mul_(coef.to(p.grad.dtype))
    return norm


# --------------------------------------------------------------------------- checkpoints


def _expert_params(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if is_moe_param(p)}


def _marker(model: nn.Module) -> DeepSpeedMoEMarker:
    m = getattr(model, MARKER_ATTR, None)
    if m is None:
        raise ValueError("model has no DeepSpeedMoEMarker; call mark_expert_params first")
    return m


def save_checkpoint(engine, save_dir: str, tag=None, client_state=None, save_latest: bool = True):
    """`engine.save_checkpoint` without expert tensors in DeepSpeed's model file, plus one file per
    expert-parallel rank with that rank's stacked expert tensors (written by EDP rank 0, so every
    expert is saved exactly once). Collective."""
    model = engine.module
    _marker(model)  # fails early on a model that was never marked
    experts = _expert_params(model)
    if tag is None:
        tag = f"global_step{engine.global_steps}"
    tag = str(tag)

    def strip_experts(module, state_dict, prefix, local_metadata):
        for n in experts:
            state_dict.pop(prefix + n, None)

    handle = model.register_state_dict_post_hook(strip_experts)
    try:
        engine.save_checkpoint(save_dir, tag=tag, client_state=client_state or {}, save_latest=save_latest)
    finally:
        handle.remove()

    write_expert_slices(engine.module, os.path.join(save_dir, tag), "experts",
                        {n: p.detach() for n, p in experts.items()})
    ds_dist.barrier()
    return tag


def write_expert_slices(model: nn.Module, tag_dir: str, prefix: str, tensors: dict[str, torch.Tensor]) -> None:
    """Write this EP rank's stacked expert tensors (expert dim first) to
    `<tag_dir>/<prefix>_ep<r>_of_<ep>.pt`, from expert-data-parallel rank 0 only, so every expert is
    written exactly once. Used for the expert weights and for their optimizer moments."""
    marker = _marker(model)
    g = ensure_expert_groups(marker.ep_size)
    if g.edp_rank != 0:
        return
    e_local = marker.experts_per_rank
    for n, t in tensors.items():
        if t.shape[0] != e_local:
            raise ValueError(f"{n}: expert dim {t.shape[0]} != experts per rank {e_local}")
    payload = {
        "num_experts": marker.num_experts,
        "ep_size": marker.ep_size,
        "ep_rank": g.ep_rank,
        "expert_start": g.ep_rank * e_local,
        "num_local_experts": e_local,
        "params": {n: t.cpu().clone() for n, t in tensors.items()},
    }
    path = os.path.join(tag_dir, f"{prefix}_ep{g.ep_rank:03d}_of_{marker.ep_size:03d}.pt")
    torch.save(payload, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_expert_state(ckpt_dir: str, names: Iterable[str], expert_start: int, num_local: int,
                      prefix: str = "experts") -> dict:
    """Assemble stacked tensors for global experts [expert_start, expert_start+num_local) from the
    per-EP-rank files of a checkpoint, whatever EP size it was saved with."""
    files = sorted(glob.glob(os.path.join(ckpt_dir, f"{prefix}_ep*_of_*.pt")))
    if not files:
        raise FileNotFoundError(f"no expert files in {ckpt_dir}")
    pieces = {n: {} for n in names}
    for f in files:
        m = EXPERT_FILE_RE.search(f)
        payload = torch.load(f, map_location="cpu", weights_only=True)
        s, k = payload["expert_start"], payload["num_local_experts"]
        if (payload["ep_rank"], payload["ep_size"]) != (int(m.group(1)), int(m.group(2))):
            raise RuntimeError(f"{f}: payload says ep rank {payload['ep_rank']} of {payload['ep_size']}")
        lo, hi = max(s, expert_start), min(s + k, expert_start + num_local)
        if lo >= hi:
            continue
        for n in names:
            if n not in payload["params"]:
                raise KeyError(f"{n} missing from {f}")
            t = payload["params"][n]
            for e in range(lo, hi):
                pieces[n][e] = t[e - s]
    out = {}
    for n in names:
        missing = [e for e in range(expert_start, expert_start + num_local) if e not in pieces[n]]
        if missing:
            raise RuntimeError(f"{n}: experts {missing} not found in {ckpt_dir}")
        out[n] = torch.stack([pieces[n][e] for e in range(expert_start, expert_start + num_local)])
    return out


def load_checkpoint(engine, load_dir: str, tag=None, **kwargs):
    """`engine.load_checkpoint` that takes this rank's experts from our per-EP-rank files. They are
    merged into the module state inside DeepSpeed's `custom_load_fn` hook, i.e. before ZeRO restores
    its fp32 partitions or `load_module_only` refreshes the fp32 master weights."""
    if "custom_load_fn" in kwargs:
        raise ValueError("custom_load_fn is used by this helper")
    model = engine.module
    marker = _marker(model)
    experts = _expert_params(model)
    if tag is None:
        with open(os.path.join(load_dir, "latest")) as f:
            tag = f.read().strip()
    g = ensure_expert_groups(marker.ep_size)
    e_local = marker.experts_per_rank
    strict = kwargs.get("load_module_strict", True)

    def custom_load_fn(src, dst):
        state = dict(src)
        stray = [n for n in experts if n in state]
        if stray:  # a checkpoint written by plain engine.save_checkpoint: DP-rank-0's experts only
            raise RuntimeError(f"DeepSpeed model file holds expert tensors {stray[:3]}...; it was not "
                               "saved with parallel.deepspeed_moe.save_checkpoint")
        state.update(load_expert_state(os.path.join(load_dir, str(tag)), list(experts), g.ep_rank * e_local,
                                       e_local))
        dst.load_state_dict(state, strict=strict)

    return engine.load_checkpoint(load_dir, tag=tag, custom_load_fn=custom_load_fn, **kwargs)


# --------------------------------------------------------------------------- optimizer state by name


ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")


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
        for flat in group["params"]:
            inner.state.setdefault(flat, {"step": torch.zeros((), dtype=torch.float32),
                                          **{k: torch.zeros_like(flat) for k in ADAM_MOMENTS}})
    engine.optimizer._hp_optimizer_states_linked = False
    engine.optimizer._lazy_init_hp_params_optimizer_state()


def _zero_adam_step(engine) -> torch.Tensor:
    """The Adam step count ZeRO's inner optimizer holds (the same for every flat partition)."""
    steps = [s["step"] for s in engine.optimizer.optimizer.state.values() if "step" in s]
    return torch.as_tensor(steps[0]).detach().cpu().clone()
