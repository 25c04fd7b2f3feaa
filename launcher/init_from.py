"""`model.init_from`: a run that starts from another run's weights, a dense run's upcycled into its MoE layers.

The trainer calls `apply_init_from` on the whole model before parallelizing it (experts are whole then); every
rank reads the source and computes the same weights (the noise comes from train.seed). A run that resumes skips it:
its own checkpoint restores every weight, and the source may be gone by then.
"""

from __future__ import annotations

from pathlib import Path

import torch

from competesmoe.common.errors import UserError
from competesmoe.launcher.checkpoint.layout import CHECKPOINTS, MODEL_FILE
from competesmoe.launcher.checkpoint.manager import agree
from competesmoe.launcher.checkpoint.reading import model_state, open_checkpoint
from competesmoe.launcher.checkpoint.verify import find_resumable
from competesmoe.launcher.config import Config
from competesmoe.moe.model import TransformerLM
from competesmoe.moe.upcycle import upcycle
from competesmoe.parallel.deepspeed.safe_load import safe_load


def apply_init_from(cfg: Config, model: TransformerLM, tokenizer: dict, rank: int) -> dict | None:
    """Load model.init_from's weights into `model` (upcycled when it is a dense run) unless this run will resume
    from a checkpoint of its own. Returns the source run's sampler state when model.init_from_data is 'continue'
    (for the trainer's sampler), else None."""
    source = cfg.model.init_from
    if source is None or _will_resume(cfg, rank):
        return None
    try:
        saved = open_checkpoint(source)
    except UserError as err:
        raise UserError(f"model.init_from: {err}") from None
    if saved.tokenizer != tokenizer:
        raise UserError(f"model.init_from: {saved.path} was trained with tokenizer {saved.tokenizer} but this run's "
                        f"data uses {tokenizer}; use the same data.tokenizer and data.path as that run")
    noise = torch.Generator().manual_seed(cfg.train.seed)
    try:
        model.load_state_dict(upcycle(model_state(saved), model, cfg.moe.upcycle_noise, noise))
    except UserError as err:
        raise UserError(f"model.init_from {saved.path}: {err}") from None
    if rank == 0:
        moe_layers = len(model.moe_layers)
        how = f"upcycled into {moe_layers} MoE layers (noise {cfg.moe.upcycle_noise:g})" if moe_layers else "copied"
        print(f"initialised from {saved.path}: {how}", flush=True)
    return _sampler_state(saved.path) if cfg.model.init_from_data == "continue" else None


def _will_resume(cfg: Config, rank: int) -> bool:
    """Whether the checkpoint manager will resume this run (resume=auto finds a checkpoint that verifies)."""
    if cfg.resume == "none":
        return False
    if cfg.resume != "auto":
        return True
    return agree(find_resumable(Path(cfg.output_dir) / CHECKPOINTS) is not None if rank == 0 else None)


def _sampler_state(tag_dir: Path) -> dict:
    """The training sampler's position saved in a checkpoint (inside the trainer's entry of the model file)."""
    if tag_dir.is_file():
        raise UserError(f"model.init_from_data: continue needs a checkpoint (it holds the data position), not the "
                        f"exported {tag_dir}; pass the run's output_dir or use init_from_data: restart")
    try:
        return dict(safe_load(tag_dir / MODEL_FILE, map_location="cpu")["trainer"]["sampler"])
    except (KeyError, TypeError):
        raise UserError(f"model.init_from_data: continue: {tag_dir / MODEL_FILE} holds no sampler position; use "
                        f"init_from_data: restart") from None
