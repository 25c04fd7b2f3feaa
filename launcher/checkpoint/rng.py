"""Each rank's random streams (Python, NumPy, torch CPU and its compute device's CUDA stream), saved as tensors, numbers and tuples so
that they load weights-only. Files from before held NumPy's state as an array; they still load, with
NumPy's array reconstruction allowlisted (it builds arrays, nothing else)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from competesmoe.parallel.deepspeed.safe_load import safe_load

_reconstruct = np._core.multiarray._reconstruct if hasattr(np, "_core") else np.core.multiarray._reconstruct
LEGACY_GLOBALS = [(_reconstruct, "numpy._core.multiarray._reconstruct"),
                  (_reconstruct, "numpy.core.multiarray._reconstruct"), np.ndarray, np.dtype,
                  type(np.dtype(np.uint32))]
"""What the NumPy state in RNG files written before this format needs (pickled under NumPy 2 or 1)."""


def capture(device: torch.device) -> dict:
    """This process's streams; of CUDA, only the compute device's (another process of the job may see other GPUs,
    or the resumed one another set)."""
    numpy = np.random.get_state(legacy=False)
    return {"python": random.getstate(),
            "numpy": {"bit_generator": numpy["bit_generator"],
                      "key": torch.from_numpy(numpy["state"]["key"].astype(np.int64)),
                      "pos": int(numpy["state"]["pos"]), "has_gauss": int(numpy["has_gauss"]),
                      "gauss": float(numpy["gauss"])},
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def restore(state: dict, device: torch.device) -> None:
    random.setstate(state["python"])
    np.random.set_state(numpy_state(state["numpy"]))
    torch.set_rng_state(state["torch"])
    cuda = cuda_state(state.get("cuda"), device)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


def cuda_state(saved, device: torch.device) -> torch.Tensor | None:
    """The compute device's saved CUDA stream: the state itself, or from a file of before (one state per visible
    GPU) the entry of this device's index, when there is one."""
    if saved is None or device.type != "cuda":
        return None
    if isinstance(saved, (list, tuple)):
        index = device.index if device.index is not None else torch.cuda.current_device()
        return saved[index] if index < len(saved) else None
    return saved


def numpy_state(saved):
    """What np.random.set_state takes: the saved dict back to NumPy's, or a legacy file's tuple as it is."""
    if isinstance(saved, tuple):
        return saved
    return {"bit_generator": saved["bit_generator"],
            "state": {"key": saved["key"].numpy().astype(np.uint32), "pos": saved["pos"]},
            "has_gauss": saved["has_gauss"], "gauss": saved["gauss"]}


def save(path: Path, device: torch.device) -> None:
    torch.save(capture(device), path)


def load(path: Path) -> dict:
    return safe_load(path, extra_globals=LEGACY_GLOBALS)
