"""The papers' methods as their authors' code ran them: named sets of `moe.*` settings beside this project's
defaults, which are stronger baselines (every router has a balance loss and a z-loss, XMoE learns its
temperature).

A preset is a mapping of `moe`-section fields (nested for `competition` and `baseline`) and the official script
each value comes from; `preset_overrides(name, num_experts)` turns it into dotted overrides for `load_config` or
the command line (`competesmoe train configs/tiny-cpu.yaml moe.router=smoe moe.balance_coef=0.0 ...`).
docs/competesmoe.md (section 6) tells what each preset reproduces and what it does not.

Sources: v1 = github.com/giangdip2410/CompeteSMoE (scripts/pretraining/enwik8/transformers/small/*.sh,
custom_layers_opt.py, custom_gates.py, trainer.py); v2 = github.com/Fsoft-AIC/CompeteSMoE (the LM code under
moe_pretrain_model/, its sweep sweeps/slimpajama_moe_no_attmoe_154M_competesmoe.yaml; the VLM code under
moe_model/, its defaults in moe_model/train/train.py and scripts/train/phi35mini/siglip/sft.sh).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    description: str
    """What the preset reproduces, in one line."""
    source: str
    """The official script and code lines its values come from."""
    settings: Callable[[int], dict]
    """moe-section fields for a layer of E experts (XMoE's routing width depends on E)."""


_NO_ROUTER_LOSSES = {"balance_coef": 0.0, "z_loss_coef": 0.0}

PRESETS: dict[str, Preset] = {
    "smoe-v1": Preset(
        "SMoE as the v1 paper ran it: softmax top-K, no balance loss, no z-loss",
        "v1 smoe-s.sh passes --load_balance 0.01 but not --g_blance, so CustomNaiveGate_Balance_SMoE never sets a "
        "loss (custom_gates.py) and trainer.py adds load_balance x nothing",
        lambda num_experts: {"router": "smoe", **_NO_ROUTER_LOSSES}),
    "xmoe-v1": Preset(
        "XMoE as the v1 paper ran it: routing width 8, no balance loss, no z-loss",
        "v1 xmoe-s.sh without --g_blance (custom_gates.py CustomNaiveGate_Balance_XMoE: inp_reduction to 8)",
        lambda num_experts: {"router": "xmoe", **_NO_ROUTER_LOSSES, "baseline": {"xmoe_dim": 8}}),
    "stablemoe-v1": Preset(
        "StableMoE without a balance loss, as the v1 paper's runs (its gate never adds one)",
        "v1 stablemoe-s.sh: trainer.py sums gate losses of the SMoE and XMoE gates only",
        lambda num_experts: {"router": "stablemoe", **_NO_ROUTER_LOSSES}),
    "xmoe-v2": Preset(
        "XMoE as the v2 code: routing width E/2, fixed temperature, softmax over the top-K probabilities as weights",
        "v2 moe_model/model/moe/xmoe.py and moe_pretrain_model/layers/moe/xmoe.py: temperature 0.3 on cosines whose "
        "expert embeddings are rescaled to norm 1.5 before every forward (so logits = cos / 0.2), _keepTopk = "
        "softmax over the top-K of softmax(logits); balance 0.01 and z-loss 0.001 from sft.sh",
        lambda num_experts: {"router": "xmoe", "balance_coef": 0.01, "z_loss_coef": 0.001,
                             "baseline": {"xmoe_dim": max(1, num_experts // 2), "xmoe_temperature": 0.2,
                                          "xmoe_learn_temperature": False, "xmoe_gates": "softmax_topk"}}),
    "competesmoe-v1": Preset(
        "The v1 regime: a competition on every forward, L2-norm affinity, the router distils a sparse target "
        "(softmax over the winners) with gradient through it, weight 0.05 on it and on the competition balance",
        "v1 competesmoe-s.sh: --freq 1.0 --alpha 5.0 --load_balance 0.01 (0.05 = 5 x 0.01) --opt_blance "
        "--act_experts linear --opt_loss mse; custom_layers_opt.py FMoE.forward; no diversity loss, no warm-up",
        lambda num_experts: {"router": "competesmoe", **_NO_ROUTER_LOSSES, "competition": {
            "variant": "v1", "affinity": "l2_norm", "rate": 1.0, "warmup": 0.0, "router_loss_coef": 0.05,
            "hybrid_theta": 0.0, "balance_coef": 0.05, "diversity_coef": 0.0, "combine_gate": False}}),
    "competesmoe-v2": Preset(
        "The v2 defaults (this project's defaults): rate 0.05 after 5% warm-up, cap 3, weights 0.01",
        "v2 moe_model/train/train.py ModelArguments (router_loss_coef, diversity_loss_coef, bal_comp_loss_coef, "
        "rate_flip, warm_up, max_compete_in_iter, hybrid False); balance 0.01 and z-loss 0.001 from sft.sh",
        lambda num_experts: {"router": "competesmoe", "balance_coef": 0.01, "z_loss_coef": 0.001, "competition": {
            "variant": "v2", "affinity": "softplus_mean", "rate": 0.05, "warmup": 0.05, "cap": 3,
            "router_loss_coef": 0.01, "hybrid_theta": 0.0, "diversity_coef": 0.01, "balance_coef": 0.01}}),
    "competesmoe-v2-lm": Preset(
        "The v2 LM pre-training sweep: rate 0.07 from step 0, router loss 0.001 x (MSE + 0.2 x winners' MSE), "
        "diversity and competition balance 0.005, no z-loss, the LM code's expert initialisation",
        "v2 sweeps/slimpajama_moe_no_attmoe_154M_competesmoe.yaml (rate_flip 0.07, warm_up 0.0, max_compete_in_iter "
        "3, router_loss_coef 0.001, hybrid 1, router_theta 0.2, balance_loss_coef 0.01, balance_loss_coef_comp "
        "0.01) with layers/moe/competesmoe.py, which weighs diversity and competition balance by "
        "balance_loss_coef_comp / 2 and adds no z-loss",
        lambda num_experts: {"router": "competesmoe", "balance_coef": 0.01, "z_loss_coef": 0.0,
                             "expert_init": "official_lm", "competition": {
                                 "variant": "v2", "affinity": "softplus_mean", "rate": 0.07, "warmup": 0.0,
                                 "cap": 3, "router_loss_coef": 0.001, "hybrid_theta": 0.2, "diversity_coef": 0.005,
                                 "balance_coef": 0.005}}),
}


def preset_overrides(name: str, num_experts: int) -> list[str]:
    """The dotted `moe.*` overrides of preset `name` for layers of `num_experts` experts."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return _dotted("moe", PRESETS[name].settings(num_experts))


def _dotted(prefix: str, settings: dict) -> list[str]:
    overrides = []
    for key, value in settings.items():
        if isinstance(value, dict):
            overrides += _dotted(f"{prefix}.{key}", value)
        else:
            overrides.append(f"{prefix}.{key}={str(value).lower() if isinstance(value, bool) else value}")
    return overrides
