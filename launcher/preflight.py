"""What a run needs against what the machine has, checked before anything is built (`competesmoe train`).

Memory: the bytes one rank holds at its peak (weights, gradients, Adam states and the activations of one
micro-batch with `moe.competition.cap` layers competing) come from parallel/cost.py, the model `competesmoe plan`
shows and tests/test_cost.py checks against the code's own allocations; they are counted on a model built on the
meta device (no memory). A GPU rank compares them with its device's free memory, CPU ranks (all of a host's ranks
together) with the host's available memory, cgroup limits included. Refused only when the estimate alone exceeds
what is there: the run would surely fail, after allocating gigabytes, with a traceback.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from competesmoe.common.errors import UserError
from competesmoe.launcher.config import Config

GiB = 2**30
STALE_BUILD_LOCK_S = 600
"""A torch extension build's lock older than this was left by a killed build (a build takes a minute or two)."""


def check_threads(cfg: Config) -> None:
    cpus = os.cpu_count() or 1
    if cfg.parallel.threads_per_rank > cpus:
        raise UserError(f"parallel.threads_per_rank ({cfg.parallel.threads_per_rank}) is more than the {cpus} CPUs "
                        f"of this host; set it to at most {cpus}")


def check_memory(cfg: Config, device: torch.device, world_size: int, local_ranks: int) -> None:
    """UserError with the figures when one rank's peak (times the ranks sharing this host's memory, on CPU) is more
    than the device or host has available."""
    from competesmoe.launcher import plan
    from competesmoe.parallel import cost

    vocab = plan.vocab_size(cfg, None)
    w = plan.workload(cfg, vocab)
    layout = cost.Layout(world_size, cfg.parallel.expert_parallel_size, cfg.train.zero_stage, local_ranks)
    mem = cost.memory(w, layout, cost.param_counts(cfg.model, cfg.moe, vocab))
    competing = plan.peak_competing_layers(cfg, w.moe_layers)
    need = mem.peak(competing)
    sharing = 1 if device.type == "cuda" else local_ranks
    have, where = available_memory(device)
    if need * sharing <= have:
        return
    ranks = f" x {sharing} ranks on this host" if sharing > 1 else ""
    raise UserError(
        f"out of memory before the first step: a rank needs about {need / GiB:.1f} GiB{ranks} (weights "
        f"{mem.weights / GiB:.2f}, gradients {mem.gradients / GiB:.2f}, Adam {mem.optimizer / GiB:.2f}, activations "
        f"{mem.activations.peak(competing) / GiB:.2f} GiB for train.micro_batch_size {cfg.train.micro_batch_size} x "
        f"model.seq_len {cfg.model.seq_len} with {competing} layer(s) competing; parallel/cost.py) but {where} has "
        f"{have / GiB:.1f} GiB available; shrink model.*/moe.* sizes, train.micro_batch_size or model.seq_len, set "
        f"parallel.activation_checkpointing, or spread the experts over more ranks (`competesmoe plan` compares "
        f"layouts)")


def available_memory(device: torch.device) -> tuple[int, str]:
    """(bytes available, what they belong to): the GPU's free memory, or the host's, within its cgroup's limit."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free, f"GPU {device.index} ({torch.cuda.get_device_name(device)})"
    import psutil

    have = psutil.virtual_memory().available
    limit = _cgroup_available()
    return (min(have, limit) if limit is not None else have), "this host"


def _cgroup_available() -> int | None:
    """What this process's cgroup (v2, else v1) still lets it take, reclaimable page cache counted as free; None
    without a limit."""
    for folder, limit_file, usage_file, cache_key in (
            ("/sys/fs/cgroup", "memory.max", "memory.current", "inactive_file"),
            ("/sys/fs/cgroup/memory", "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")):
        try:
            limit = Path(folder, limit_file).read_text().strip()
            usage = int(Path(folder, usage_file).read_text())
            stat = dict(line.split() for line in Path(folder, "memory.stat").read_text().splitlines())
        except (OSError, ValueError):
            continue
        if limit == "max" or int(limit) >= 1 << 60:  # v1 writes "no limit" as a huge number
            return None
        return int(limit) - usage + int(stat.get(cache_key, 0))
    return None


def check_build_locks() -> None:
    """torch's JIT extension builds (DeepSpeed builds its CPU communication op when a run starts) take turns through
    a lock file in the extensions folder; a build killed midway leaves it behind, and every later start then waits
    for it forever, saying nothing. A lock older than any build takes is refused in one line instead."""
    from torch.utils.cpp_extension import _get_build_directory

    root = Path(_get_build_directory("deepspeed_shm_comm", verbose=False)).parent
    for lock in root.glob("*/lock"):
        try:
            age_s = time.time() - lock.stat().st_mtime
        except FileNotFoundError:  # the build that held it just finished
            continue
        if age_s > STALE_BUILD_LOCK_S:
            raise UserError(f"{lock}: a build lock {age_s / 60:.0f} min old, left by a torch extension build that was "
                            f"killed midway (a build takes a minute or two); every start would wait for it forever. "
                            f"If no build is running, remove the file and start again")
