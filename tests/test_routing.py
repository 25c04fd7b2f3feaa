"""The MoE layer's router and competition steps against brute-force loops over tokens and experts."""

import math

import pytest
import torch
import torch.nn.functional as F

from competesmoe.common.errors import ConfigError
from competesmoe.launcher.config import load_config
from competesmoe.moe import routing
from competesmoe.moe.config import CompetitionConfig, MoEConfig
from competesmoe.moe.layer import MoELayer, capacity_keep_mask
from competesmoe.moe.presets import preset_overrides
from support import TINY

D = 12


def make_layer(**overrides) -> MoELayer:
    competition = overrides.pop("competition", CompetitionConfig())
    cfg = MoEConfig(num_experts=overrides.pop("num_experts", 6), top_k=overrides.pop("top_k", 2),
                    expert_hidden=overrides.pop("expert_hidden", 10), competition=competition, **overrides)
    torch.manual_seed(0)
    layer = MoELayer(cfg, D)
    with torch.no_grad():  # a router sharp enough that top-K has no near-ties
        layer.router.weight_ED.normal_(std=0.5)
    return layer


def expert_ffn(layer: MoELayer, e: int, x_D: torch.Tensor) -> torch.Tensor:
    w_in, w_out = layer.experts.w_in_EDF[e], layer.experts.w_out_EFD[e]
    h = x_D @ w_in
    if layer.experts.activation == "swiglu":
        gate, up = h.chunk(2)
        return (F.silu(gate) * up) @ w_out
    return F.gelu(h) @ w_out


def reference_router_step(layer: MoELayer, x_TD: torch.Tensor):
    cfg = layer.cfg
    E, K = cfg.num_experts, cfg.top_k
    outputs, probs, chosen, logits = [], [], [], []
    for x_D in x_TD:
        g = [sum(layer.router.weight_ED[e, d] * x_D[d] for d in range(D)) for e in range(E)]
        g = torch.stack(g)
        p = torch.softmax(g, 0)
        order = sorted(range(E), key=lambda e: -p[e].item())[:K]
        total = sum(p[e] for e in order)
        outputs.append(sum(p[e] / total * expert_ffn(layer, e, x_D) for e in order))
        probs.append(p)
        chosen.append(order)
        logits.append(g)
    probs = torch.stack(probs)
    frac = [sum(c.count(e) for c in chosen) / (len(chosen) * K) for e in range(E)]
    balance = E * sum(probs[:, e].mean() * frac[e] for e in range(E))
    zloss = torch.stack([torch.logsumexp(g, 0) ** 2 for g in logits]).mean()
    return torch.stack(outputs), cfg.balance_coef * balance + cfg.z_loss_coef * zloss


def reference_competition_step(layer: MoELayer, x_TD: torch.Tensor):
    """One token at a time, as docs/competesmoe.md section 3 writes it (v2, and the v1 regime)."""
    cfg, comp = layer.cfg, layer.cfg.competition
    E, K = cfg.num_experts, cfg.top_k
    affinity = {"softplus_mean": lambda o: F.softplus(o).mean(), "l2_norm": lambda o: o.norm()}[comp.affinity]
    outputs, p_router, p_comp, targets, winners, diversity = [], [], [], [], [], []
    for x_D in x_TD:
        o = [expert_ffn(layer, e, x_D) for e in range(E)]
        g = layer.router.weight_ED @ x_D
        s = torch.stack([affinity(o_e) for o_e in o])
        if comp.combine_gate:
            s = 0.5 * s + 0.5 * g
        win = sorted(range(E), key=lambda e: -s[e].item())[:K]
        s_win = torch.stack([s[e] for e in win])
        w = torch.softmax(s_win, 0) if comp.variant == "v1" else s_win / s_win.sum()
        outputs.append(sum(w[k] * o[e] for k, e in enumerate(win)))
        p_router.append(torch.softmax(g, 0))
        p_comp.append(torch.softmax(s, 0))
        if comp.variant == "v1":  # softmax over the winners only, 0 elsewhere, gradient kept
            sparse = torch.softmax(s_win, 0)
            targets.append(torch.stack([sparse[win.index(e)] if e in win else s.new_zeros(()) for e in range(E)]))
        else:
            targets.append(torch.softmax(s, 0).detach())
        winners.append(win)
        sims = [F.cosine_similarity(o[a], o[b], dim=0) for a in win for b in win if a != b]
        diversity.append(sum(sims) / (K * K) if sims else torch.tensor(0.0))  # diagonal zeroed, mean over K x K
    p_router, p_comp, target = torch.stack(p_router), torch.stack(p_comp), torch.stack(targets)
    distill = ((p_router - target) ** 2).mean()
    hybrid = torch.stack([(p_router[t, e] - target[t, e]) ** 2 for t, win in enumerate(winners) for e in win]).mean()
    counted = [win if comp.variant == "v1" else win[:1] for win in winners]
    frac = [sum(c.count(e) for c in counted) / sum(len(c) for c in counted) for e in range(E)]
    balance = E * sum(p_comp[:, e].mean() * frac[e] for e in range(E))
    aux = (comp.router_loss_coef * (distill + comp.hybrid_theta * hybrid)
           + comp.diversity_coef * torch.stack(diversity).mean() + comp.balance_coef * balance)
    return torch.stack(outputs), aux


def grads(layer: MoELayer) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in layer.named_parameters()}


def compare(layer: MoELayer, reference, compete: bool, tokens: int = 9):
    torch.manual_seed(1)
    x_TD = torch.randn(tokens, D)
    probe_TD = torch.randn(tokens, D)
    layer.train()
    y, aux = layer(x_TD.view(1, tokens, D), compete=compete)
    ((y.view(tokens, D) * probe_TD).sum() + aux.loss).backward()
    ours = grads(layer)
    layer.zero_grad()
    y_ref, aux_ref = reference(layer, x_TD)
    ((y_ref * probe_TD).sum() + aux_ref).backward()
    theirs = grads(layer)
    torch.testing.assert_close(y.view(tokens, D), y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(aux.loss, aux_ref, atol=1e-6, rtol=1e-5)
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], atol=1e-5, rtol=1e-4, msg=name)
    return aux


@pytest.mark.parametrize("top_k", [1, 2, 4])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_router_step_matches_token_loop(top_k, activation):
    layer = make_layer(top_k=top_k, activation=activation, router="smoe")
    aux = compare(layer, reference_router_step, compete=False)
    assert aux.stats["competed"].item() == 0.0
    assert aux.stats["expert_fraction"].sum().item() == pytest.approx(1.0)


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_grouped_gemm_router_step_matches_token_loop(activation):
    """moe.grouped_gemm=on: torch's grouped GEMM (CUDA's path under 'auto'), run here on CPU."""
    layer = make_layer(top_k=2, activation=activation, router="smoe", expert_hidden=16, grouped_gemm="on")
    compare(layer, reference_router_step, compete=False)


def test_grouped_gemm_on_refuses_what_it_cannot_run_in_one_line():
    layer = make_layer(router="smoe", grouped_gemm="on")  # expert_hidden 10: fp32 rows of 40 bytes
    with pytest.raises(ConfigError, match=r"^moe.grouped_gemm is on, .* set moe.grouped_gemm=auto$"):
        layer(torch.randn(1, 5, D))


@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize("variant,affinity,combine", [("v2", "softplus_mean", False), ("v2", "l2_norm", False),
                                                      ("v1", "l2_norm", False), ("v1", "l2_norm", True)])
def test_competition_step_matches_token_loop(top_k, variant, affinity, combine):
    comp = CompetitionConfig(variant=variant, affinity=affinity, combine_gate=combine, hybrid_theta=0.7,
                             router_loss_coef=0.3, diversity_coef=0.1, balance_coef=0.05)
    layer = make_layer(top_k=top_k, competition=comp)
    aux = compare(layer, reference_competition_step, compete=True)
    assert aux.stats["competed"].item() == 1.0
    assert 0.0 <= aux.stats["router_competition_overlap"].item() <= 1.0


def test_the_v1_preset_step_matches_token_loop():
    """moe/presets.py 'competesmoe-v1' (weights 0.05, L2 norm, no diversity) through the same reference."""
    cfg = load_config(TINY, preset_overrides("competesmoe-v1", 6) + ["moe.num_experts=6"])
    layer = make_layer(top_k=2, competition=cfg.moe.competition)
    assert (layer.cfg.competition.variant, layer.cfg.competition.router_loss_coef) == ("v1", 0.05)
    compare(layer, reference_competition_step, compete=True)


def test_competition_step_gives_router_no_task_gradient():
    comp = CompetitionConfig(router_loss_coef=0.0, diversity_coef=0.0, balance_coef=0.0)
    layer = make_layer(competition=comp)
    y, aux = layer(torch.randn(1, 7, D), compete=True)
    (y.square().sum() + aux.loss).backward()
    assert torch.count_nonzero(layer.router.weight_ED.grad) == 0
    assert torch.count_nonzero(layer.experts.w_in_EDF.grad) > 0


def test_v1_combine_gate_gives_router_task_gradient():
    comp = CompetitionConfig(variant="v1", combine_gate=True, router_loss_coef=0.0, diversity_coef=0.0,
                             balance_coef=0.0)
    layer = make_layer(competition=comp)
    y, aux = layer(torch.randn(1, 7, D), compete=True)
    (y.square().sum() + aux.loss).backward()
    assert torch.count_nonzero(layer.router.weight_ED.grad) > 0


@pytest.mark.parametrize("variant", ["v2", "v1"])
def test_router_loss_reaches_experts_only_through_the_v1_target(variant):
    comp = CompetitionConfig(variant=variant, router_loss_coef=1.0, hybrid_theta=0.5, diversity_coef=0.0,
                             balance_coef=0.0)
    layer = make_layer(competition=comp)
    _, aux = layer(torch.randn(1, 7, D), compete=True)
    aux.loss.backward()
    assert torch.count_nonzero(layer.router.weight_ED.grad) > 0
    expert_grad = layer.experts.w_in_EDF.grad
    reaches = expert_grad is not None and torch.count_nonzero(expert_grad) > 0
    assert reaches == (variant == "v1"), "v2 detaches p_C; v1's sparse target is not detached"


def test_router_step_task_gradient_reaches_router():
    layer = make_layer(router="competesmoe", balance_coef=0.0, z_loss_coef=0.0)
    y, aux = layer(torch.randn(1, 7, D), compete=False)
    (y.square().sum() + aux.loss).backward()
    assert torch.count_nonzero(layer.router.weight_ED.grad) > 0


def test_eval_never_competes():
    layer = make_layer()
    layer.eval()
    _, aux = layer(torch.randn(1, 5, D), compete=True)
    assert aux.stats["competed"].item() == 0.0


def test_fine_grained_experts_64_of_128_top8():
    cfg = MoEConfig(num_experts=64, top_k=8, expert_hidden=128, activation="swiglu")
    layer = MoELayer(cfg, 64)
    x = torch.randn(2, 32, 64)
    for compete in (False, True):
        y, aux = layer(x, compete=compete)
        assert y.shape == x.shape and torch.isfinite(y).all() and torch.isfinite(aux.loss)


def test_capacity_keeps_first_assignments_in_token_order():
    expert_A = torch.tensor([2, 0, 2, 2, 1, 0, 2])
    keep = capacity_keep_mask(expert_A, num_experts=3, capacity=2)
    # loop reference: the first two assignments of each expert survive
    seen = {}
    expected = []
    for e in expert_A.tolist():
        seen[e] = seen.get(e, 0) + 1
        expected.append(seen[e] <= 2)
    assert keep.tolist() == expected


def test_capacity_factor_drops_contribute_zero():
    layer = make_layer(router="smoe", capacity_factor=0.5, top_k=1)
    y, aux = layer(torch.randn(1, 12, D), compete=False)
    dropped = aux.stats["dropped_fraction"].item()
    capacity = math.ceil(0.5 * 12 / 6)
    assert dropped >= 1 - capacity * 6 / 12 - 1e-6
    zero_rows = (y.view(12, D).abs().sum(-1) == 0).sum().item()
    assert zero_rows == round(dropped * 12)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_diversity_loss_brute_force(k):
    o = torch.randn(3, k, 5)
    expected = torch.stack([
        sum((F.cosine_similarity(o[t, a], o[t, b], dim=0) for a in range(k) for b in range(k) if a != b),
            torch.tensor(0.0)) / (k * k)
        for t in range(3)]).mean()
    torch.testing.assert_close(routing.diversity_loss(o), expected)


def test_v1_target_is_a_softmax_over_the_winners_only():
    scores = torch.tensor([[1.0, 3.0, 2.0, 0.5]])
    winners = scores.topk(2).indices
    target = routing.competition_target(torch.softmax(scores, -1), scores, winners, "v1")
    want = torch.softmax(torch.tensor([3.0, 2.0]), 0)
    torch.testing.assert_close(target, torch.tensor([[0.0, want[0], want[1], 0.0]]))
    dense = routing.competition_target(torch.softmax(scores, -1), scores, winners, "v2")
    torch.testing.assert_close(dense, torch.softmax(scores, -1))
    assert not dense.requires_grad


def test_competition_diagnostics_brute_force():
    comp = CompetitionConfig(router_loss_coef=0.3, hybrid_theta=0.5, diversity_coef=0.2, balance_coef=0.1)
    layer = make_layer(num_experts=6, top_k=2, competition=comp)
    x = torch.randn(1, 9, D)
    layer.train()
    _, aux = layer(x, compete=True)
    st = aux.stats
    outputs = torch.stack([torch.stack([expert_ffn(layer, e, x_D) for e in range(6)]) for x_D in x[0]])  # T E D
    s = F.softplus(outputs).mean(-1)
    p_comp = torch.softmax(s, -1)
    want_entropy = torch.stack([-(p * p.log()).sum() for p in p_comp]).mean() / math.log(6)
    torch.testing.assert_close(st["competition_entropy_ratio"], want_entropy.detach())
    winners = s.topk(2).indices
    want_rms = torch.stack([outputs[t, e] for t in range(9) for e in winners[t]]).square().mean().sqrt()
    torch.testing.assert_close(st["expert_output_rms"], want_rms.detach())
    router_top = torch.softmax(x[0] @ layer.router.weight_ED.t(), -1).topk(2).indices
    overlap = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(router_top, winners)) / (9 * 2)
    assert st["router_competition_overlap"].item() == pytest.approx(overlap)
    assert st["router_competition_overlap_vs_chance"].item() == pytest.approx(overlap / (2 / 6))
    weighted = {k: v for k, v in st.items() if k.startswith(routing.WEIGHTED)}
    torch.testing.assert_close(weighted["weighted_router_loss"], 0.3 * (st["router_loss"] + 0.5 * st["hybrid_loss"]))
    torch.testing.assert_close(weighted["weighted_diversity_loss"], 0.2 * st["diversity_loss"])
    torch.testing.assert_close(weighted["weighted_competition_balance_loss"], 0.1 * st["competition_balance_loss"])
    torch.testing.assert_close(weighted["weighted_aux_loss"], aux.loss.detach())
    torch.testing.assert_close(sum(v for k, v in weighted.items() if k != "weighted_aux_loss"), aux.loss.detach())


def test_router_step_reports_its_weighted_terms():
    layer = make_layer(router="smoe", balance_coef=0.3, z_loss_coef=0.01)
    _, aux = layer(torch.randn(1, 7, D))
    torch.testing.assert_close(aux.stats["weighted_balance_loss"], 0.3 * aux.stats["balance_loss"])
    torch.testing.assert_close(aux.stats["weighted_z_loss"], 0.01 * aux.stats["z_loss"])
    torch.testing.assert_close(aux.stats["weighted_aux_loss"], aux.loss.detach())


def test_uniform_competition_shows_no_signal():
    """Identical experts: p_C is uniform (entropy ratio 1) whatever the token: the competition carries nothing."""
    layer = make_layer(num_experts=4, top_k=2)
    with torch.no_grad():
        layer.experts.w_in_EDF.copy_(layer.experts.w_in_EDF[:1].expand_as(layer.experts.w_in_EDF))
        layer.experts.w_out_EFD.copy_(layer.experts.w_out_EFD[:1].expand_as(layer.experts.w_out_EFD))
    _, aux = layer(torch.randn(1, 7, D), compete=True)
    assert aux.stats["competition_entropy_ratio"].item() == pytest.approx(1.0)


def test_expert_init_official_lm_scales():
    d_model, layers = 32, 8
    cfg = MoEConfig(num_experts=16, top_k=2, expert_hidden=64, expert_init="official_lm")
    torch.manual_seed(0)
    experts = MoELayer(cfg, d_model, n_layers=layers).experts
    scale = math.sqrt(2 / layers)
    assert experts.w_in_EDF.std().item() == pytest.approx(scale / math.sqrt(d_model), rel=0.05)
    assert experts.w_out_EFD.std().item() == pytest.approx(scale / math.sqrt(16 * 64), rel=0.05)
    default = MoELayer(MoEConfig(num_experts=16, top_k=2, expert_hidden=64), d_model, n_layers=layers).experts
    assert default.w_out_EFD.std().item() == pytest.approx(1 / math.sqrt(64), rel=0.05)


def test_metrics_report_each_weighted_term_against_the_lm_loss(tmp_path):
    """MoEAux.stats -> RoutingStats (mean over micro-batches, '<term>_to_lm' = weighted term / that micro-batch's
    LM loss) -> metrics.jsonl and TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from competesmoe.launcher.metrics import MetricsWriter, RoutingStats

    layer = make_layer(competition=CompetitionConfig(router_loss_coef=0.3))
    layer.train()
    _, router_aux = layer(torch.randn(1, 7, D), compete=False)
    _, comp_aux = layer(torch.randn(1, 7, D), compete=True)
    stats = RoutingStats()
    stats.add([router_aux], torch.tensor(2.0))
    stats.add([comp_aux], torch.tensor(4.0))
    (reduced,) = stats.reduce(None, torch.device("cpu"))
    assert reduced["router_loss_to_lm"] == pytest.approx(comp_aux.stats["weighted_router_loss"].item() / 4.0)
    assert reduced["balance_loss_to_lm"] == pytest.approx(router_aux.stats["weighted_balance_loss"].item() / 2.0)
    assert reduced["aux_loss_to_lm"] == pytest.approx((router_aux.loss.item() / 2.0 + comp_aux.loss.item() / 4.0) / 2)
    assert reduced["competition_entropy_ratio"] == pytest.approx(comp_aux.stats["competition_entropy_ratio"].item())
    assert not any(k.startswith(routing.WEIGHTED) for k in reduced)

    writer = MetricsWriter(tmp_path, enabled=True)
    writer.write({"step": 1, "split": "train", "loss": 3.0}, [reduced])
    writer.close()
    assert "router_competition_overlap_vs_chance" in (tmp_path / "metrics.jsonl").read_text()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    for key in ("competition_entropy_ratio", "router_loss_to_lm", "aux_loss_to_lm", "expert_output_rms"):
        assert f"moe/layer0/{key}" in events.Tags()["scalars"], key
