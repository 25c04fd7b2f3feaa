"""What a checkpoint folder holds, by name, and the record of one (`Checkpoint`).

A tag folder `<output_dir>/checkpoints/step<NNNNNNNN>/` holds DeepSpeed's model file (dense weights, LR
scheduler, the trainer's and sampler's state) and optimizer files, one expert file per expert-parallel rank
(`experts_epRRR_of_PPP.pt`), the optimizer state by name (`optim_dense.pt`, `optim_experts_epRRR_of_PPP.pt`),
one RNG file per rank, `run_state.json` (the one record of the run's config, layout and tokenizer) and
`manifest.json` (every file's size and sha256).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from competesmoe.common.errors import UserError
from competesmoe.launcher.config import Config
from competesmoe.moe.model import uses_moe
from competesmoe.parallel.deepspeed import expert_files, optimizer_state

CHECKPOINTS = "checkpoints"
"""The folder of a run's output_dir that holds its checkpoints."""
STAGING = ".staging"
MANIFEST = "manifest.json"
RUN_STATE = "run_state.json"
LATEST = "latest"
MODEL_FILE = expert_files.MODEL_FILE


class CheckpointError(UserError):
    """A checkpoint that cannot be used; the message names the file."""


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def rng_file(rank: int) -> str:
    return f"rng_rank{rank:05d}.pt"


def published_tags(root: Path) -> list[str]:
    """Published checkpoint tags under a checkpoints/ folder, newest first."""
    if not root.is_dir():
        return []
    return sorted((p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("step")), reverse=True)


def optimizer_kind(zero_stage: int, precision: str) -> str:
    """What holds the Adam state, which decides the format of the state saved by name: ZeRO 1 and 2 share
    one (DeepSpeed's partitions, fp32 masters), ZeRO 0 has one per precision."""
    return "zero-partitions" if zero_stage > 0 else f"zero0-{precision}"


@dataclass(frozen=True)
class Checkpoint:
    """A verified checkpoint folder, or an exported .safetensors model, and its run state."""

    path: Path
    """The tag folder (checkpoints/step00000300) or the .safetensors file."""
    run_state: dict
    """run_state.json as written (or the safetensors metadata): step, layout, tokenizer, config."""
    cfg: Config
    """The run's config, rebuilt and validated from the run state."""

    @property
    def step(self) -> int:
        return self.run_state["step"]

    @property
    def world_size(self) -> int:
        return self.run_state["world_size"]

    @property
    def ep_size(self) -> int:
        return self.run_state["ep_size"]

    @property
    def tokenizer(self) -> dict:
        return self.run_state["tokenizer"]

    @property
    def optimizer_kind(self) -> str | None:
        """None for checkpoints from before it was recorded (they reshard nowhere)."""
        return self.run_state.get("optimizer_kind")

    @property
    def has_experts(self) -> bool:
        return any(uses_moe(self.cfg.model.layout, i) for i in range(self.cfg.model.n_layers))

    @property
    def run_dir(self) -> Path:
        """The run's output_dir where it is now: above checkpoints/ for a tag folder; an exported file's folder."""
        return self.path.parent if self.path.is_file() else self.path.parent.parent

    def describe_layout(self) -> str:
        train = self.cfg.train
        return (f"{self.world_size} ranks at EP {self.ep_size} with train.zero_stage={train.zero_stage} "
                f"train.precision={train.precision}")

    def required_files(self) -> set[str]:
        """Every file a checkpoint of this layout holds (and so its manifest must list)."""
        world, ep, train = self.world_size, self.ep_size, self.cfg.train
        files = {RUN_STATE, optimizer_state.DENSE_FILE, *(rng_file(rank) for rank in range(world)),
                 *expert_files.deepspeed_file_names(world, ep, train.zero_stage, train.precision == "bf16",
                                                    self.has_experts)}
        if self.has_experts:
            files |= {expert_files.expert_file_name(prefix, r, ep)
                      for prefix in (expert_files.EXPERTS, optimizer_state.EXPERTS) for r in range(ep)}
        return files
