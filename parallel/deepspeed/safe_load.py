"""No code from a checkpoint ever runs: every `.pt` is unpickled with `weights_only=True`.

torch's weights-only unpickler builds tensors, containers and numbers, and refuses any other Python
object unless it is allowlisted. DeepSpeed 0.19.8's ZeRO 1/2 optimizer files (`*zero_pp_rank_*`) hold
three of its own inert classes (a loss scaler, an enum and a dataclass of two ints); they are the only
allowlisted ones. DeepSpeed's engine unpickles its files itself, with `weights_only=False`: `use_safe_loads`
gives it a checkpoint engine of ours whose `load` is `safe_load`.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch
from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

from competesmoe.common.errors import UserError

DEEPSPEED_GLOBALS = [LossScaler, ZeroStageEnum, fragment_address]
"""What DeepSpeed's own optimizer files hold besides tensors (found by loading each kind it writes)."""


class UnsafeCheckpointFile(UserError):
    """A checkpoint file that would run code (or build objects no checkpoint of ours holds) when loaded."""


def safe_load(path: str | Path, map_location=None, *, extra_globals=(), mmap: bool = False):
    """`torch.load(weights_only=True)` with DeepSpeed's inert classes (and `extra_globals`) allowed; a file
    holding anything else raises UnsafeCheckpointFile naming the file and the object, before it is built."""
    try:
        with torch.serialization.safe_globals([*DEEPSPEED_GLOBALS, *extra_globals]):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointFile(f"checkpoint file {path} holds {forbidden_object(err)}, which loading would "
                                   f"run as code; refusing to load it (a checkpoint holds only tensors and "
                                   f"numbers): use a checkpoint written by `competesmoe train`") from None


def forbidden_object(err: pickle.UnpicklingError) -> str:
    """What torch's weights-only unpickler refused, from its (multi-line) message."""
    found = re.search(r"GLOBAL (\S+)|but got <class '([^']+)'>", str(err))
    return f"the Python object {found.group(1) or found.group(2)}" if found else "Python objects other than tensors"


class SafeTorchCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine, but loads are `safe_load` (saves are unchanged)."""

    def load(self, path: str, map_location=None):
        return safe_load(path, map_location)


def use_safe_loads(engine) -> None:
    """Make every file DeepSpeed's engine loads (model, optimizer, ZeRO partitions) go through `safe_load`."""
    current = engine.checkpoint_engine
    if isinstance(current, SafeTorchCheckpointEngine):
        return
    if type(current) is not TorchCheckpointEngine:
        raise ValueError(f"DeepSpeed checkpoint engine {type(current).__name__} is not supported: only the torch "
                         f"one, whose loads we make weights-only (leave DeepSpeed's `checkpoint` config unset)")
    safe = SafeTorchCheckpointEngine.__new__(SafeTorchCheckpointEngine)
    safe.__dict__.update(vars(current))  # the same settings (serialization format), the safe `load`
    engine.checkpoint_engine = safe
