"""The places where a step waits for the device: every device-to-host transfer a GPU would make.

On a GPU each is a full stop of the host until the device catches up (the kernels queued so far must finish). On
the CPU nothing waits, so they are counted by what asks for them, at two levels:
- torch functions (a TorchFunctionMode): `.item()`, `.tolist()`, `.cpu()`, `.numpy()`, `bool/int/float(tensor)`,
  and `.to("cpu")` of a tensor on another device. On a CPU tensor most of these reach no aten op at all, so only
  this level sees them. (`.to(device)` of a CPU tensor is not counted: with a CPU compute device it cannot be told
  from the host-to-device copy of a batch, which does not wait; `.cpu()` is counted wherever it is called.)
- aten ops (a TorchDispatchMode) whose output size or value depends on the data, so the host must read the device:
  `nonzero`, `masked_select`, `unique`, `bincount`, `repeat_interleave` without `output_size`, indexing with a
  boolean mask, `equal`, and `_local_scalar_dense` (what `.item()` and `bool(tensor)` run) when the function level
  did not count it already.
Calls made inside a counted torch function are not counted again. Each record names the nearest caller in this
repository (or "elsewhere"), so a test can say where a transfer comes from.
"""

from __future__ import annotations

import sys
from contextlib import ExitStack
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

_REPO = Path(__file__).resolve().parents[2]
_TORCH = str(Path(torch.__file__).parent)

_HOST_READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy, torch.Tensor.__bool__,
               torch.Tensor.__int__, torch.Tensor.__float__, torch.Tensor.__index__}
"""Tensor methods that hand the host a value or a host copy."""

_DATA_DEPENDENT = {"nonzero", "masked_select", "_unique2", "unique_dim", "unique_consecutive", "bincount", "equal",
                   "_local_scalar_dense", "nonzero_static"}
"""aten ops whose result the host must read from the device."""


class HostSyncCounter:
    """`with HostSyncCounter() as syncs:` ... `syncs.count`, `syncs.where` (one caller per transfer)."""

    def __init__(self):
        self.where: list[str] = []
        self._stack = ExitStack()
        self._in_host_read = 0

    @property
    def count(self) -> int:
        return len(self.where)

    def __enter__(self) -> HostSyncCounter:
        self._stack.enter_context(_FunctionLevel(self))
        self._stack.enter_context(_DispatchLevel(self))
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def record(self, what: str) -> None:
        self.where.append(f"{what} at {_caller()}")


class _FunctionLevel(TorchFunctionMode):
    def __init__(self, counter: HostSyncCounter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _HOST_READS or (func is torch.Tensor.to and _to_host(args, kwargs)):
            self.counter.record(func.__name__)
            self.counter._in_host_read += 1
            try:
                return func(*args, **kwargs)
            finally:
                self.counter._in_host_read -= 1
        return func(*args, **kwargs)


class _DispatchLevel(TorchDispatchMode):
    def __init__(self, counter: HostSyncCounter):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[-1]
        if not self.counter._in_host_read and _waits_for_data(name, func, args, kwargs):
            self.counter.record(name)
        return func(*args, **kwargs)


def _waits_for_data(name: str, func, args, kwargs) -> bool:
    if name in _DATA_DEPENDENT:
        return True
    if func is torch.ops.aten.repeat_interleave.Tensor:  # the output size is the sum of the repeats unless given
        return kwargs.get("output_size") is None
    if name in ("index", "index_put", "index_put_"):  # a boolean mask becomes indices of its true entries
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] or ())
    return False


def _to_host(args, kwargs) -> bool:
    if args[0].device.type == "cpu":
        return False
    target = kwargs.get("device", next((a for a in args[1:] if isinstance(a, (str, torch.device))), None))
    return target is not None and torch.device(target).type == "cpu"


def _caller() -> str:
    """The nearest frame in this repository's source (not torch's, not this file's), as path:line function."""
    frame = sys._getframe(1)
    while frame is not None:
        path = Path(frame.f_code.co_filename)
        if path.is_relative_to(_REPO) and path != Path(__file__) and ".venv" not in path.parts \
                and not frame.f_code.co_filename.startswith(_TORCH):
            return f"{path.relative_to(_REPO)}:{frame.f_lineno} {frame.f_code.co_name}"
        frame = frame.f_back
    return "elsewhere"
