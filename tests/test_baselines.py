"""The baseline routing policies (moe/baselines.py) against brute-force loops over tokens and experts:
outputs, auxiliary losses and every parameter's gradient; plus what each baseline promises (XMoE's
temperature learns, StableMoE's stage 2 is frozen and routes on the token alone, SMoE-Dropout's
router never trains and its K grows), the K override used by evaluation sweeps, the dense baseline's
equal active parameters, and the policies under expert parallelism (EP 2 equals one process)."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from competesmoe.launcher.config import BaselineConfig, ConfigError, ModelConfig, MoEConfig, load_config
from competesmoe.moe import baselines
from competesmoe.moe.layer import MoELayer
from competesmoe.moe.model import TransformerLM
from competesmoe.moe.presets import preset_overrides
from competesmoe.moe.routing import RoutingContext
from competesmoe.parallel.ranks import run_on_ranks

D = 12
V = 20


def make_layer(router: str, num_experts=6, top_k=2, balance_coef=0.3, z_loss_coef=0.001, **baseline) -> MoELayer:
    cfg = MoEConfig(num_experts=num_experts, top_k=top_k, expert_hidden=10, router=router, balance_coef=balance_coef,
                    z_loss_coef=z_loss_coef, baseline=BaselineConfig(**baseline))
    torch.manual_seed(0)
    layer = MoELayer(cfg, D, vocab_size=V)
    with torch.no_grad():  # routers sharp enough that top-K has no near-ties
        if router == "stablemoe":
            layer.router.centroids_ED.normal_(std=0.5)
    return layer


def expert_ffn(layer: MoELayer, e: int, x_D: torch.Tensor) -> torch.Tensor:
    return F.gelu(x_D @ layer.experts.w_in_EDF[e]) @ layer.experts.w_out_EFD[e]


def top(values, k):
    """Indices of the k largest values, largest first (a plain sort)."""
    return sorted(range(len(values)), key=lambda e: -float(values[e]))[:k]


def dot(a, b):
    return sum(a[i] * b[i] for i in range(len(a)))


def mix(layer, x_D, chosen, weights):
    return sum(w * expert_ffn(layer, e, x_D) for e, w in zip(chosen, weights))


def switch_balance(probs, chosen, E):
    frac = [sum(c.count(e) for c in chosen) / sum(len(c) for c in chosen) for e in range(E)]
    return E * sum(torch.stack([p[e] for p in probs]).mean() * frac[e] for e in range(E))


# ---------------------------------------------------------------------------------------------
# Brute-force references, one token at a time.


def reference_xmoe(layer: MoELayer, x_TD, tokens_T, ctx):
    r, cfg = layer.router, layer.cfg
    E, K = cfg.num_experts, ctx.top_k or cfg.top_k
    tau = torch.exp(-r.log_inv_temperature[0])
    outputs, probs, chosen = [], [], []
    for x_D in x_TD:
        z = torch.stack([dot(r.proj_RD[i], x_D) for i in range(r.proj_RD.shape[0])])
        logits = []
        for e in range(E):
            emb = r.embed_ER[e]
            logits.append(dot(z, emb) / (torch.sqrt(dot(z, z)) * torch.sqrt(dot(emb, emb))) / tau)
        p = torch.softmax(torch.stack(logits), 0)
        win = top(p.tolist(), K)
        if cfg.baseline.xmoe_gates == "softmax_topk":  # the v2 code: softmax over the top-K probabilities
            weights = torch.softmax(torch.stack([p[e] for e in win]), 0)
        else:
            weights = [p[e] / sum(p[e] for e in win) for e in win]
        outputs.append(mix(layer, x_D, win, weights))
        probs.append(p)
        chosen.append(win)
    return torch.stack(outputs), cfg.balance_coef * switch_balance(probs, chosen, E)


def reference_stablemoe(layer: MoELayer, x_TD, tokens_T, ctx):
    r, cfg, b = layer.router, layer.cfg, layer.cfg.baseline
    E, K = cfg.num_experts, ctx.top_k or cfg.top_k
    stage1 = ctx.step < math.floor(b.stablemoe_stage1 * ctx.total_steps)
    outputs, chosen, scores_all, distill = [], [], [], []
    for x_D, token in zip(x_TD, tokens_T.tolist()):
        s = [dot(r.centroids_ED[e], x_D) for e in range(E)]
        d = [dot(r.distilled_embed_VR[token], r.distilled_centroids_ER[e]) for e in range(E)]
        win = top([v.item() for v in s], K) if stage1 else top([v.item() for v in d], K)
        outputs.append(mix(layer, x_D, win, [torch.sigmoid(s[e]) for e in win]))
        chosen.append(win)
        scores_all.append(s)
        logp = torch.log_softmax(torch.stack(d), 0)
        distill.append(-sum(logp[e] for e in win) / K)
    if not stage1:
        return torch.stack(outputs), torch.zeros(())
    T = len(chosen)
    mean = T * K / E
    counts = [sum(c.count(e) for c in chosen) for e in range(E)]
    balance = sum((counts[e] - mean) / mean * torch.sigmoid(scores_all[t][e])
                  for t, c in enumerate(chosen) for e in c) / (T * K)
    return torch.stack(outputs), cfg.balance_coef * balance + b.stablemoe_distill_coef * torch.stack(distill).mean()


def reference_smoe_dropout(layer: MoELayer, x_TD, tokens_T, ctx):
    cfg, b = layer.cfg, layer.cfg.baseline
    if ctx.top_k:
        K = ctx.top_k
    elif layer.training:  # K grows linearly: equal shares of the steps for k_start .. k_end
        k_end = b.dropout_k_end or cfg.num_experts
        shares = [ctx.total_steps * i / (k_end - b.dropout_k_start + 1) for i in range(k_end - b.dropout_k_start + 1)]
        K = b.dropout_k_start + max(i for i, start in enumerate(shares) if ctx.step >= start)
    else:
        K = cfg.top_k
    outputs = []
    for x_D in x_TD:
        p = torch.softmax(torch.stack([dot(layer.router.weight_ED[e], x_D) for e in range(cfg.num_experts)]), 0)
        win = top(p.tolist(), K)
        total = sum(p[e] for e in win)
        outputs.append(mix(layer, x_D, win, [p[e] / total for e in win]))
    return torch.stack(outputs), torch.zeros(())


def reference_smoe(layer: MoELayer, x_TD, tokens_T, ctx):
    """Switch (K=1) / GShard (K=2) softmax router, with the evaluation K override."""
    cfg = layer.cfg
    E, K = cfg.num_experts, ctx.top_k or cfg.top_k
    outputs, probs, chosen, logits = [], [], [], []
    for x_D in x_TD:
        g = torch.stack([dot(layer.router.weight_ED[e], x_D) for e in range(E)])
        p = torch.softmax(g, 0)
        win = top(p.tolist(), K)
        total = 1.0 if cfg.baseline.smoe_raw_gates else sum(p[e] for e in win)
        outputs.append(mix(layer, x_D, win, [p[e] / total for e in win]))
        probs.append(p)
        chosen.append(win)
        logits.append(g)
    zloss = torch.stack([torch.logsumexp(g, 0) ** 2 for g in logits]).mean()
    return torch.stack(outputs), cfg.balance_coef * switch_balance(probs, chosen, E) + cfg.z_loss_coef * zloss


REFERENCES = {"xmoe": reference_xmoe, "stablemoe": reference_stablemoe, "smoe_dropout": reference_smoe_dropout,
              "smoe": reference_smoe}


def grads(layer):
    return {n: None if p.grad is None else p.grad.clone() for n, p in layer.named_parameters()}


def compare(layer: MoELayer, ctx: RoutingContext, tokens=9, train=True):
    torch.manual_seed(1)
    x_TD = torch.randn(tokens, D)
    probe_TD = torch.randn(tokens, D)
    tokens_T = torch.randint(0, V, (tokens,))
    ctx = RoutingContext(step=ctx.step, total_steps=ctx.total_steps, top_k=ctx.top_k, tokens_BS=tokens_T.view(1, -1))
    layer.train(train)
    layer.zero_grad(set_to_none=True)
    y, aux = layer(x_TD.view(1, tokens, D), ctx=ctx)
    ((y.view(tokens, D) * probe_TD).sum() + aux.loss).backward()
    ours = grads(layer)
    layer.zero_grad(set_to_none=True)
    y_ref, aux_ref = REFERENCES[layer.cfg.router](layer, x_TD, tokens_T, ctx)
    ((y_ref * probe_TD).sum() + aux_ref).backward()
    theirs = grads(layer)
    torch.testing.assert_close(y.view(tokens, D), y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(aux.loss, aux_ref.to(aux.loss.dtype), atol=1e-6, rtol=1e-5)
    for name in ours:
        if ours[name] is None or theirs[name] is None:
            assert ours[name] is None and (theirs[name] is None or not theirs[name].any()), name
        else:
            # atol scaled to the tensor: an entry that is a near-cancelling sum of ~100-sized fp32 terms
            # carries that sum's rounding, ~1e-5 of its terms, whatever its own size
            scale = theirs[name].abs().max().item()
            torch.testing.assert_close(ours[name], theirs[name], atol=1e-5 * max(1.0, scale), rtol=1e-4, msg=name)
    return aux, ours


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_xmoe_matches_token_loop(top_k):
    layer = make_layer("xmoe", top_k=top_k, xmoe_dim=4, xmoe_temperature=0.3)
    aux, g = compare(layer, RoutingContext())
    assert g["router.log_inv_temperature"].abs().item() > 0, "the temperature is learned"
    assert g["router.proj_RD"].abs().sum() > 0 and g["router.embed_ER"].abs().sum() > 0
    assert aux.stats["temperature"].item() == pytest.approx(0.3)


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_xmoe_as_the_v2_code_matches_token_loop(top_k):
    """Fixed temperature (a buffer, never trained) and a softmax over the top-K probabilities as weights."""
    layer = make_layer("xmoe", top_k=top_k, xmoe_dim=3, xmoe_temperature=0.2, xmoe_learn_temperature=False,
                       xmoe_gates="softmax_topk")
    aux, g = compare(layer, RoutingContext())
    assert "router.log_inv_temperature" not in g and "router.log_inv_temperature" in layer.state_dict()
    assert aux.stats["temperature"].item() == pytest.approx(0.2)
    assert g["router.proj_RD"].abs().sum() > 0


def test_xmoe_v2_preset_matches_token_loop():
    cfg = load_config("configs/tiny-cpu.yaml", preset_overrides("xmoe-v2", 8))
    assert (cfg.moe.baseline.xmoe_dim, cfg.moe.baseline.xmoe_gates) == (4, "softmax_topk")
    torch.manual_seed(0)
    compare(MoELayer(cfg.moe, D, vocab_size=V), RoutingContext())


@pytest.mark.parametrize("name", ["smoe-v1", "xmoe-v1", "stablemoe-v1"])
def test_v1_baseline_presets_have_no_balance_or_z_loss(name):
    cfg = load_config("configs/tiny-cpu.yaml", preset_overrides(name, 8))
    torch.manual_seed(0)
    layer = MoELayer(cfg.moe, D, vocab_size=V).train()
    tokens = torch.randint(0, V, (1, 7))
    _, aux = layer(torch.randn(1, 7, D), ctx=RoutingContext(step=0, total_steps=10, tokens_BS=tokens))
    assert aux.stats["weighted_balance_loss"].item() == 0.0
    assert aux.stats.get("weighted_z_loss", torch.zeros(())).item() == 0.0
    if name != "stablemoe-v1":  # StableMoE's own distillation stays: it is the method, not a balance loss
        assert aux.loss.item() == 0.0


def test_xmoe_logits_are_scaled_cosines_and_temperature_is_floored():
    torch.manual_seed(3)
    x, proj, emb = torch.randn(5, D), torch.randn(3, D), torch.randn(4, 3)
    logits = baselines.cosine_logits(x, proj, emb, torch.tensor([0.0]))  # tau = 1: plain cosines
    for t in range(5):
        for e in range(4):
            assert logits[t, e].item() == pytest.approx(F.cosine_similarity(proj @ x[t], emb[e], dim=0).item(), abs=1e-6)
    floored = baselines.cosine_logits(x, proj, emb, torch.tensor([math.log(1e6)]))  # tau 1e-6 -> 0.01
    torch.testing.assert_close(floored, logits * 100)
    # scale-invariant in the token and the expert embeddings
    torch.testing.assert_close(baselines.cosine_logits(3 * x, proj, 5 * emb, torch.tensor([0.0])), logits)


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("step", [0, 4, 7])
def test_stablemoe_matches_token_loop_in_both_stages(top_k, step):
    layer = make_layer("stablemoe", top_k=top_k, stablemoe_stage1=0.5, stablemoe_dim=5, stablemoe_distill_coef=0.7)
    aux, g = compare(layer, RoutingContext(step=step, total_steps=10))
    stage = 1 if step < 5 else 2
    assert aux.stats["stage"].item() == stage
    assert g["router.centroids_ED"].abs().sum() > 0  # the gates learn in both stages
    if stage == 1:
        assert g["router.distilled_embed_VR"].abs().sum() > 0 and g["router.distilled_centroids_ER"].abs().sum() > 0
    else:
        assert g["router.distilled_embed_VR"] is None and g["router.distilled_centroids_ER"] is None


def test_stablemoe_distillation_reaches_only_the_distilled_router():
    layer = make_layer("stablemoe", stablemoe_stage1=1.0, balance_coef=0.0)
    tokens = torch.randint(0, V, (1, 7))
    _, aux = layer(torch.randn(1, 7, D), ctx=RoutingContext(step=0, total_steps=10, tokens_BS=tokens))
    aux.loss.backward()
    assert layer.router.distilled_embed_VR.grad.abs().sum() > 0
    assert layer.router.centroids_ED.grad is None or not layer.router.centroids_ED.grad.any()
    assert layer.experts.w_in_EDF.grad is None


def test_stablemoe_balance_loss_brute_force():
    torch.manual_seed(2)
    scores = torch.randn(7, 4)
    chosen = torch.tensor([[0, 1], [0, 2], [0, 1], [3, 0], [1, 0], [2, 0], [0, 3]])
    counts = [sum(row.count(e) for row in chosen.tolist()) for e in range(4)]
    mean = 7 * 2 / 4
    want = sum((counts[e] - mean) / mean * torch.sigmoid(scores[t, e]) for t in range(7) for e in chosen[t].tolist()) / 14
    torch.testing.assert_close(baselines.stablemoe_balance_loss(scores, chosen), want)
    # its gradient lowers the gates of the over-loaded expert 0 and raises the under-loaded ones
    s = scores.clone().requires_grad_()
    baselines.stablemoe_balance_loss(s, chosen).backward()
    assert (s.grad[:, 0] >= 0).all() and s.grad[:, 0].sum() > 0 and s.grad[0, 1] < 0


def test_stablemoe_stage_two_routes_on_the_token_alone_and_stays_frozen():
    """A tiny LM trained with AdamW across the stage boundary: the distilled router moves in stage 1
    and is bitwise unchanged afterwards; in stage 2 a token id always goes to the same experts."""
    torch.manual_seed(0)
    moe = MoEConfig(num_experts=4, top_k=2, expert_hidden=16, router="stablemoe",
                    baseline=BaselineConfig(stablemoe_stage1=0.5, stablemoe_dim=4))
    model = TransformerLM(ModelConfig(d_model=16, n_layers=2, n_heads=2, seq_len=8, dense_hidden=32), moe, vocab_size=V)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    router = model.moe_layers[0].router
    snapshots = []
    for step in range(8):
        snapshots.append([p.detach().clone() for p in router.distilled_params()])
        tokens = torch.randint(0, V, (4, 8))
        out = model(tokens, torch.randint(0, V, (4, 8)), routing=RoutingContext(step=step, total_steps=8))
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    snapshots.append([p.detach().clone() for p in router.distilled_params()])
    assert not torch.equal(snapshots[0][0], snapshots[4][0]), "stage 1 trains the distilled router"
    for later in snapshots[5:]:
        for a, b in zip(snapshots[4], later):
            assert torch.equal(a, b), "stage 2 must not move the distilled router"
    # same token, different contexts -> same experts
    layer = model.moe_layers[1]
    tokens = torch.tensor([[3, 5, 3, 7, 3, 5, 1, 3]])
    ctx = RoutingContext(step=6, total_steps=8, tokens_BS=tokens)
    decision = layer.route(torch.randn(8, 16), ctx)
    again = layer.route(torch.randn(8, 16) * 5, ctx)
    assert torch.equal(decision.experts_TK, again.experts_TK)
    rows = {tuple(decision.experts_TK[i].tolist()) for i in range(8) if tokens[0, i] == 3}
    assert len(rows) == 1


@pytest.mark.parametrize("step,k_start,k_end", [(0, 1, 0), (3, 1, 0), (11, 1, 0), (5, 2, 4), (11, 2, 4)])
def test_smoe_dropout_matches_token_loop(step, k_start, k_end):
    layer = make_layer("smoe_dropout", dropout_k_start=k_start, dropout_k_end=k_end)
    aux, g = compare(layer, RoutingContext(step=step, total_steps=12))
    assert all(not n.startswith("router") for n in g), "the random router has no trainable parameters"
    assert aux.loss.item() == 0.0


def test_smoe_dropout_k_grows_linearly_over_training():
    ks = [baselines.smoe_dropout_k(s, 80, 1, 8) for s in range(80)]
    assert ks[0] == 1 and ks[-1] == 8 and ks == sorted(ks)
    assert [ks.count(k) for k in range(1, 9)] == [10] * 8  # each K gets an equal share of steps
    assert [baselines.smoe_dropout_k(s, 10, 2, 2) for s in range(10)] == [2] * 10


def test_smoe_dropout_router_is_never_trained_and_eval_uses_top_k():
    layer = make_layer("smoe_dropout", dropout_k_end=6)
    before = layer.router.weight_ED.clone()
    assert "router.weight_ED" in layer.state_dict() and not list(layer.router.parameters())
    opt = torch.optim.SGD(layer.parameters(), lr=1.0)
    y, aux = layer(torch.randn(1, 5, D), ctx=RoutingContext(step=11, total_steps=12))
    assert aux.stats["active_k"].item() == 6
    y.square().sum().backward()
    opt.step()
    assert torch.equal(layer.router.weight_ED, before)
    layer.eval()
    _, aux = layer(torch.randn(1, 5, D), ctx=RoutingContext(step=11, total_steps=12))
    assert aux.stats["active_k"].item() == layer.cfg.top_k
    compare(layer, RoutingContext(step=11, total_steps=12), train=False)


@pytest.mark.parametrize("router", ["smoe", "xmoe", "stablemoe", "smoe_dropout"])
@pytest.mark.parametrize("k", [1, 4])
def test_evaluation_k_override_matches_token_loop(router, k):
    layer = make_layer(router, top_k=2)
    compare(layer, RoutingContext(step=9, total_steps=10, top_k=k), train=False)


@pytest.mark.parametrize("top_k", [1, 2])
def test_switch_and_gshard_are_smoe_with_top_k(top_k):
    layer = make_layer("smoe", top_k=top_k)
    aux, _ = compare(layer, RoutingContext())
    assert aux.stats["expert_fraction"].sum().item() == pytest.approx(1.0)


@pytest.mark.parametrize("top_k", [1, 2])
def test_switch_raw_gates_match_token_loop_and_train_the_router(top_k):
    layer = make_layer("smoe", top_k=top_k, balance_coef=0.0, z_loss_coef=0.0, smoe_raw_gates=True)
    _, g = compare(layer, RoutingContext())
    raw = g["router.weight_ED"].abs().max().item()
    assert raw > 1e-3, "the task loss reaches the router through raw gates"
    if top_k == 1:  # renormalised top-1 gates are p/p = 1: no task gradient for the router (rounding only)
        renormalised = make_layer("smoe", top_k=1, balance_coef=0.0, z_loss_coef=0.0)
        _, g = compare(renormalised, RoutingContext())
        assert g["router.weight_ED"] is None or g["router.weight_ED"].abs().max().item() < 1e-6 * raw


def test_k_override_out_of_range_is_refused():
    layer = make_layer("xmoe")
    with pytest.raises(ValueError, match="top_k 7"):
        layer(torch.randn(1, 3, D), ctx=RoutingContext(top_k=7))


def test_dense_baseline_has_the_active_parameters_of_top_k_experts():
    from competesmoe.experiments.repro.grid import method_overrides

    base = load_config("configs/tiny-cpu.yaml")
    dense = load_config("configs/tiny-cpu.yaml", method_overrides("dense", base))
    moe_model = TransformerLM(base.model, base.moe, 256)
    dense_model = TransformerLM(dense.model, dense.moe, 256)
    per_expert = sum(p[0].numel() for p in moe_model.moe_layers[0].experts.parameters())
    dense_ffn = sum(p.numel() for p in dense_model.blocks[0].ffn.parameters())
    assert dense.model.layout == "dense" and dense_ffn == base.moe.top_k * per_expert


@pytest.mark.parametrize("override,needle", [
    ("moe.baseline.xmoe_dim=0", "moe.baseline.xmoe_dim"),
    ("moe.baseline.xmoe_temperature=0", "moe.baseline.xmoe_temperature"),
    ("moe.baseline.stablemoe_stage1=1.5", "moe.baseline.stablemoe_stage1"),
    ("moe.baseline.dropout_k_start=9", "moe.baseline.dropout_k_start"),
    ("moe.baseline.dropout_k_end=9", "moe.baseline.dropout_k_end"),
    ("moe.baseline.xmoe_dimm=3", "did you mean moe.baseline.xmoe_dim"),
    ("moe.router=xmo", "moe.router"),
    ("moe.router=stablemoe train.zero_stage=2", "needs train.zero_stage 0 and train.precision fp32"),
    ("moe.router=stablemoe train.precision=bf16", "needs train.zero_stage 0 and train.precision fp32"),
])
def test_baseline_config_errors_name_the_field(override, needle):
    with pytest.raises(ConfigError, match=None) as err:
        load_config("configs/tiny-cpu.yaml", override.split())
    assert needle in str(err.value)


# ---------------------------------------------------------------------------------------------
# Expert parallelism: the policies only pick indices and weights; the all-to-all is unchanged.

EP_ROUTERS = ["xmoe", "stablemoe", "smoe_dropout"]


def _ep_body(rank: int, world: int):
    import torch.distributed as dist

    from competesmoe.parallel.expert_parallel import AllToAllDispatcher
    from competesmoe.parallel.groups import ParallelGroups

    # EP = world: every rank holds a different slice of the experts (the EDP groups are single ranks)
    groups = ParallelGroups(world_size=world, rank=rank, ep_size=world, ep=dist.group.WORLD, edp=None,
                            dp=dist.group.WORLD)
    errors = []
    for router in EP_ROUTERS:
        for step in (1, 9):
            ref = make_layer(router, num_experts=4, top_k=2, stablemoe_stage1=0.5)
            ep = copy.deepcopy(ref)
            torch.manual_seed(7)
            xs = [torch.randn(1, 5 + 2 * r, D) for r in range(world)]
            probes = [torch.randn(1, 5 + 2 * r, D) for r in range(world)]
            toks = [torch.randint(0, V, (1, 5 + 2 * r)) for r in range(world)]
            ctxs = [RoutingContext(step=step, total_steps=10, tokens_BS=t) for t in toks]
            ref.train()
            outs = [ref(x, ctx=c) for x, c in zip(xs, ctxs)]
            sum((y * p).sum() + aux.loss for (y, aux), p in zip(outs, probes)).backward()
            e = 4 // world
            lo, hi = rank * e, (rank + 1) * e
            ep.experts.w_in_EDF = nn.Parameter(ref.experts.w_in_EDF.detach()[lo:hi].clone())
            ep.experts.w_out_EFD = nn.Parameter(ref.experts.w_out_EFD.detach()[lo:hi].clone())
            ep.dispatcher = AllToAllDispatcher(4, groups)
            ep.train()
            y, aux = ep(xs[rank], ctx=ctxs[rank])
            ((y * probes[rank]).sum() + aux.loss).backward()
            tag = f"{router} step {step}"
            if not torch.allclose(y, outs[rank][0], atol=1e-5):
                errors.append(f"{tag}: output differs")
            if not torch.allclose(aux.loss, outs[rank][1].loss, atol=1e-6):
                errors.append(f"{tag}: aux loss differs")
            for name, p in ep.router.named_parameters():
                if p.grad is None:
                    continue
                g = p.grad.clone()
                dist.all_reduce(g)
                if not torch.allclose(g, dict(ref.router.named_parameters())[name].grad, atol=1e-5, rtol=1e-4):
                    errors.append(f"{tag}: router grad {name} differs")
            for name in ("w_in_EDF", "w_out_EFD"):
                if not torch.allclose(getattr(ep.experts, name).grad, getattr(ref.experts, name).grad[lo:hi],
                                      atol=1e-5, rtol=1e-4):
                    errors.append(f"{tag}: expert grad {name} differs")
    return errors


def test_baselines_under_expert_parallelism_equal_one_process():
    errors = [err for rank_errors in run_on_ranks(_ep_body, 2, timeout=300) for err in rank_errors]
    assert not errors, "\n".join(errors)
