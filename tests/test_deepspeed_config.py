"""The DeepSpeed settings a user expects (parallel/deepspeed/config.py): overlapped gradient reduction, bucket sizes,
fp32 gradient communication and fused AdamW on CUDA by default, each reachable from the run's config; a user's own
DeepSpeed fragment merged in, validated by DeepSpeed, and refused in one line where it conflicts with what the run
controls (gradient clipping, which the trainer does itself under expert parallelism)."""

from __future__ import annotations

import json

import pytest
import torch

from competesmoe.common.errors import ConfigError
from competesmoe.launcher.config import load_config
from competesmoe.launcher.trainer import adamw_options, deepspeed_config
from support import TINY, competesmoe, one_error_line


def _engine_config(*overrides: str) -> dict:
    return deepspeed_config(load_config(TINY, list(overrides)))


def test_by_default_gradients_are_reduced_in_fp32_overlapped_in_small_buckets():
    ds = _engine_config("train.zero_stage=1")
    zero = ds["zero_optimization"]
    assert zero["stage"] == 1 and zero["overlap_comm"] is True
    assert zero["reduce_bucket_size"] == zero["allgather_bucket_size"] == 50_000_000  # DeepSpeed's own: 5e8
    assert ds["communication_data_type"] == "fp32"


def test_the_run_config_sets_each_of_them():
    ds = _engine_config("parallel.overlap_comm=false", "parallel.reduce_bucket_size=1000",
                        "parallel.allgather_bucket_size=2000", "parallel.grad_reduce_dtype=bf16")
    assert ds["zero_optimization"]["overlap_comm"] is False
    assert (ds["zero_optimization"]["reduce_bucket_size"], ds["zero_optimization"]["allgather_bucket_size"]) == \
        (1000, 2000)
    assert ds["communication_data_type"] == "bf16"
    with pytest.raises(ConfigError, match="parallel.reduce_bucket_size"):
        load_config(TINY, ["parallel.reduce_bucket_size=0"])


def test_adamw_is_fused_on_cuda_and_torchs_default_elsewhere():
    assert adamw_options("auto", torch.device("cuda", 0)) == {"fused": True}
    assert adamw_options("auto", torch.device("cpu")) == {}
    assert adamw_options("foreach", torch.device("cuda")) == {"foreach": True}
    with pytest.raises(ConfigError, match="train.optimizer_impl"):
        load_config(TINY, ["train.optimizer_impl=fastest"])


def test_a_users_fragment_is_merged_and_validated(tmp_path):
    fragment = tmp_path / "ds.yaml"
    fragment.write_text("zero_optimization:\n  round_robin_gradients: true\n  stage: 1\n"
                        "comms_logger:\n  enabled: true\n")
    ds = _engine_config("train.zero_stage=1", f"parallel.deepspeed_config={fragment}")
    assert ds["zero_optimization"]["round_robin_gradients"] is True
    assert ds["zero_optimization"]["overlap_comm"] is True  # ours kept beside it
    assert ds["comms_logger"] == {"enabled": True}

    fragment.write_text("zero_optimization:\n  no_such_setting: 1\n")
    with pytest.raises(ConfigError, match="DeepSpeed refuses the merged config.*no_such_setting"):
        _engine_config(f"parallel.deepspeed_config={fragment}")
    fragment.write_text("- a list\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        _engine_config(f"parallel.deepspeed_config={fragment}")


@pytest.mark.parametrize("setting,field", [({"gradient_clipping": 1.0}, "train.grad_clip"),
                                           ({"zero_optimization": {"overlap_comm": False}}, "parallel.overlap_comm"),
                                           ({"optimizer": {"type": "Adam"}}, "the trainer builds AdamW")])
def test_a_fragment_that_overrides_what_the_run_controls_is_refused(tmp_path, setting, field):
    fragment = tmp_path / "ds.json"
    fragment.write_text(json.dumps(setting))
    with pytest.raises(ConfigError, match=field):  # ZeRO 0 (tiny-cpu's): the trainer clips, DeepSpeed must not
        _engine_config("parallel.expert_parallel_size=2", f"parallel.deepspeed_config={fragment}")


def test_the_refusal_is_one_line_before_the_run_starts(tmp_path):
    """Gradient clipping under expert parallelism is the trainer's (DeepSpeed's ZeRO-0 clipping is wrong there)."""
    fragment = tmp_path / "ds.json"
    fragment.write_text(json.dumps({"gradient_clipping": 1.0}))
    run_dir = tmp_path / "run"
    line = one_error_line(competesmoe("train", TINY, f"output_dir={run_dir}", f"parallel.deepspeed_config={fragment}",
                                      timeout=300))
    assert "gradient_clipping = 1.0 conflicts" in line and "train.grad_clip" in line
    assert not (run_dir / "data").exists()  # refused before preparing anything
