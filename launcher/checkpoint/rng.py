"""Each rank's random streams (Python, NumPy, torch CPU and CUDA), saved as tensors, numbers and tuples so
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


def capture() -> dict:
    numpy = np.random.get_state(legacy=False)
    return {"python": random.getstate(),
            "numpy": {"bit_generator": numpy["bit_generator"],
                      "key": torch.from_numpy(numpy["state"]["key"].astype(np.int64)),
                      "pos": int(numpy["state"]["pos"]), "has_gauss": int(numpy["has_gauss"]),
                      "gauss": float(numpy["gauss"])},
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def restore(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(numpy_state(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def numpy_state(saved):
    """What np.random.set_state takes: the saved dict back to NumPy's, or a legacy file's tuple as it is."""
    if isinstance(saved, tuple):
        return saved
    return {"bit_generator": saved["bit_generator"],
            "state": {"key": saved["key"].numpy().astype(np.uint32), "pos": saved["pos"]},
            "has_gauss": saved["has_gauss"], "gauss": saved["gauss"]}


def save(path: Path) -> None:
    torch.save(capture(), path)


def load(path: Path) -> dict:
    return safe_load(path, extra_globals=LEGACY_GLOBALS)
