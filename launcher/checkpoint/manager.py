"""The training side of checkpoints: save (write aside, verify, publish atomically), find, load.

A save goes to `<root>/.staging/<tag>/`, then rank 0 writes `run_state.json` and `manifest.json`, renames
the folder to `<root>/<tag>` and only then replaces `<root>/latest`. A crash at any point leaves the previous
checkpoint published and loadable. Rank 0 verifies the checkpoint to resume from and the ranks agree on it;
`resume=auto` skips every checkpoint that does not verify, with one line each.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Protocol

import torch

from competesmoe.common.errors import UserError, is_peer_failure
from competesmoe.common.files import fsync_path, write_atomic
from competesmoe.launcher.checkpoint import rng
from competesmoe.launcher.checkpoint.layout import (
    LATEST,
    RUN_STATE,
    STAGING,
    Checkpoint,
    CheckpointError,
    optimizer_kind,
    published_tags,
    rng_file,
    tag_for,
)
from competesmoe.launcher.checkpoint.verify import find_resumable, verify, write_manifest
from competesmoe.launcher.config import Config, to_dict
from competesmoe.parallel import collectives
from competesmoe.parallel.deepspeed import expert_files, optimizer_state
from competesmoe.parallel.deepspeed.safe_load import use_safe_loads
from competesmoe.parallel.groups import ParallelGroups

FAULT_KILL_IN_PUBLISH = "COMPETESMOE_FAULT_KILL_IN_PUBLISH"
"""Fault injection for tests: rank 0 SIGKILLs itself while publishing this tag (staged, not yet visible)."""

SHAPE_FIELDS = {
    "model": ["d_model", "n_layers", "n_heads", "seq_len", "layout", "positions", "tie_embeddings", "dense_hidden"],
    "moe": ["num_experts", "expert_hidden", "activation"],
}
"""What a resumed run must share with its checkpoint (the tensors' shapes)."""


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass(frozen=True)
class TrainingState:
    """What a training checkpoint holds and restores."""

    engine: object
    """DeepSpeed's engine: the model, the optimizer and the LR schedule (its files, plus ours by name)."""
    trainer: Stateful
    """The trainer's own state: its `step` and non-finite streak."""
    sampler: Stateful
    """The position in the training data."""


class CheckpointManager:
    """One run's checkpoints under `root` (its checkpoints/ folder), for the ranks of one job."""

    def __init__(self, root: Path, cfg: Config, groups: ParallelGroups, tokenizer: dict, state: TrainingState,
                 device: torch.device):
        """device: the compute device (the ranks' agreements travel there; its CUDA random stream is saved)."""
        self.root = root
        self.cfg = cfg
        self.groups = groups
        self.tokenizer = tokenizer
        self.state = state
        self.device = device

    @property
    def engine(self):
        return self.state.engine

    # ------------------------------------------------------------------------------------------ save
    def save(self) -> str:
        """Write aside, then publish atomically. Collective; returns the tag."""
        step = self.state.trainer.state_dict()["step"]
        self._refuse_nonfinite_weights(step)
        self._refuse_full_disk(step)
        try:
            return self._save(step)
        except (OSError, RuntimeError) as err:  # torch.save reports a full disk as a RuntimeError
            if is_peer_failure(err):  # a dead peer, not a write failure: leave its staged files alone
                raise
            shutil.rmtree(self.root / STAGING / tag_for(step), ignore_errors=True)
            raise UserError(f"saving the step-{step} checkpoint under {self.root} failed "
                            f"({getattr(err, 'strerror', None) or str(err).splitlines()[0][:120]}); the previous "
                            f"checkpoint is kept; free space or choose another output_dir") from None

    def _save(self, step: int) -> str:
        tag = tag_for(step)
        staging = self._prepare_staging(tag)
        # The on-disk layout since the first checkpoints: the sampler's position inside the trainer's entry.
        client_state = {"trainer": {**self.state.trainer.state_dict(), "sampler": self.state.sampler.state_dict()}}
        if self.engine.has_moe_layers:  # experts are written once per EP rank, outside DeepSpeed's model file
            expert_files.save_checkpoint(self.engine, str(staging), tag=tag, client_state=client_state,
                                         save_latest=False)
        else:
            self.engine.save_checkpoint(str(staging), tag=tag, client_state=client_state, save_latest=False)
        optimizer_state.save_by_name(self.engine, staging / tag)
        rng.save(staging / tag / rng_file(self.groups.rank), self.device)
        collectives.barrier(self.device)
        if self.groups.rank == 0:
            self._publish(tag, self.run_state(step))
        collectives.barrier(self.device)
        return tag

    def run_state(self, step: int) -> dict:
        """What a resume must check before touching tensors: layout, tokenizer, shapes (and the whole config)."""
        train = self.cfg.train
        return {"step": step, "world_size": self.groups.world_size, "ep_size": self.groups.ep_size,
                "zero_stage": train.zero_stage, "optimizer_kind": optimizer_kind(train.zero_stage, train.precision),
                "tokenizer": self.tokenizer, "config": to_dict(self.cfg)}

    def _prepare_staging(self, tag: str) -> Path:
        staging = self.root / STAGING
        if self.groups.rank == 0:
            shutil.rmtree(staging / tag, ignore_errors=True)
            staging.mkdir(parents=True, exist_ok=True)
        collectives.barrier(self.device)
        return staging

    def _publish(self, tag: str, run_state: dict) -> None:
        """Rank 0, after every rank finished writing: manifest, rename, then `latest`, then prune older ones."""
        staged = self.root / STAGING / tag
        (staged / RUN_STATE).write_text(json.dumps(run_state, indent=1))
        write_manifest(staged)
        if os.environ.get(FAULT_KILL_IN_PUBLISH) == tag:
            os.kill(os.getpid(), signal.SIGKILL)
        final = self.root / tag
        replaced = self.root / STAGING / f"{tag}.replaced"
        if final.exists():  # saving the same step again (e.g. a resumed run that had already finished)
            shutil.rmtree(replaced, ignore_errors=True)
            os.rename(final, replaced)
        os.rename(staged, final)
        fsync_path(self.root)
        shutil.rmtree(replaced, ignore_errors=True)
        write_atomic(self.root / LATEST, tag)
        # The newest `keep` up to this one stay; newer ones (skipped at resume as damaged) are left until replaced,
        # so the checkpoint just written is never the one pruned.
        for old in [t for t in published_tags(self.root) if t <= tag][self.cfg.train.keep_checkpoints:]:
            shutil.rmtree(self.root / old, ignore_errors=True)

    def _refuse_nonfinite_weights(self, step: int) -> None:
        finite = torch.stack([torch.isfinite(p).all() for p in self.engine.module.parameters()]).all()
        if collectives.any_rank(~finite, self.device):
            raise UserError(f"refusing to save a checkpoint with non-finite weights at step {step}; "
                            f"the last good checkpoint is kept")

    def _refuse_full_disk(self, step: int) -> None:
        """Weights plus two Adam moments, twice over (DeepSpeed's files and ours), must fit."""
        need = 5 * sum(p.numel() * p.element_size() for p in self.engine.module.parameters())
        self.root.mkdir(parents=True, exist_ok=True)
        if collectives.any_rank(shutil.disk_usage(self.root).free < need, self.device):
            raise UserError(f"No space left for the step-{step} checkpoint under {self.root} (about "
                            f"{need / 2**20:.0f} MiB per rank needed); the previous checkpoint is kept; free space "
                            f"or choose another output_dir")

    # ------------------------------------------------------------------------------------------ find
    def resume_point(self) -> Checkpoint | None:
        """The checkpoint `resume` names, verified by rank 0 and agreed by every rank; None to start fresh.
        A checkpoint named by path that does not verify raises on every rank."""
        found, problem = collectives.broadcast_object(self._find() if self.groups.rank == 0 else None, self.device)
        if problem:
            raise CheckpointError(problem)
        return found

    def _find(self) -> tuple[Checkpoint | None, str | None]:
        try:
            if self.cfg.resume == "none":
                return None, None
            if self.cfg.resume == "auto":
                return find_resumable(self.root), None
            return verify(Path(self.cfg.resume)), None
        except UserError as err:
            return None, str(err)

    # ------------------------------------------------------------------------------------------ load
    def load(self, saved: Checkpoint) -> None:
        """Resume from a verified checkpoint; a different world or EP size reshards (see `optimizer_kind`)."""
        self._check_compatible(saved)
        same_layout = (saved.world_size, saved.ep_size) == (self.groups.world_size, self.groups.ep_size)
        train = self.cfg.train
        if not same_layout and saved.optimizer_kind != optimizer_kind(train.zero_stage, train.precision):
            raise UserError(f"checkpoint {saved.path} was saved on {saved.describe_layout()}; to reshard it to "
                            f"{self.groups.world_size} ranks at EP {self.groups.ep_size} resume with the same "
                            f"optimizer setup (ZeRO 1 and 2 mix), or resume on the same layout")
        use_safe_loads(self.engine)
        load = (partial(expert_files.load_checkpoint, self.engine) if self.engine.has_moe_layers
                else self.engine.load_checkpoint)
        _, client_state = load(str(saved.path.parent), tag=saved.path.name, load_optimizer_states=same_layout)
        if not same_layout:
            optimizer_state.load_by_name(self.engine, saved.path)
        own = dict(client_state["trainer"])
        self.state.sampler.load_state_dict(own.pop("sampler"))
        self.state.trainer.load_state_dict(own)
        if same_layout:
            rng.restore(rng.load(saved.path / rng_file(self.groups.rank)), self.device)

    def _check_compatible(self, saved: Checkpoint) -> None:
        """Refuse a checkpoint whose tokenizer or model shape differs from this run's, naming the field."""
        if saved.tokenizer != self.tokenizer:
            raise UserError(f"checkpoint {saved.path} was trained with tokenizer {saved.tokenizer} but this run's "
                            f"data uses {self.tokenizer}; use the same data.tokenizer/data.path")
        before_cfg, now_cfg = to_dict(saved.cfg), to_dict(self.cfg)
        for section, fields in SHAPE_FIELDS.items():
            for name in fields:
                before, after = before_cfg[section][name], now_cfg[section][name]
                if before != after:
                    raise UserError(f"{section}.{name} is {after} but checkpoint {saved.path} was trained with "
                                    f"{before}; a resumed run keeps the model shape")

