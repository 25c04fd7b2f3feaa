"""Device placement, proven on CPU: a real training job on 2 gloo ranks at EP 2 (router and competition steps,
an evaluation, logged steps with their routing figures, checkpoints, the ranks' SIGTERM agreement, a resume) where
every tensor our code makes without naming its device lands on the "meta" device.

Why: gloo accepts tensors from any device, so a CPU run cannot tell a tensor made on the compute device from one
made "wherever the default is", nor a collective handed a host tensor from one handed a device tensor. NCCL can (it
takes CUDA tensors only), and a GPU job would crash on each. Meta is a device without data: reading such a tensor
fails, and a collective refuses it (competesmoe.parallel.collectives checks every tensor against the compute device;
gloo alone would fail later, less clearly). Tensors made on the host on purpose (data from NumPy, figures for
TensorBoard, the prepare heartbeat's gloo group) name the CPU. So the job runs to its end only if every tensor it
makes names its device (or copies another's) and every collective gets tensors from the compute device.

How: `UnplacedOnMeta`, torch's own default-device mode (the one `torch.set_default_device` installs) restricted to
factory calls (torch.tensor, zeros, arange, ...) made from this repository's code. A plain set_default_device("meta")
would also move what third-party code places by the default on purpose: torch's AdamW keeps its step counter on the
host that way (`torch.tensor(0.0)`), and would crash on meta in any job. `with torch.device(...)` inside the code
still wins (the trainer builds the model on the host that way, explicitly).

Against the code before issue 11 (5a51645) this test fails: first at the prepare heartbeat's `torch.zeros(1)`
(`done.item()`: "Tensor.item() cannot be called on meta tensors"); with that tensor and the model's construction
named on the host as here, at the trainer's `lm_loss = torch.tensor(...)`, all-reduced and then read (the same
error, launcher/trainer.py `"loss": lm_loss.item()`): on NCCL, a host tensor handed to all_reduce.

The job is stopped by SIGTERM (sent to rank 1 only) and resumed to its end: one job in two parts.

The same job counts the trainer's waits for the device (experiments/bench/host_syncs.py), with 2 micro-steps per
step: a micro-step's forward and backward wait only where the MoE layers must (at most 1 per layer on a router step,
2 on a competition step), the optimizer step waits only on the accumulation boundary, the rest of a step waits once
(the gradient norm for the skip decision), and a logged step's record once more (the loss).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from torch.utils._device import DeviceContext, _device_constructors

from support import ROOT, SMALL, TINY, losses, records

TORCH_DIR = str(Path(torch.__file__).parent)

pytestmark = pytest.mark.slow  # real training runs: see tests/conftest.py

ARGS = [*SMALL, "parallel.expert_parallel_size=2", "train.max_steps=8", "train.log_every=2", "train.eval_every=3",
        "train.checkpoint_every=3", "moe.competition.rate=0.5", "train.grad_accum=2"]
LAYER_CODE = ("moe/", "parallel/expert_parallel.py")
"""Where the MoE layers' own waits come from."""
SIGTERM_AFTER_STEP = 4
"""Rank 1 alone gets SIGTERM once step 4 is logged; both ranks must agree, save, and stop; a resume finishes."""


class UnplacedOnMeta(DeviceContext):
    """Factory calls without a device, made by this repository's code (not torch's, not DeepSpeed's), get "meta"."""

    def __init__(self):
        super().__init__("meta")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _device_constructors() and kwargs.get("device") is None and _called_from_this_repository():
            kwargs["device"] = self.device
        return func(*args, **kwargs)


def _called_from_this_repository() -> bool:
    """The nearest caller outside torch is a source file of this repository (not its tests, not its venv)."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.startswith(TORCH_DIR):
        frame = frame.f_back
    if frame is None:
        return False
    path = Path(frame.f_code.co_filename).resolve()
    return path.is_relative_to(ROOT) and not path.is_relative_to(ROOT / "tests") and ".venv" not in path.parts


def _send_sigterm_after(run_dir: Path, step: int) -> None:
    def watch():
        metrics = run_dir / "metrics.jsonl"
        while not (metrics.exists() and any(r["step"] >= step for r in records(run_dir, "train"))):
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, daemon=True).start()


def _count_host_syncs() -> list[tuple]:
    """Count the waits for the device of every Trainer.train_step and .record, and of the engine's forward, backward
    and step within a train_step (not an evaluation's): (what, competing layers or accumulation boundary, where each
    wait came from)."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    from competesmoe.experiments.bench.host_syncs import HostSyncCounter
    from competesmoe.launcher.trainer import Trainer

    seen, in_train_step = [], []

    def counted(cls, name, detail):
        method = getattr(cls, name)

        def wrapper(self, *args, **kwargs):
            if cls is DeepSpeedEngine and not any(in_train_step):
                return method(self, *args, **kwargs)
            info = detail(self, *args)
            in_train_step.append(name == "train_step")
            try:
                with HostSyncCounter() as syncs:
                    out = method(self, *args, **kwargs)
            finally:
                in_train_step.pop()
            seen.append((name, info, syncs.where))
            return out
        setattr(cls, name, wrapper)

    counted(Trainer, "train_step", lambda trainer: len(trainer.schedule.layers_at(trainer.step)))
    counted(Trainer, "record", lambda trainer, result: None)
    counted(DeepSpeedEngine, "forward", lambda engine, inputs, targets, compete, ctx: len(compete))
    counted(DeepSpeedEngine, "backward", lambda engine, loss: None)
    counted(DeepSpeedEngine, "step", lambda engine: engine.is_gradient_accumulation_boundary())
    return seen


def _train_on_meta_default(rank: int, world: int, overrides: list[str], sigterm: bool) -> list[tuple]:
    from competesmoe.launcher.config import load_config
    from competesmoe.launcher.train import run

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    cfg = load_config(TINY, overrides)
    if sigterm and rank == 1:
        _send_sigterm_after(Path(cfg.output_dir), SIGTERM_AFTER_STEP)
    seen = _count_host_syncs()
    with UnplacedOnMeta():
        run(cfg)
    return seen


def _train(tmp: Path, name: str, *extra: str, sigterm: bool = False) -> tuple[Path, list]:
    from competesmoe.parallel.ranks import run_on_ranks

    run_dir = tmp / name
    seen = run_on_ranks(_train_on_meta_default, 2, args=([*ARGS, f"output_dir={run_dir}", *extra], sigterm),
                        timeout=600, env={"DS_ACCELERATOR": "cpu"})
    return run_dir, seen


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> tuple[Path, list, int]:
    """The job stopped by SIGTERM and resumed to its end (every tensor placed in both), each rank's counted waits in
    both parts, and the step it stopped at."""
    stopped, seen = _train(tmp_path_factory.mktemp("placement"), "stopped", sigterm=True)
    saved = sorted(p.name for p in (stopped / "checkpoints").glob("step*"))
    stop_step = int(saved[-1][len("step"):])
    _, seen_resumed = _train(stopped.parent, "stopped", "resume=auto")
    return stopped, [a + b for a, b in zip(seen, seen_resumed)], stop_step


def test_a_job_makes_every_tensor_on_its_device(job):
    run_dir, _, stop_step = job
    assert SIGTERM_AFTER_STEP < stop_step < 8  # the ranks agreed on SIGTERM (rank 1's alone), saved and stopped
    train = records(run_dir, "train")
    assert [r["step"] for r in train] == sorted({2, 4, stop_step, 6, 8}) and max(losses(run_dir)) == 8
    assert any(r["competing_layers"] for r in train) and all(r["moe"] for r in train)
    assert [r["step"] for r in records(run_dir, "valid")] == [3, 6, 8] and records(run_dir, "test")
    assert int((run_dir / "checkpoints" / "latest").read_text().strip()[len("step"):]) == 8


def _layer_wait(where: str) -> bool:
    return any(f" at {code}" in where for code in LAYER_CODE)


def test_a_micro_step_waits_for_the_device_only_where_the_moe_layers_must(job):
    _, seen, _ = job
    for per_rank in seen:
        forwards = [(competing, where) for name, competing, where in per_rank if name == "forward"]
        assert len(forwards) == 8 * 2  # 8 steps of 2 micro-steps, over the two parts
        for competing, where in forwards:
            assert all(_layer_wait(w) for w in where), where  # the loss and routing figures stay on the device
            assert len(where) <= 2 * competing + 1 * (2 - competing), where  # 2 MoE layers
        assert all(not where for name, _, where in per_rank if name == "backward")
        steps = [(boundary, where) for name, boundary, where in per_rank if name == "step"]
        assert [b for b, _ in steps] == [False, True] * 8 and all(not where for b, where in steps if not b)


def test_a_step_waits_once_outside_its_micro_steps_and_a_logged_step_once_more(job):
    _, seen, stop_step = job
    for per_rank in seen:
        inner = 0
        for name, _, where in per_rank:
            if name in ("forward", "backward", "step"):
                inner += len(where)
            elif name == "train_step":
                assert len(where) - inner == 1, where  # the gradient norm, read for the skip decision
                inner = 0
        records_made = len({2, 4, stop_step, 6, 8})
        assert [len(where) for name, _, where in per_rank if name == "record"] == [1] * records_made  # the loss
