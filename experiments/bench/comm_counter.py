"""The bytes a rank sends to the other ranks, per c10d collective, seen at dispatch level.

A TorchDispatchMode sees every c10d collective of the ranks' steps however the caller reached it
(torch.distributed, an early-bound alias, deepspeed.comm, torch's functional collectives, which our token
transport uses: they are named here by their c10d twins). The self chunk never crosses the wire;
all_reduce is counted as a ring: 2 (P-1)/P of the tensor.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode


class CommCounter(TorchDispatchMode):
    """Records (collective, bytes sent to other ranks) for every c10d op but barrier while active, and the size of
    the group each ran in (`group_sizes`, in the same order)."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, int]] = []
        self.group_sizes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[-1]
        if func.namespace == "c10d" and name != "barrier":
            self.calls.append((name, sent_bytes(name, args)))
            self.group_sizes.append(_group_size(args))
        elif func.namespace == "_c10d_functional" and name in _FUNCTIONAL:
            twin, pg, sent = _functional_call(name, args)
            self.calls.append((twin, sent))
            self.group_sizes.append(pg.size())
        return func(*args, **kwargs)

    def total(self) -> int:
        return sum(b for _, b in self.calls)

    def summary(self) -> dict[str, tuple[int, int]]:
        """collective -> (calls, bytes)"""
        out: dict[str, tuple[int, int]] = {}
        for name, b in self.calls:
            n, t = out.get(name, (0, 0))
            out[name] = (n + 1, t + b)
        return out


_FUNCTIONAL = {"all_to_all_single": "alltoall_base_", "all_gather_into_tensor": "_allgather_base_",
               "reduce_scatter_tensor": "_reduce_scatter_base_", "all_reduce": "allreduce_"}
"""torch's functional collectives (their last argument is the group's name) and their c10d twins."""


def _functional_call(name: str, args) -> tuple[str, dist.ProcessGroup, int]:
    """A functional collective's c10d twin, its group, and the bytes this rank sends to the other ranks."""
    from torch.distributed.distributed_c10d import _resolve_process_group

    pg = _resolve_process_group(args[-1])
    size, rank, x = pg.size(), pg.rank(), args[0]
    if size <= 1:
        return _FUNCTIONAL[name], pg, 0
    sent = {"all_to_all_single": lambda: _alltoall_base_bytes(x, list(args[2] or []), size, rank),
            "all_gather_into_tensor": lambda: _nbytes(x) * (size - 1),
            "reduce_scatter_tensor": lambda: _nbytes(x) - _nbytes(x) // size,
            "all_reduce": lambda: 2 * (size - 1) * _nbytes(x) // size}[name]()
    return _FUNCTIONAL[name], pg, sent


def _process_group(args) -> dist.ProcessGroup | None:
    pg = next((a for a in args if isinstance(a, torch.ScriptObject)), None)
    return None if pg is None else dist.ProcessGroup.unbox(pg)


def _group_size(args) -> int:
    pg = _process_group(args)
    return 0 if pg is None else pg.size()


def sent_bytes(name: str, args) -> int:
    """Bytes this rank sends to the other ranks of the group in the c10d op `name` called with `args`."""
    pg = _process_group(args)
    if pg is None:
        return 0
    size, rank = pg.size(), pg.rank()
    if size <= 1:
        return 0
    if name == "alltoall_base_":
        return _alltoall_base_bytes(args[1], list(args[4]), size, rank)
    if name == "alltoall_":
        return sum(_nbytes(t) for i, t in enumerate(args[1]) if i != rank)
    if name in ("_allgather_base_", "allgather_into_tensor_coalesced_", "allgather_"):
        return sum(_nbytes(t) for t in _flat([args[1]])) * (size - 1)
    if name in ("_reduce_scatter_base_", "reduce_scatter_tensor_coalesced_"):
        return sum(_nbytes(t) for t in _flat([args[1]])) - sum(_nbytes(t) for t in _flat([args[0]]))
    if name == "allreduce_":
        return 2 * (size - 1) * sum(_nbytes(t) for t in args[0]) // size
    if name == "broadcast_":
        return sum(_nbytes(t) for t in args[0]) * (size - 1) if args[2] == rank else 0
    return 0


def _alltoall_base_bytes(x: torch.Tensor, splits: list[int], size: int, rank: int) -> int:
    """Rows sent to other ranks times the row size; even chunks when no splits are given."""
    if not splits:
        return _nbytes(x) * (size - 1) // size
    row = _nbytes(x) // x.shape[0] if x.dim() and x.shape[0] else 0
    return (sum(splits) - splits[rank]) * row


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _flat(ts):
    for t in ts:
        if isinstance(t, (list, tuple)):
            yield from _flat(t)
        else:
            yield t
