"""Every collective of a training job, each told the device it runs on and checking it.

NCCL takes CUDA tensors only; gloo takes tensors from any device, so a CPU job hides the CPU tensor that would
stop a GPU job at its first collective. Each function here takes the compute device, refuses a tensor from
another device (naming both), and refuses a device the group's backend cannot serve (a CPU tensor on an NCCL
group). Without an initialised process group (a world of one) they return their input unchanged.

The token transport's collectives (`all_to_all`, `all_gather`, `reduce_scatter`) are torch's functional
collectives: they return new tensors, which selective activation checkpointing can keep (`SAVED_OPS`), so a
recomputed block never re-enters one (parallel/parallelize.py).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

_SERVES = {"nccl": {"cuda"}, "gloo": {"cpu", "cuda"}, "mpi": {"cpu", "cuda"}}
"""Device types each backend takes tensors from."""

SAVED_OPS = (torch.ops._c10d_functional.all_to_all_single.default,
             torch.ops._c10d_functional.all_gather_into_tensor.default,
             torch.ops._c10d_functional.reduce_scatter_tensor.default,
             torch.ops._c10d_functional.wait_tensor.default)
"""The ops of this module's functional collectives (what a recomputation must take from forward, not rerun)."""


class WrongDevice(RuntimeError):
    """A tensor handed to a collective from a device other than the compute device, or a device the backend
    does not serve."""


def _same_device(got: torch.device, want: torch.device) -> bool:
    return got.type == want.type and (want.index is None or got.index in (None, want.index))


def _backend_device_types(group) -> set[str] | None:
    """Device types the group's backend serves (None: unknown backend, not checked)."""
    backend = str(dist.get_backend(group))
    if ":" in backend:  # e.g. "cpu:gloo,cuda:nccl"
        return {part.split(":", 1)[0] for part in backend.split(",")}
    return _SERVES.get(backend)


def check_device(device: torch.device, *tensors: torch.Tensor, group=None, what: str = "collective") -> None:
    """Every tensor is on `device`, and the group's backend serves that device."""
    device = torch.device(device)
    for tensor in tensors:
        if not _same_device(tensor.device, device):
            raise WrongDevice(f"{what}: a tensor on {tensor.device} was handed to a collective that runs on {device}")
    served = _backend_device_types(group)
    if served is not None and device.type not in served:
        raise WrongDevice(f"{what}: the {dist.get_backend(group)} backend does not take {device.type} tensors")


def active(group=None) -> bool:
    """A collective over `group` would talk to other ranks."""
    return dist.is_initialized() and dist.get_world_size(group) > 1


# ---------------------------------------------------------------------------------------------
# In place, for the trainer's figures and agreements (outside any autograd graph).

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def all_reduce_(tensor: torch.Tensor, device: torch.device, op: str = "sum", group=None) -> torch.Tensor:
    """Reduce `tensor` over the group in place (op: sum | max | min); returns it."""
    if not dist.is_initialized():
        return tensor
    check_device(device, tensor, group=group, what=f"all_reduce({op})")
    dist.all_reduce(tensor, op=_OPS[op], group=group)
    return tensor


def any_rank(flag: bool | torch.Tensor, device: torch.device, group=None) -> bool:
    """True on every rank when `flag` (a bool, or a one-element tensor on `device`) is true on any: one all-reduce
    of one value, one host copy."""
    value = (flag.reshape(1).float() if isinstance(flag, torch.Tensor)
             else torch.full((1,), float(flag), device=device))
    return bool(all_reduce_(value, device, "max", group).item())


def broadcast_object(value: Any, device: torch.device, src: int = 0, group=None) -> Any:
    """Rank `src`'s picklable value on every rank (the pickle travels as a tensor on `device`)."""
    if not active(group):
        return value
    check_device(device, group=group, what="broadcast_object")
    box = [value]
    dist.broadcast_object_list(box, src=src, group=group, device=torch.device(device))
    return box[0]


def barrier(device: torch.device, group=None) -> None:
    """Every rank of the group got here (NCCL: on `device`, not on a device it would have to guess)."""
    if not dist.is_initialized():
        return
    check_device(device, group=group, what="barrier")
    device = torch.device(device)
    if device.type == "cuda" and "nccl" in str(dist.get_backend(group)):
        dist.barrier(group=group, device_ids=[device.index if device.index is not None else
                                              torch.cuda.current_device()])
    else:
        dist.barrier(group=group)


# ---------------------------------------------------------------------------------------------
# Functional (they return new tensors), for the token transport. The device is the tensor's own: the check is
# that the group's backend serves it.

# Newer torch renamed these two (the old names still work there, with a FutureWarning); older torch has only the old.
_all_gather_single = getattr(funcol, "all_gather_single", funcol.all_gather_tensor)
_reduce_scatter_single = getattr(funcol, "reduce_scatter_single", funcol.reduce_scatter_tensor)


def _group(group):
    return dist.group.WORLD if group is None else group


def all_to_all(x: torch.Tensor, out_splits: list[int] | None, in_splits: list[int] | None, group,
               device: torch.device) -> torch.Tensor:
    """Rows of x split by `in_splits` go to the group's ranks in order; `out_splits` rows arrive from each
    (None: even splits)."""
    check_device(device, x, group=group, what="all_to_all")
    return funcol.wait_tensor(funcol.all_to_all_single(x.contiguous(), out_splits, in_splits, _group(group)))


def all_gather(x: torch.Tensor, group, device: torch.device) -> torch.Tensor:
    """The ranks' equally sized x, concatenated along dim 0 in rank order."""
    check_device(device, x, group=group, what="all_gather")
    return funcol.wait_tensor(_all_gather_single(x.contiguous(), 0, _group(group)))


def reduce_scatter(x: torch.Tensor, group, device: torch.device) -> torch.Tensor:
    """Sum x over the ranks and keep this rank's equal share of dim 0."""
    check_device(device, x, group=group, what="reduce_scatter")
    return funcol.wait_tensor(_reduce_scatter_single(x.contiguous(), "sum", 0, _group(group)))
