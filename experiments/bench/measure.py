"""What the benchmark's ranks measure with: interleaved timing across ranks, the ranks' agreement,
the peak memory of one step, and the machine they ran on."""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable

import torch
import torch.distributed as dist


def time_variants(variants: dict[str, Callable], plan: dict[str, tuple[int, int]], clock: str) -> dict[str, dict]:
    """Interleaved timing; plan[name] = (warm-up, timed iterations); clock 'wall' or 'cpu' (process
    time). Returns name -> {'step': median over iterations of the slowest rank's time, 'own': median
    of this rank's own times, 'n': iterations}."""
    own = _interleaved_times(variants, plan, time.process_time if clock == "cpu" else time.perf_counter)
    out = {}
    for name, times in own.items():  # the same order and lengths on every rank
        mine = torch.tensor(times, dtype=torch.float64)
        slowest = mine.clone()
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        out[name] = {"step": statistics.median(slowest.tolist()), "own": statistics.median(mine.tolist()),
                     "n": len(times)}
    return out


def _interleaved_times(variants: dict[str, Callable], plan: dict[str, tuple[int, int]], clock) -> dict[str, list]:
    """Round-robin over the variants, a barrier before and after each call: this rank's timed iterations."""
    names = list(variants)
    own = {n: [] for n in names}
    for it in range(max(sum(plan[n]) for n in names)):
        for name in names:
            warmup, iters = plan[name]
            if it >= warmup + iters:
                continue
            dist.barrier()
            t0 = clock()
            variants[name]()
            elapsed = clock() - t0
            dist.barrier()
            if it >= warmup:
                own[name].append(elapsed)
    return own


def agree(ok: bool) -> bool:
    """True when every rank says ok (keeps all ranks on the same collectives after a failure)."""
    flag = torch.tensor([1 if ok else 0])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def peak_step_bytes(step: Callable) -> int | None:
    """Peak total of live tensors allocated during `step()` (torch MemTracker, dispatch level)."""
    try:
        from torch.distributed._tools.mem_tracker import MemTracker
    except ImportError:  # pragma: no cover - private torch API
        return None
    tracker = MemTracker()
    with tracker:
        step()
    snapshot = tracker.get_tracker_snapshot("peak")
    return int(sum(dev.get("Total", 0) for dev in snapshot.values()))


def first_error_line(exc: Exception) -> str:
    """An exception as one short line for the report."""
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:300]


def machine() -> dict:
    """The cores, threads and library versions this rank runs with."""
    import deepspeed

    return {
        "cpus": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": _cpu_model(),
        "torch_threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "python": platform.python_version(),
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown cpu"
