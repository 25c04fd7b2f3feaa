"""The MoE layer's router and competition steps against brute-force loops over tokens and experts."""

import math

import pytest
import torch
import torch.nn.functional as F

from competesmoe.moe import routing
from competesmoe.moe.config import CompetitionConfig, MoEConfig
from competesmoe.moe.layer import MoELayer, capacity_keep_mask

D = 12


def make_layer(**overrides) -> MoELayer:
    competition = overrides.pop("competition", CompetitionConfig())
    cfg = MoEConfig(num_experts=overrides.pop("num_experts", 6), top_k=overrides.pop("top_k", 2), expert_hidden=10,
                    competition=competition, **overrides)
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
    cfg, comp = layer.cfg, layer.cfg.competition
    E, K = cfg.num_experts, cfg.top_k
    affinity = {"softplus_mean": lambda o: F.softplus(o).mean(), "l2_norm": lambda o: o.norm()}[comp.affinity]
    outputs, p_router, p_comp, winners, diversity = [], [], [], [], []
    for x_D in x_TD:
        o = [expert_ffn(layer, e, x_D) for e in range(E)]
        s = torch.stack([affinity(o_e) for o_e in o])
        win = sorted(range(E), key=lambda e: -s[e].item())[:K]
        if comp.variant == "v1":
            w = torch.softmax(torch.stack([s[e] for e in win]), 0)
        else:
            w = torch.stack([s[e] for e in win]) / sum(s[e] for e in win)
        outputs.append(sum(w[k] * o[e] for k, e in enumerate(win)))
        p_router.append(torch.softmax(layer.router.weight_ED @ x_D, 0))
        p_comp.append(torch.softmax(s, 0))
        winners.append(win)
        pairs = [F.cosine_similarity(o[a], o[b], dim=0) for a in win for b in win if a != b]
        diversity.append(sum(pairs) / len(pairs) if pairs else torch.tensor(0.0))
    p_router, p_comp = torch.stack(p_router), torch.stack(p_comp)
    distill = ((p_router - p_comp.detach()) ** 2).mean()
    hybrid = torch.stack([(p_router[t, e] - p_comp[t, e].detach()) ** 2
                          for t, win in enumerate(winners) for e in win]).mean()
    frac = [sum(1 for win in winners if win[0] == e) / len(winners) for e in range(E)]
    balance = E * sum(p_comp[:, e].mean() * frac[e] for e in range(E))
    aux = (comp.router_loss_coef * distill + comp.hybrid_coef * hybrid
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


@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize("variant,affinity", [("v2", "softplus_mean"), ("v1", "l2_norm")])
def test_competition_step_matches_token_loop(top_k, variant, affinity):
    comp = CompetitionConfig(variant=variant, affinity=affinity, hybrid_coef=0.2, router_loss_coef=0.3,
                             diversity_coef=0.1, balance_coef=0.05)
    layer = make_layer(top_k=top_k, competition=comp)
    aux = compare(layer, reference_competition_step, compete=True)
    assert aux.stats["competed"].item() == 1.0
    assert 0.0 <= aux.stats["router_competition_overlap"].item() <= 1.0


def test_competition_step_gives_router_no_task_gradient():
    comp = CompetitionConfig(router_loss_coef=0.0, hybrid_coef=0.0, diversity_coef=0.0, balance_coef=0.0)
    layer = make_layer(competition=comp)
    y, aux = layer(torch.randn(1, 7, D), compete=True)
    (y.square().sum() + aux.loss).backward()
    assert torch.count_nonzero(layer.router.weight_ED.grad) == 0
    assert torch.count_nonzero(layer.experts.w_in_EDF.grad) > 0


def test_router_loss_reaches_router_but_not_experts():
    comp = CompetitionConfig(router_loss_coef=1.0, hybrid_coef=0.5, diversity_coef=0.0, balance_coef=0.0)
    layer = make_layer(competition=comp)
    _, aux = layer(torch.randn(1, 7, D), compete=True)
    aux.loss.backward()
    assert torch.count_nonzero(layer.router.weight_ED.grad) > 0
    assert layer.experts.w_in_EDF.grad is None or torch.count_nonzero(layer.experts.w_in_EDF.grad) == 0


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


def test_diversity_loss_brute_force():
    o = torch.randn(3, 4, 5)
    expected = torch.stack([
        sum(F.cosine_similarity(o[t, a], o[t, b], dim=0) for a in range(4) for b in range(4) if a != b) / 12
        for t in range(3)]).mean()
    torch.testing.assert_close(routing.diversity_loss(o), expected)
