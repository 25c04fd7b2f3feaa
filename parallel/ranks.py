"""Run a function on N real gloo ranks (spawned processes on this host), for tests and benchmarks.

    from competesmoe.parallel.ranks import run_on_ranks

    def _body(rank, world_size, scale):          # top level of a module: it is pickled
        ...                                      # torch.distributed is initialised (gloo)
        return {"loss": 1.0}                     # anything picklable, per rank

    results = run_on_ranks(_body, world_size=2, args=(0.5,), timeout=60)   # [result of rank 0, ...]

A rank's exception is raised here as `RankFailed` carrying its traceback; ranks that outlive `timeout`
(a hang in a collective) are killed and raised as `RankTimeout`, after they have printed their stacks
(faulthandler) to stderr. Training jobs are launched by `competesmoe launch`, not by this.
"""

from __future__ import annotations

import contextlib
import datetime
import faulthandler
import os
import pickle
import tempfile
import time
import traceback

from competesmoe.common.net import free_port


class RankFailed(RuntimeError):
    """A rank raised (the message holds its traceback) or died."""


class RankTimeout(TimeoutError):
    """The ranks did not finish within the timeout (typically a collective that not every rank entered)."""


def run_on_ranks(fn, world_size: int, args: tuple = (), timeout: float = 60.0, threads: int = 1,
                 env: dict[str, str] | None = None) -> list:
    """Run fn(rank, world_size, *args) on `world_size` spawned gloo ranks; return their results in rank order.

    Each rank gets `threads` intra-op threads (OMP_NUM_THREADS too: oversubscribed ranks run 2-3x slower)
    and inherits `env` on top of this process's environment.
    """
    import torch.multiprocessing as mp

    port = free_port()
    with tempfile.TemporaryDirectory(prefix="ranks-") as out_dir:
        deadline_wall = time.time() + timeout
        with _environment({"OMP_NUM_THREADS": str(threads), **(env or {})}):  # spawned children copy it
            context = mp.start_processes(_child, args=(fn, world_size, port, args, out_dir, timeout, deadline_wall,
                                                       threads),
                                         nprocs=world_size, join=False, start_method="spawn")
        _join(context, world_size, timeout)
        results = []
        for rank in range(world_size):
            with open(os.path.join(out_dir, f"rank{rank}.pkl"), "rb") as fh:
                results.append(pickle.load(fh))
        return results


def _join(context, world_size: int, timeout: float) -> None:
    import torch.multiprocessing as mp

    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=max(0.0, min(1.0, deadline - time.monotonic())), grace_period=2.0):
            if time.monotonic() >= deadline:
                alive = [r for r, p in enumerate(context.processes) if p.is_alive()]
                raise RankTimeout(f"ranks {alive} of {world_size} still running after {timeout:.0f} s "
                                  f"(a collective that not every rank entered?); their stacks are on stderr")
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as err:
        raise RankFailed(str(err).strip()) from None
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join()


@contextlib.contextmanager
def _environment(values: dict[str, str]):
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _child(rank, fn, world_size, port, args, out_dir, timeout, deadline, threads):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    # Shortly before the parent gives up, print where every thread of this rank is stuck.
    faulthandler.dump_traceback_later(max(deadline - time.time() - 1.0, 0.5), exit=False)
    try:
        # The ranks' own collective timeout is later than the parent's: a hang is reported there, as such.
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world_size, timeout=datetime.timedelta(seconds=timeout + 60))
        result = fn(rank, world_size, *args)
        with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as fh:
            pickle.dump(result, fh)
    except Exception:
        # torch.multiprocessing forwards this traceback to the parent; add which rank it was.
        raise RuntimeError(f"rank {rank} of {world_size} failed:\n{traceback.format_exc()}") from None
    finally:
        faulthandler.cancel_dump_traceback_later()
        if dist.is_initialized():
            dist.destroy_process_group()
