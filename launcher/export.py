"""A checkpoint as one consolidated model: every expert of every layer gathered from the per-EP-rank
files, the dense weights from DeepSpeed's model file, written as a single safetensors file."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from competesmoe.launcher import checkpoint
from competesmoe.launcher.config import config_from_dict
from competesmoe.moe.model import TransformerLM
from competesmoe.parallel.deepspeed_moe import load_expert_state


def consolidated_state(tag_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(run_state, full state dict) of a verified checkpoint, whatever layout it was saved with."""
    run_state = checkpoint.verify(tag_dir)
    module = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    state = {name: tensor.clone() for name, tensor in module.items()}
    expert_files = sorted(tag_dir.glob("experts_ep*_of_*.pt"))
    if expert_files:
        names = list(torch.load(expert_files[0], map_location="cpu", weights_only=True)["params"])
        state.update(load_expert_state(str(tag_dir), names, 0, run_state["config"]["moe"]["num_experts"]))
    return run_state, state


def build_model(run_state: dict, state: dict[str, torch.Tensor]) -> TransformerLM:
    cfg = config_from_dict(run_state["config"])
    model = TransformerLM(cfg.model, cfg.moe, vocab_size=run_state["tokenizer"]["vocab_size"])
    model.load_state_dict(state, strict=True)
    return model


def export_safetensors(tag_dir: Path, out: Path) -> Path:
    from safetensors.torch import save_file

    run_state, state = consolidated_state(tag_dir)
    if run_state["config"]["model"]["tie_embeddings"]:
        state.pop("head.weight", None)  # the same tensor as embed.weight; safetensors stores it once
    metadata = {"competesmoe_run_state": json.dumps(run_state)}
    save_file({k: v.contiguous() for k, v in state.items()}, str(out), metadata=metadata)
    return out


def load_safetensors(path: Path) -> TransformerLM:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as handle:
        run_state = json.loads(handle.metadata()["competesmoe_run_state"])
    state = load_file(str(path))
    if run_state["config"]["model"]["tie_embeddings"]:
        state["head.weight"] = state["embed.weight"]
    return build_model(run_state, state)
