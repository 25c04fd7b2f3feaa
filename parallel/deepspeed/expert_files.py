"""Checkpoints of a marked engine: DeepSpeed's files without the experts, and each expert-parallel rank's
stacked expert tensors once, in `<dir>/<tag>/experts_ep<r>_of_<ep>.pt` (any EP size can read them back).

DeepSpeed's MoE checkpointing keys on its own `MoE` modules' expert names, so with our marker it would save
no experts and its model file would hold DP-rank-0's slice only, which `load_checkpoint` would then copy
onto every rank.
"""

from __future__ import annotations

import glob
import os
import re
from typing import Iterable

import deepspeed.comm as ds_dist
import torch
from torch import nn

from competesmoe.parallel.deepspeed.engine import ensure_expert_groups, expert_params, marker
from competesmoe.parallel.deepspeed.safe_load import safe_load, use_safe_loads

EXPERTS = "experts"
"""Prefix of the expert-weight files (`experts_ep000_of_002.pt`)."""
EXPERT_FILE_RE = re.compile(r"_ep(\d+)_of_(\d+)\.pt$")
MODEL_FILE = "mp_rank_00_model_states.pt"
"""DeepSpeed's model file (dense weights, LR scheduler, client state) without model parallelism."""


def expert_file_name(prefix: str, ep_rank: int, ep_size: int) -> str:
    return f"{prefix}_ep{ep_rank:03d}_of_{ep_size:03d}.pt"


def deepspeed_file_names(world_size: int, ep_size: int, zero_stage: int, bf16: bool, has_experts: bool) -> list[str]:
    """The files DeepSpeed 0.19's `save_checkpoint` writes into a tag folder for this layout (no model
    parallelism): its model file, and the optimizer's, one per expert-parallel rank at ZeRO 0 with experts
    (inside the model file without), one per data-parallel rank at ZeRO 1/2."""
    if zero_stage > 0:
        prefix = "bf16_" if bf16 else ""
        optimizer = [f"{prefix}zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(world_size)]
    elif has_experts:
        optimizer = [f"expp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(ep_size)]
    else:
        optimizer = []
    return [MODEL_FILE, *optimizer]


def save_checkpoint(engine, save_dir: str, tag=None, client_state=None, save_latest: bool = True):
    """`engine.save_checkpoint` without expert tensors in DeepSpeed's model file, plus one file per
    expert-parallel rank with that rank's stacked expert tensors (written by EDP rank 0, so every
    expert is saved exactly once). Collective."""
    model = engine.module
    marker(model)  # fails early on a model that was never marked
    experts = expert_params(model)
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

    write_expert_slices(engine.module, os.path.join(save_dir, tag), EXPERTS,
                        {n: p.detach() for n, p in experts.items()})
    ds_dist.barrier()
    return tag


def write_expert_slices(model: nn.Module, tag_dir: str, prefix: str, tensors: dict[str, torch.Tensor]) -> None:
    """Write this EP rank's stacked expert tensors (expert dim first) to
    `<tag_dir>/<prefix>_ep<r>_of_<ep>.pt`, from expert-data-parallel rank 0 only, so every expert is
    written exactly once. Used for the expert weights and for their optimizer moments."""
    found = marker(model)
    g = ensure_expert_groups(found.ep_size)
    if g.edp_rank != 0:
        return
    e_local = found.experts_per_rank
    for n, t in tensors.items():
        if t.shape[0] != e_local:
            raise ValueError(f"{n}: expert dim {t.shape[0]} != experts per rank {e_local}")
    payload = {
        "num_experts": found.num_experts,
        "ep_size": found.ep_size,
        "ep_rank": g.ep_rank,
        "expert_start": g.ep_rank * e_local,
        "num_local_experts": e_local,
        "params": {n: t.cpu().clone() for n, t in tensors.items()},
    }
    path = os.path.join(tag_dir, expert_file_name(prefix, g.ep_rank, found.ep_size))
    torch.save(payload, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_expert_state(ckpt_dir: str, names: Iterable[str], expert_start: int, num_local: int,
                      prefix: str = EXPERTS) -> dict:
    """Assemble stacked tensors for global experts [expert_start, expert_start+num_local) from the
    per-EP-rank files of a checkpoint, whatever EP size it was saved with."""
    files = sorted(glob.glob(os.path.join(ckpt_dir, f"{prefix}_ep*_of_*.pt")))
    if not files:
        raise FileNotFoundError(f"no expert files in {ckpt_dir}")
    pieces = {n: {} for n in names}
    for f in files:
        m = EXPERT_FILE_RE.search(f)
        payload = safe_load(f, map_location="cpu")
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
    its fp32 partitions or `load_module_only` refreshes the fp32 master weights. Every file is loaded
    weights-only."""
    if "custom_load_fn" in kwargs:
        raise ValueError("custom_load_fn is used by this helper")
    model = engine.module
    found = marker(model)
    experts = expert_params(model)
    if tag is None:
        with open(os.path.join(load_dir, "latest")) as f:
            tag = f.read().strip()
    g = ensure_expert_groups(found.ep_size)
    e_local = found.experts_per_rank
    strict = kwargs.get("load_module_strict", True)

    def custom_load_fn(src, dst):
        state = dict(src)
        stray = [n for n in experts if n in state]
        if stray:  # a checkpoint written by plain engine.save_checkpoint: DP-rank-0's experts only
            raise RuntimeError(f"DeepSpeed model file holds expert tensors {stray[:3]}...; it was not "
                               "saved with parallel.deepspeed.expert_files.save_checkpoint")
        state.update(load_expert_state(os.path.join(load_dir, str(tag)), list(experts), g.ep_rank * e_local,
                                       e_local))
        dst.load_state_dict(state, strict=strict)

    use_safe_loads(engine)
    return engine.load_checkpoint(load_dir, tag=tag, custom_load_fn=custom_load_fn, **kwargs)
