"""The DeepSpeed engine's config: what the run's own settings say, plus a user's DeepSpeed fragment
(`parallel.deepspeed_config`), merged and validated.

The run controls some keys itself (`CONTROLLED`): a fragment may repeat them with the run's own value, never another
one (that is refused in one line naming the setting to change instead). Everything else in the fragment is merged
in, and the result passes `engine.check_config` (the settings under which expert gradients come out wrong) and
DeepSpeed's own validation before any engine is built.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import yaml

from competesmoe.common.errors import ConfigError
from competesmoe.parallel.config import ParallelConfig

_ABSENT = object()

CONTROLLED = {
    ("train_micro_batch_size_per_gpu",): "train.micro_batch_size",
    ("gradient_accumulation_steps",): "train.grad_accum",
    ("train_batch_size",): "train.micro_batch_size x train.grad_accum x the ranks",
    ("gradient_clipping",): "train.grad_clip (at ZeRO 0 the trainer clips, as DeepSpeed's clipping is wrong under "
                            "expert parallelism)",
    ("zero_optimization", "stage"): "train.zero_stage",
    ("bf16", "enabled"): "train.precision",
    ("fp16", "enabled"): "train.precision",
    ("optimizer",): "train.lr, train.beta2 and train.weight_decay (the trainer builds AdamW)",
    ("scheduler",): "train.warmup_steps and train.min_lr_ratio (the trainer's schedule)",
    ("zero_optimization", "overlap_comm"): "parallel.overlap_comm",
    ("zero_optimization", "reduce_bucket_size"): "parallel.reduce_bucket_size",
    ("zero_optimization", "allgather_bucket_size"): "parallel.allgather_bucket_size",
    ("communication_data_type",): "parallel.grad_reduce_dtype",
}
"""Key paths of the engine config the run sets from its own fields (the value names the field)."""


def engine_config(*, micro_batch_size: int, grad_accum: int, grad_clip: float, zero_stage: int, precision: str,
                  parallel: ParallelConfig) -> dict:
    """The engine config for these settings, with parallel.deepspeed_config merged in (ConfigError when it conflicts
    or DeepSpeed refuses the result)."""
    ours = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        # DeepSpeed's ZeRO-0 clipping is wrong with expert parallelism: the trainer clips there.
        "gradient_clipping": grad_clip if zero_stage > 0 else 0.0,
        "zero_optimization": {"stage": zero_stage, "overlap_comm": parallel.overlap_comm,
                              "reduce_bucket_size": parallel.reduce_bucket_size,
                              "allgather_bucket_size": parallel.allgather_bucket_size},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": False},
        "communication_data_type": parallel.grad_reduce_dtype,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if parallel.deepspeed_config is None:
        return ours
    source = "parallel.deepspeed_config " + parallel.deepspeed_config
    merged = merge_fragment(ours, read_fragment(Path(parallel.deepspeed_config)), source)
    validate(merged, source)
    return merged


def read_fragment(path: Path) -> dict:
    """A JSON or YAML mapping of DeepSpeed settings (the file is data: parsed, never run)."""
    where = f"parallel.deepspeed_config {path}"
    if not path.is_file():
        raise ConfigError(f"{where} does not exist; give a JSON or YAML file of DeepSpeed settings, or leave it out")
    try:
        text = path.read_text()
        fragment = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as err:
        raise ConfigError(f"{where} is not valid {'JSON' if path.suffix == '.json' else 'YAML'} "
                          f"({str(err).splitlines()[0][:120]})") from None
    if not isinstance(fragment, dict):
        raise ConfigError(f"{where} must hold a mapping of DeepSpeed settings")
    return fragment


def merge_fragment(ours: dict, fragment: dict, source: str) -> dict:
    """ours with the fragment merged in (nested mappings key by key); a controlled key with another value than ours
    is refused."""
    for path, field in CONTROLLED.items():
        given = _lookup(fragment, path)
        if given is _ABSENT:
            continue
        want = _lookup(ours, path)
        dotted = ".".join(path)
        if want is _ABSENT:
            raise ConfigError(f"{source}: {dotted} is set by {field}; leave it out of the DeepSpeed config")
        if given != want:
            raise ConfigError(f"{source}: {dotted} = {given!r} conflicts with this run's {want!r}, which "
                              f"{field} sets; change that instead, or leave {dotted} out")
    return _deep_merge(copy.deepcopy(ours), fragment)


def validate(config: dict, source: str) -> None:
    """Our EP checks, then DeepSpeed's own parsing of the config (its sections refuse unknown keys)."""
    from deepspeed.runtime.config import DeepSpeedConfig

    from competesmoe.parallel.deepspeed.engine import check_config

    try:
        check_config(config)
        DeepSpeedConfig(copy.deepcopy(config))
    except (ValueError, TypeError, AssertionError) as err:  # pydantic's ValidationError is a ValueError
        raise ConfigError(f"{source}: DeepSpeed refuses the merged config: {_one_line(err)}") from None


def _one_line(err: Exception) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip() and "errors.pydantic.dev" not in line]
    return " ".join(lines[:3])[:300] or type(err).__name__


def _lookup(tree: dict, path: tuple[str, ...]):
    node = tree
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return _ABSENT
        node = node[key]
    return node


def _deep_merge(base: dict, extra: dict) -> dict:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base
