"""Every shipped YAML loads; bad input names the field."""

from pathlib import Path

import pytest

from competesmoe.launcher.config import Config, ConfigError, load_config, to_dict, validate_world
from competesmoe.moe.presets import PRESETS, preset_overrides

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


def test_there_are_configs():
    assert {p.stem for p in CONFIGS} >= {"tiny-cpu", "switch-small", "switch-medium", "glam-small", "v2-pretrain",
                                         "switch-small-v1"}


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


def test_valid_yaml_spellings_are_accepted(tmp_path):
    """YAML 1.2 numbers (1e-3, 5E2, .5, 1_000, 0x10), a whole float for an int field, a section left empty, and text
    that YAML would read as a number or a comment kept as typed in a text field."""
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1e-3\n  max_steps: 5E2\n  warmup_steps: 0x10\n  log_every: 1_000\n"
                    "  min_lr_ratio: .5\nmoe:\n  # every line of it commented out\n")
    cfg = load_config(path, ["output_dir=/runs/exp #3", "data.prepared_dir=2024", "train.weight_decay=1e-2"])
    assert (cfg.train.lr, cfg.train.max_steps, cfg.train.warmup_steps, cfg.train.log_every) == (1e-3, 500, 16, 1000)
    assert cfg.train.min_lr_ratio == 0.5 and cfg.train.weight_decay == 0.01 and cfg.moe.num_experts == 8
    assert cfg.output_dir == "/runs/exp #3" and cfg.data.prepared_dir == "2024"


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
    (["moe.competition.hybrid_coef=0.2", "moe.competition.hybrid_theta=0.1"], "keep only hybrid_theta"),
    (["moe.competition.hybrid_coef=0.2", "moe.competition.router_loss_coef=0"], "needs router_loss_coef > 0"),
    (["moe.competition.combine_gate=true"], "moe.competition.combine_gate"),
    (["moe.competition.hybrid_theta=-1"], "moe.competition.hybrid_theta"),
    (["moe.expert_init=kaiming"], "moe.expert_init"),
    (["moe.baseline.xmoe_gates=sparse"], "moe.baseline.xmoe_gates"),
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


def test_deprecated_hybrid_coef_becomes_the_same_relative_theta():
    with pytest.warns(FutureWarning, match="hybrid_coef is deprecated"):
        cfg = load_config(Path("configs/tiny-cpu.yaml"), ["moe.competition.router_loss_coef=0.001",
                                                          "moe.competition.hybrid_coef=0.2"])
    comp = cfg.moe.competition
    # old loss: 0.001 * MSE + 0.2 * MSE_winners; new: router_loss_coef * (MSE + theta * MSE_winners)
    assert comp.hybrid_theta == pytest.approx(200.0) and comp.hybrid_coef is None
    assert "hybrid_coef" not in {k for k, v in to_dict(cfg)["moe"]["competition"].items() if v is not None}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_loads_and_sets_what_it_says(name):
    overrides = preset_overrides(name, 8)
    cfg = to_dict(load_config(Path("configs/tiny-cpu.yaml"), overrides))
    for item in overrides:
        key, value = item.split("=", 1)
        node = cfg
        for part in key.split("."):
            node = node[part]
        assert str(node).lower() == value.lower(), item
    assert PRESETS[name].source and PRESETS[name].description


@pytest.mark.parametrize("config,preset", [("v2-pretrain", "competesmoe-v2-lm"), ("switch-small-v1", "competesmoe-v1"),
                                           ("switch-small", "competesmoe-v2"), ("glam-small", "competesmoe-v2")])
def test_paper_configs_hold_their_presets_values(config, preset):
    path = Path(f"configs/{config}.yaml")
    cfg = load_config(path)
    assert load_config(path, preset_overrides(preset, cfg.moe.num_experts)) == cfg


def test_an_old_run_state_config_with_hybrid_coef_zero_loads_silently(recwarn):
    """Resolved configs (and checkpoints' run_state.json) before hybrid_theta held hybrid_coef: 0.0."""
    cfg = load_config(Path("configs/tiny-cpu.yaml"), ["moe.competition.hybrid_coef=0.0",
                                                      "moe.competition.hybrid_theta=0.3"])
    assert cfg.moe.competition.hybrid_theta == 0.3 and not [w for w in recwarn if "hybrid_coef" in str(w.message)]
