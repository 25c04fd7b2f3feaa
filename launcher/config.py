"""The root config of a training run: the owners' sections plus `train.*`, loaded from YAML and overrides.

Each section lives with its owner (`competesmoe.moe.config`, `competesmoe.data.config`,
`competesmoe.parallel.config`); this module adds the optimisation section, composes them and makes the
checks that span sections. Every check raises `ConfigError` with a one-line message that names the
field and the fix; the command line prints it without a traceback.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from competesmoe.common.errors import ConfigError
from competesmoe.common.typed_config import build, check, parse_override, read_yaml_tree, set_dotted
from competesmoe.data.config import DataConfig
from competesmoe.moe.config import BaselineConfig, CompetitionConfig, ModelConfig, MoEConfig
from competesmoe.parallel.config import ParallelConfig

__all__ = ["BaselineConfig", "CompetitionConfig", "Config", "ConfigError", "DataConfig", "ModelConfig",
           "MoEConfig", "ParallelConfig", "TrainConfig", "config_from_dict", "load_config", "to_dict",
           "validate", "validate_world"]


SEED_LIMIT = 2**32
"""Seeds are numpy's: 0 <= seed < 2**32."""


@dataclass
class TrainConfig:
    max_steps: int = 300
    """Optimizer steps to train."""
    micro_batch_size: int = 8
    """Sequences per rank per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 2e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Cosine decay floor as a fraction of lr."""
    warmup_steps: int = 20
    """Linear learning-rate warm-up steps."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    beta2: float = 0.99
    """AdamW beta2 (beta1 is 0.9)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """Training precision (bf16 uses DeepSpeed's bf16 mode)."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage: 0, 1 or 2."""
    seed: int = 1234
    """Seed of weights, data order and the competition schedule."""
    log_every: int = 10
    """Write a train record to metrics.jsonl and TensorBoard every N steps."""
    eval_every: int = 100
    """Evaluate on the valid split every N steps (0: only at the end)."""
    eval_batches: int = 8
    """Micro-batches per rank in one evaluation."""
    checkpoint_every: int = 0
    """Save a checkpoint every N steps (0: only at the end)."""
    keep_checkpoints: int = 2
    """How many checkpoints to keep."""
    max_nonfinite_steps: int = 3
    """A step with a non-finite loss or gradient is skipped; stop after this many in a row."""
    optimizer_impl: Literal["auto", "fused", "foreach", "for_loop"] = "auto"
    """How torch's AdamW runs its update: 'fused' one kernel for all parameters (CUDA), 'foreach' a few batched
    kernels, 'for_loop' parameter by parameter; 'auto' = fused on CUDA, torch's own choice elsewhere."""
    peak_tflops: float | None = None
    """Peak dense matmul TFLOP/s of one device in train.precision, the `mfu` in metrics.jsonl is measured against;
    null: the table of known GPUs (A100, H100, H200: launcher/hardware.py), else this device's measured matmul rate."""

    def validate(self) -> None:
        for name in ("max_steps", "micro_batch_size", "grad_accum", "eval_batches", "log_every", "keep_checkpoints",
                     "max_nonfinite_steps"):
            value = getattr(self, name)
            check(value >= 1, f"train.{name} ({value}) must be at least 1")
        check(self.lr > 0, f"train.lr ({self.lr}) must be positive")
        check(0.0 <= self.beta2 < 1.0, f"train.beta2 ({self.beta2}) must be within [0, 1) (Adam's second-moment decay)")
        check(self.weight_decay >= 0, f"train.weight_decay ({self.weight_decay}) must not be negative")
        check(0 <= self.seed < SEED_LIMIT, f"train.seed ({self.seed}) must be within [0, 2**32) (numpy's seeds)")
        check(self.warmup_steps >= 0, f"train.warmup_steps ({self.warmup_steps}) must not be negative")
        check(0.0 <= self.min_lr_ratio <= 1.0, f"train.min_lr_ratio ({self.min_lr_ratio}) must be within [0, 1]")
        check(self.grad_clip >= 0, f"train.grad_clip ({self.grad_clip}) must not be negative (0 disables clipping)")
        check(self.eval_every >= 0 and self.checkpoint_every >= 0,
              "train.eval_every and train.checkpoint_every must not be negative")
        check(self.zero_stage in (0, 1, 2), f"train.zero_stage ({self.zero_stage}) must be 0, 1 or 2")
        check(self.peak_tflops is None or self.peak_tflops > 0,
              f"train.peak_tflops ({self.peak_tflops}) must be positive, or null for the device's own peak")


@dataclass
class Config:
    output_dir: str = "runs/default"
    """Run directory: resolved config, metrics.jsonl, tensorboard/, checkpoints/."""
    resume: str = "none"
    """'none': start fresh (refuses a directory holding another run); 'auto': continue from the newest checkpoint."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The Transformer."""
    moe: MoEConfig = field(default_factory=MoEConfig)
    """The MoE layers and their routing."""
    data: DataConfig = field(default_factory=DataConfig)
    """Corpus and tokenizer."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation and logging."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Distributed layout."""


def config_from_dict(tree: dict) -> Config:
    """A validated Config from a nested mapping (a YAML file's, or a checkpoint's run_state)."""
    cfg = build(Config, tree)
    validate(cfg)
    return cfg


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML config, apply dotted overrides, build and validate the typed Config."""
    tree = read_yaml_tree(path) if path is not None else {}
    for item in overrides:
        key, value = parse_override(item)
        set_dotted(tree, key, value)
    return config_from_dict(tree)


def validate(cfg: Config) -> None:
    """Each section's own checks, then those that span sections."""
    cfg.model.validate()
    cfg.moe.validate()
    cfg.data.validate()
    cfg.train.validate()
    cfg.parallel.validate()
    moe, t, p = cfg.moe, cfg.train, cfg.parallel
    check(moe.router != "stablemoe" or (t.zero_stage == 0 and t.precision == "fp32"),
          f"moe.router = 'stablemoe' needs train.zero_stage 0 and train.precision fp32 (got {t.zero_stage}, "
          f"{t.precision}): its stage 2 freezes the distilled router by giving it no gradient, and DeepSpeed's "
          f"ZeRO 1/2 and bf16 optimizers keep moving it with Adam's momentum")
    check(moe.num_experts % p.expert_parallel_size == 0,
          f"moe.num_experts ({moe.num_experts}) must be divisible by parallel.expert_parallel_size "
          f"({p.expert_parallel_size})")
    check(cfg.resume == "none" or cfg.resume == "auto" or Path(cfg.resume).exists(),
          f"resume = {cfg.resume!r}: use 'none', 'auto' or an existing checkpoint directory")


def validate_world(cfg: Config, world_size: int) -> None:
    """Checks that need the number of ranks, made once the launcher has told us."""
    cfg.parallel.validate_world(world_size)


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)
