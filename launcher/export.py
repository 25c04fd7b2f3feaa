"""`competesmoe export`: a checkpoint of any layout (or an exported model) as one consolidated safetensors
file: every expert of every layer gathered from the per-EP-rank files, the dense weights from DeepSpeed's
model file, and the checkpoint's run state as metadata. The checkpoint is verified first."""

from __future__ import annotations

from pathlib import Path

from competesmoe.launcher.checkpoint import load_model, model_state, open_checkpoint
from competesmoe.launcher.checkpoint.reading import write_safetensors
from competesmoe.moe.model import TransformerLM


def export_safetensors(checkpoint: Path, out: Path) -> Path:
    saved = open_checkpoint(checkpoint)
    write_safetensors(saved, model_state(saved), out)
    return out


def load_safetensors(path: Path) -> TransformerLM:
    """The model of an exported file (or of any checkpoint), on the CPU in eval mode."""
    return load_model(path)[1]
