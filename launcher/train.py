"""`competesmoe train`: one process, or one rank of a job started by deepspeed/torchrun.

Parse, build, train, close. The launcher's environment (RANK, WORLD_SIZE, MASTER_ADDR, ...) says
which rank this is; without it the process is a world of one.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from competesmoe.common.errors import UserError, is_peer_failure
from competesmoe.common.net import free_port
from competesmoe.data.meta import read_meta
from competesmoe.launcher.checkpoint import CHECKPOINTS, CheckpointManager, TrainingState
from competesmoe.launcher.config import Config, validate_world
from competesmoe.launcher.metrics import MetricsWriter
from competesmoe.launcher.preflight import check_build_locks, check_memory, check_threads
from competesmoe.launcher.run_dir import RunDir, check_writable
from competesmoe.launcher.trainer import Trainer, deepspeed_config, pick_device
from competesmoe.parallel import collectives
from competesmoe.parallel.groups import build_groups


def init_distributed(cfg: Config, device: torch.device) -> None:
    import deepspeed

    if "WORLD_SIZE" not in os.environ:  # a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    backend = cfg.parallel.backend
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(minutes=10))


PREPARE_HEARTBEAT_S = 20.0


def prepare_data(cfg: Config, run_dir: Path, rank: int) -> Path:
    """Rank 0 makes sure the data is prepared (a data.path corpus is prepared here when needed; a data.inputs
    corpus must have been prepared by `competesmoe prepare`); the other ranks wait as long as that takes."""
    from competesmoe.data.prepare import ensure_prepared

    data_dir = cfg.data.prepared_path(run_dir)
    on_rank0_while_others_wait(lambda: ensure_prepared(cfg.data, data_dir), rank)
    return data_dir


def on_rank0_while_others_wait(work, rank: int) -> None:
    """Rank 0 runs work() while the other ranks wait, with no deadline; rank 0's error is raised on every rank.

    The waiting is a broadcast every PREPARE_HEARTBEAT_S seconds on a gloo group (CPU tensors work under NCCL
    too) whose timeout is ten heartbeats: no collective comes near it, however long the work takes, while a
    rank 0 that died is noticed within it.
    """
    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=10 * PREPARE_HEARTBEAT_S))
    done = torch.zeros(1, device="cpu")  # a gloo group: on the host, whatever the compute device
    failure = [None]
    if rank == 0:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            future = pool.submit(work)
            while not done.item():
                concurrent.futures.wait([future], timeout=PREPARE_HEARTBEAT_S)
                done.fill_(float(future.done()))
                dist.broadcast(done, 0, group=group)
        err = future.exception()
        failure[0] = None if err is None else str(err) if isinstance(err, UserError) else f"rank 0 failed: {err!r}"
    else:
        while not done.item():
            dist.broadcast(done, 0, group=group)
    dist.broadcast_object_list(failure, 0, group=group)
    dist.destroy_process_group(group)
    if rank == 0 and future.exception() is not None:
        raise future.exception()
    if failure[0] is not None:
        raise UserError(failure[0])



def run(cfg: Config) -> None:
    from competesmoe.data.prepare import check_before_start

    device = pick_device(cfg.parallel.device)
    run_dir = Path(cfg.output_dir)
    world_size, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    # Everything that can be checked before the first step is, and what needs no peer comes before any collective,
    # so that every rank fails alike and at once (a run never trains to its end to fail there).
    validate_world(cfg, world_size)
    deepspeed_config(cfg)  # parallel.deepspeed_config merged and validated (a conflict is refused here, not later)
    check_threads(cfg)
    check_build_locks()
    check_writable(run_dir)
    with RunDir(cfg, run_dir) if rank == 0 else contextlib.nullcontext() as claimed:  # one run per output_dir
        check_memory(cfg, device, world_size, local_ranks=int(os.environ.get("LOCAL_WORLD_SIZE",
                                                                              os.environ.get("LOCAL_SIZE", "1"))))
        check_before_start(cfg.data)
        data_dir = cfg.data.prepared_path(run_dir)
        if read_meta(data_dir) is not None:  # prepared before (e.g. by `competesmoe prepare`): checked now
            check_windows_fit(cfg, data_dir, world_size)
        torch.set_num_threads(cfg.parallel.threads_per_rank)
        init_distributed(cfg, device)
        train(cfg, run_dir, device, claimed)


def check_windows_fit(cfg: Config, data_dir: Path, dp_size: int) -> None:
    """A prepared corpus's splits hold what the windows sampler draws from them (the gpt sampler's are checked as
    megatron-core builds them)."""
    from competesmoe.data.loader import check_splits

    if cfg.data.sampler == "windows":
        check_splits(data_dir, cfg.model.seq_len, cfg.train.micro_batch_size, dp_size)


def train(cfg: Config, run_dir: Path, device: torch.device, claimed: RunDir | None) -> None:
    """Prepare, build, resume and fit, in an initialised process group; rank 0 holds the output_dir (claimed)."""
    rank = dist.get_rank()
    groups = build_groups(cfg.parallel.expert_parallel_size)
    data_dir = prepare_data(cfg, run_dir, rank)
    check_windows_fit(cfg, data_dir, groups.dp_size)

    trainer = Trainer(cfg, groups, device, data_dir)
    checkpoints = CheckpointManager(run_dir / CHECKPOINTS, cfg, groups, trainer.meta["tokenizer"],
                                    TrainingState(engine=trainer.engine, trainer=trainer, sampler=trainer.sampler),
                                    device)
    found = checkpoints.resume_point()
    if found is not None:
        checkpoints.load(found)
        if rank == 0:
            print(f"resumed from {found.path} at step {trainer.step}", flush=True)
    if claimed is not None:
        claimed.write_config()
    writer = MetricsWriter(run_dir, enabled=rank == 0)
    try:
        fit(trainer, checkpoints, writer, rank, PreemptionFlag(device))
    except (dist.DistError, RuntimeError) as err:
        if not is_peer_failure(err):
            raise
        raise UserError(f"rank {rank}: a collective failed because another rank stopped or is unreachable "
                        f"({first_line(err)}); continue with resume=auto from the last checkpoint") from None
    finally:
        writer.close()
    collectives.barrier(device)
    dist.destroy_process_group()


def first_line(err: Exception) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0][:200] if lines else type(err).__name__


class PreemptionFlag:
    """SIGTERM (preemption) asks for a checkpoint; the ranks agree on the step once per step (on the compute
    device: NCCL takes nothing else)."""

    def __init__(self, device: torch.device):
        self.requested = False
        self.device = device
        signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.requested = True

    def agreed(self) -> bool:
        return collectives.any_rank(self.requested, self.device)


def fit(trainer: Trainer, checkpoints: CheckpointManager, writer: MetricsWriter, rank: int,
        preempt: PreemptionFlag) -> None:
    from tqdm import tqdm

    t = trainer.cfg.train
    bar = tqdm(total=t.max_steps, initial=trainer.step, disable=rank != 0, desc="train", unit="step")
    if rank == 0:
        bar.write(f"MFU against {trainer.peak_tflops:.3g} TFLOP/s per device ({trainer.peak_source})")
    while trainer.step < t.max_steps:
        result = trainer.train_step()
        step = trainer.step
        bar.update(1)
        record = None
        if step % t.log_every == 0 or step == t.max_steps:
            record = trainer.record(result)  # the step's loss leaves the device only here
            bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}",
                            mfu=f"{record['mfu']:.1%}")
            writer.write(record, trainer.take_routing_stats())
        if result.skipped and rank == 0:
            bar.write(f"competesmoe: warning: step {step} skipped: non-finite loss or gradient"
                      + (f" (MoE layers {result.nonfinite_layers})" if result.nonfinite_layers else ""),
                      file=sys.stderr)
        if t.eval_every and step % t.eval_every == 0 and step < t.max_steps:
            writer.write(trainer.evaluate("valid"))
        if t.checkpoint_every and step % t.checkpoint_every == 0 and step < t.max_steps:
            checkpoints.save()
        if preempt.agreed():
            if record is None:
                writer.write(trainer.record(result), trainer.take_routing_stats())
            checkpoints.save()
            if rank == 0:
                bar.write(f"competesmoe: SIGTERM: saved a checkpoint at step {step}; resume=auto continues")
            return
    bar.close()
    checkpoints.save()  # before the final evaluation: an evaluation that fails must not lose the training
    for split in ("valid", "test"):
        result = trainer.evaluate(split)
        writer.write(result)
        if rank == 0:
            figure = "bpc" if "bpc" in result else "ppl"
            print(f"{split}: loss {result['loss']:.4f} {figure} {result[figure]:.4f}")
