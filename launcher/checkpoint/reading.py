"""The read side, for eval, generate, export and finetune: a checkpoint of any layout, or an exported .safetensors
model, as one consolidated model in this process. A checkpoint is verified first (manifest, run state,
weights-only loads); run_state.json is the one source of its config and tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from competesmoe.common.errors import UserError
from competesmoe.data.meta import read_meta
from competesmoe.data.tokenizer import ByteTokenizer, load_tokenizer
from competesmoe.launcher.checkpoint.layout import CHECKPOINTS, MANIFEST, MODEL_FILE, Checkpoint, CheckpointError
from competesmoe.launcher.checkpoint.verify import find_resumable, parse_run_state, verify
from competesmoe.moe.model import TransformerLM
from competesmoe.parallel.deepspeed.expert_files import EXPERTS, expert_file_name, load_expert_state
from competesmoe.parallel.deepspeed.safe_load import safe_load

SAFETENSORS_RUN_STATE = "competesmoe_run_state"
"""The exported file's metadata key holding the checkpoint's run_state.json."""


def open_checkpoint(path: str | Path) -> Checkpoint:
    """What a user named, verified: an exported .safetensors file, one checkpoint folder, or a run's
    output_dir or checkpoints/ folder (its newest checkpoint that verifies; newer ones are named and skipped)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist; pass a run's output_dir, one of its checkpoint folders "
                        f"or an exported .safetensors file")
    if path.is_file():
        return read_safetensors_header(path)
    if (path / MANIFEST).exists() or (path / MODEL_FILE).exists():
        return verify(path)
    root = path / CHECKPOINTS if (path / CHECKPOINTS).is_dir() else path
    found = find_resumable(root)
    if found is None:
        raise UserError(f"{path} holds no checkpoint that verifies ({root}/step*/); train the run to its first "
                        f"checkpoint, or pass a checkpoint folder or exported model")
    return found


def model_state(saved: Checkpoint) -> dict[str, torch.Tensor]:
    """Every weight of the model, all experts gathered, whatever layout it was saved with."""
    if saved.path.is_file():
        return read_safetensors(saved)
    model_file = saved.path / MODEL_FILE
    loaded = safe_load(model_file, map_location="cpu")
    if not isinstance(loaded, dict) or not isinstance(loaded.get("module"), dict):
        raise CheckpointError(f"checkpoint file {model_file} holds no model weights ('module')")
    state = dict(loaded["module"])
    if saved.has_experts:
        first = saved.path / expert_file_name(EXPERTS, 0, saved.ep_size)
        try:
            names = list(safe_load(first, map_location="cpu")["params"])
            state.update(load_expert_state(str(saved.path), names, 0, saved.cfg.moe.num_experts))
        except (KeyError, TypeError, RuntimeError) as err:
            raise CheckpointError(f"the expert files of {saved.path} do not hold every expert ({err})") from None
    return state


def load_model(path: str | Path) -> tuple[Checkpoint, TransformerLM]:
    """(the verified checkpoint, its model with every expert) on the CPU, in eval mode."""
    saved = open_checkpoint(path)
    model = TransformerLM(saved.cfg.model, saved.cfg.moe, vocab_size=saved.tokenizer["vocab_size"])
    try:
        missing, unexpected = model.load_state_dict(model_state(saved), strict=False)
    except RuntimeError as err:  # a tensor of another shape
        missing, unexpected = [str(err).splitlines()[-1].strip()[:160]], []
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {saved.path} does not fit the model its run state describes "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return saved, model.eval()


def prepared_data(saved: Checkpoint) -> Path:
    """The run's prepared data (its tokenizer and splits): data.prepared_dir, else `data/` in the run's folder
    (where the checkpoint or exported file is now, then where the run wrote it). It must hold the tokenizer
    the checkpoint was trained with."""
    prepared = saved.cfg.data.prepared_dir
    candidates = [Path(prepared)] if prepared else list(dict.fromkeys([saved.run_dir / "data",
                                                                        Path(saved.cfg.output_dir) / "data"]))
    found = {d: meta["tokenizer"] for d in candidates if (meta := read_meta(d)) is not None}
    for data_dir, tokenizer in found.items():
        if tokenizer == saved.tokenizer:
            return data_dir
    if found:
        data_dir, tokenizer = next(iter(found.items()))
        raise UserError(f"the prepared data {data_dir} uses tokenizer {tokenizer} but {saved.path} was trained "
                        f"with {saved.tokenizer}; prepare the run's data again (competesmoe prepare CONFIG)")
    raise UserError(f"the run's prepared data (its tokenizer) is in none of {', '.join(map(str, candidates))}; "
                    f"prepare it again with `competesmoe prepare` and the run's config")


def run_tokenizer(saved: Checkpoint):
    """The tokenizer the checkpoint was trained with: a byte tokenizer from its run state alone, a SentencePiece
    one from the run's prepared data (its model file, checked against the run state)."""
    if saved.tokenizer["kind"] == "byte":
        return ByteTokenizer(with_eod="eod" in saved.tokenizer)
    return load_tokenizer(prepared_data(saved))


def write_safetensors(saved: Checkpoint, state: dict[str, torch.Tensor], out: Path) -> None:
    """One file: every tensor (a tied head once, as the embedding) and the run state as metadata."""
    from safetensors.torch import save_file

    if saved.cfg.model.tie_embeddings:
        state = {k: v for k, v in state.items() if k != "head.weight"}
    save_file({k: v.contiguous() for k, v in state.items()}, str(out),
              metadata={SAFETENSORS_RUN_STATE: json.dumps(saved.run_state)})


def read_safetensors_header(path: Path) -> Checkpoint:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception:  # noqa: BLE001 - safetensors reports a foreign file in several ways
        raise UserError(f"{path} is neither a checkpoint folder nor a .safetensors model written by "
                        f"`competesmoe export`") from None
    if SAFETENSORS_RUN_STATE not in metadata:
        raise CheckpointError(f"{path} has no {SAFETENSORS_RUN_STATE} metadata; it was not written by "
                              f"`competesmoe export`")
    return Checkpoint(path, *parse_run_state(metadata[SAFETENSORS_RUN_STATE], path))


def read_safetensors(saved: Checkpoint) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state = load_file(str(saved.path))
    if saved.cfg.model.tie_embeddings:
        state["head.weight"] = state["embed.weight"]
    return state
