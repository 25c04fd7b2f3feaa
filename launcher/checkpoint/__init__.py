"""Checkpoints, in one place: save, find, verify and load for training (`CheckpointManager`), and the
consolidated model for eval, export and finetune (`load_model`).

- `layout`: the files of a checkpoint folder by name, and `Checkpoint` (a verified folder or exported model
  with its run state, the one record of its config, layout and tokenizer).
- `verify`: the manifest; the checks a checkpoint passes before anything of it is used, and `find_resumable`.
- `manager`: crash-safe saving (staging, manifest, atomic publish, `latest` last), the resume point the ranks
  agree on, loading into a DeepSpeed engine (resharding to another world or EP size).
- `reading`: a checkpoint or an exported .safetensors model as one model on one process.
- `rng`: the per-rank random streams.

Nothing in a checkpoint runs: every `.pt` is loaded weights-only (`parallel.deepspeed.safe_load`).
"""

from competesmoe.launcher.checkpoint.layout import CHECKPOINTS, Checkpoint, CheckpointError
from competesmoe.launcher.checkpoint.manager import CheckpointManager, TrainingState
from competesmoe.launcher.checkpoint.reading import load_model, model_state, open_checkpoint, prepared_data

__all__ = ["CHECKPOINTS", "Checkpoint", "CheckpointError", "CheckpointManager", "TrainingState", "load_model",
           "model_state", "open_checkpoint", "prepared_data"]
