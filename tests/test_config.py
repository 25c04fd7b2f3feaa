"""Every shipped YAML loads; bad input names the field."""

from pathlib import Path

import pytest

from competesmoe.launcher.config import Config, ConfigError, load_config, validate_world

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


def test_there_are_configs():
    assert {p.stem for p in CONFIGS} >= {"tiny-cpu", "switch-small", "switch-medium", "glam-small", "v2-pretrain"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)


def test_paper_shapes():
    v2 = load_config(Path("configs/v2-pretrain.yaml"))
    assert (v2.model.n_layers, v2.model.d_model, v2.moe.num_experts, v2.moe.expert_hidden, v2.moe.top_k) == (16, 512, 64, 128, 8)
    small = load_config(Path("configs/switch-small.yaml"))
    assert (small.model.n_layers, small.model.d_model, small.moe.num_experts, small.moe.top_k) == (6, 264, 16, 2)


def test_overrides_keep_types():
    cfg = load_config(Path("configs/tiny-cpu.yaml"), ["train.max_steps=40", "moe.competition.rate=0.5", "output_dir=/tmp/x"])
    assert cfg.train.max_steps == 40 and cfg.moe.competition.rate == 0.5 and cfg.output_dir == "/tmp/x"


@pytest.mark.parametrize("override,needle", [
    (["moe.top_kk=2"], "did you mean moe.top_k"),
    (["trian.max_steps=3"], "did you mean train"),
    (["train.max_steps=abc"], "train.max_steps"),
    (["moe.top_k=9"], "moe.top_k (9) must not exceed moe.num_experts (8)"),
    (["moe.competition.rate=1.5"], "moe.competition.rate"),
    (["train.lr=-1"], "train.lr"),
    (["moe.router=foo"], "moe.router"),
    (["parallel.expert_parallel_size=3"], "moe.num_experts (8) must be divisible by parallel.expert_parallel_size (3)"),
    (["model.n_heads=3"], "model.d_model (128) must be divisible by model.n_heads (3)"),
    (["train.zero_stage=3"], "train.zero_stage"),
    (["maxsteps"], "section.key=value"),
])
def test_bad_values_name_the_field(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config(Path("configs/tiny-cpu.yaml"), override)
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_world_not_divisible_by_ep():
    cfg = load_config(Path("configs/tiny-cpu.yaml"), ["parallel.expert_parallel_size=4"])
    with pytest.raises(ConfigError, match=r"world size \(6 ranks\)"):
        validate_world(cfg, 6)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="does-not-exist.yaml"):
        load_config("does-not-exist.yaml")
