"""The planner's figures (parallel/cost.py, moe/flops.py) against what the code does.

In one process (quick): FLOPs and activation memory of tiny models of every layout, activation, precision and
activation-checkpointing mode, router steps and competing layers. On real gloo ranks (slow): a tiny model runs
forward and backward at world 2 and 4, EP 1, 2 and 4, on router steps and with layers
competing, in both competition gather modes; and one DeepSpeed training step at ZeRO 0, 1 and 2. Measured:
every c10d collective of the step (the benchmark's CommCounter: bytes sent to other ranks, group size), the
dispatchers' own byte counters by name, FLOPs (torch.utils.flop_counter.FlopCounterMode) and the peak of live
tensors (torch's MemTracker, as the benchmark measures memory). Checked:

  * bytes: the planner's collectives, call by call (kind and bytes), equal the counter's exactly; by name they
    equal the dispatchers' counters; DeepSpeed's gradient all-reduces equal the planner's per group size (to the
    byte a ring's integer division may lose per call), its ZeRO 1/2 weight all-gathers to the padding that
    DeepSpeed adds to each flat parameter group (at most 2 n - 1 elements each); what else is sent is scalars.
  * FLOPs within 5% (in fact equal) of FlopCounterMode's on the same step;
  * activation memory within 15% of the measured peak (parameters, buffers and gradients taken out).

The planner assumes balanced routing (it cannot know the router): the test routes so. Router steps choose, for
token t, experts (t K + k) mod E (the router's probabilities of them are the gates, so gradients flow); competition
steps use an affinity that makes the same experts win. FlopCounterMode has no formula for the CPU attention kernel;
it gets torch's own SDPA formula (forward) and twice that for the backward (the model-FLOP convention of
moe/flops.py: a flash kernel's recomputation is not counted).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from competesmoe.moe.config import CompetitionConfig, ModelConfig, MoEConfig
from competesmoe.moe.flops import training_flops_per_token
from competesmoe.parallel import cost
from competesmoe.parallel.ranks import RankFailed, RankTimeout, run_on_ranks

MODEL = ModelConfig(d_model=64, n_layers=2, n_heads=2, seq_len=32, layout="switch")
VOCAB, BATCH = 128, 8
AFFINITY = "test_balanced"
C10D_OP = {"all_to_all": "alltoall_base_", "all_gather": "_allgather_base_",
           "reduce_scatter": "_reduce_scatter_base_", "all_reduce": "allreduce_"}
"""The c10d op each kind of collective reaches (torch 2.13)."""
SCALAR_BYTES = 64
"""Collectives of at most this many bytes outside the planner's list are scalars (losses, norms, overflow flags)."""


def moe_config(gather: str = "scores") -> MoEConfig:
    return MoEConfig(num_experts=8, top_k=2, expert_hidden=64, activation="swiglu",
                     competition=CompetitionConfig(gather=gather, affinity=AFFINITY))


@dataclass(frozen=True)
class Case:
    ep: int
    compete: tuple[int, ...] = ()
    """MoE layers that compete in the step."""
    gather: str = "scores"
    zero_stage: int | None = None
    """None: the parallelized model's forward and backward; 0-2: one DeepSpeed training step."""

    @property
    def name(self) -> str:
        step = f"compete{''.join(map(str, self.compete))}-{self.gather}" if self.compete else "router"
        return f"ep{self.ep}-{step}" + ("" if self.zero_stage is None else f"-zero{self.zero_stage}")


CASES = {
    2: [Case(1), Case(2), Case(2, (1,)), Case(2, (1,), "outputs")],
    4: [Case(1, (1,)), Case(2, (0, 1)), Case(4), Case(4, (1,)), Case(4, (1,), "outputs"),
        Case(2, zero_stage=0), Case(2, zero_stage=1), Case(2, zero_stage=2)],
}
ITEMS = [(world, case) for world, cases in CASES.items() for case in cases]


# --------------------------------------------------------------------------------------------- balanced routing


def balanced_experts(num_tokens: int, top_k: int, num_experts: int, device) -> torch.Tensor:
    """experts_TK[t, k] = (t K + k) mod E: every expert gets the same share of a rank's assignments."""
    token_T1 = torch.arange(num_tokens, device=device).unsqueeze(1)
    return (token_T1 * top_k + torch.arange(top_k, device=device)) % num_experts


class BalancedRouter(nn.Module):
    """The layer's router, its choice replaced by `balanced_experts` (gates: the router's probabilities of them)."""

    def __init__(self, inner: nn.Module, num_experts: int):
        super().__init__()
        self.inner, self.num_experts = inner, num_experts

    def logits(self, x_TD, jitter=0.0):
        return self.inner.logits(x_TD, jitter)

    def forward(self, x_TD, ctx, default_k, training):
        decision = self.inner(x_TD, ctx, default_k, training)
        experts_TK = balanced_experts(x_TD.shape[0], default_k, self.num_experts, x_TD.device)
        return replace(decision, experts_TK=experts_TK, weights_TK=decision.probs_TE.gather(1, experts_TK))


def balanced_affinity(num_experts: int, top_k: int, tokens: int, ep_rank: int):
    """An affinity under which the experts of `balanced_experts` win: o is [local experts, EP group's tokens, D]
    (gather='scores') or [all experts, home tokens, D] (after gather='outputs', and at EP 1)."""

    def affinity(o):
        rows, cols = o.shape[:2]
        first = 0 if rows == num_experts else ep_rank * rows
        expert_R1 = torch.arange(first, first + rows, device=o.device).unsqueeze(1)
        token_1C = (torch.arange(cols, device=o.device) % tokens).unsqueeze(0)
        wins_RC = (expert_R1 - token_1C * top_k) % num_experts < top_k
        return wins_RC.float() + 1e-3 * F.softplus(o).mean(-1)  # the small term keeps the gradient path

    return affinity


# ------------------------------------------------------------------------------------------------- the ranks


def _cpu_attention_flops():
    """FlopCounterMode formulas for the CPU attention kernel: torch's SDPA count, backward twice the forward."""
    from torch.utils.flop_counter import sdpa_flop_count

    def forward(q, k, v, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(q, k, v)

    def backward(grad, q, k, v, *args, out_shape=None, **kwargs):
        return 2 * sdpa_flop_count(q, k, v)

    aten = torch.ops.aten
    return {aten._scaled_dot_product_flash_attention_for_cpu: forward,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: backward}


def _build(case: Case, groups, rank: int):
    from competesmoe.moe import routing
    from competesmoe.moe.model import TransformerLM
    from competesmoe.parallel.parallelize import parallelize

    moe = moe_config(case.gather)
    routing.AFFINITIES[AFFINITY] = balanced_affinity(moe.num_experts, moe.top_k, BATCH * MODEL.seq_len,
                                                     rank % case.ep)
    torch.manual_seed(0)
    model = parallelize(TransformerLM(MODEL, moe, VOCAB), groups, gather=case.gather)
    for layer in model.moe_layers:
        layer.router = BalancedRouter(layer.router, moe.num_experts)
    return model.train()


def _batch(rank: int, seq_len: int = MODEL.seq_len, batch: int = BATCH):
    gen = torch.Generator().manual_seed(rank)
    return [torch.randint(0, VOCAB, (batch, seq_len), generator=gen) for _ in range(2)]


def _peak_activation_bytes(model, compete: tuple[int, ...], rank: int = 0, batch: int = BATCH) -> int:
    """Peak of live tensors during forward + backward, parameters, buffers and gradients taken out (the
    planner counts those apart); the batch is made inside, the step's output held through backward (as the
    trainer holds it)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    model.zero_grad(set_to_none=True)
    tracker = MemTracker()
    tracker.track_external(model)
    with tracker:
        tokens, targets = _batch(rank, model.cfg.seq_len, batch)
        out = model(tokens, targets, frozenset(compete))
        out.loss.backward()
    peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    return peak["Total"] - sum(v for k, v in peak.items() if str(k).split(".")[-1] in ("PARAM", "BUFFER", "GRAD"))


def _model_step(case: Case, groups, rank: int) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from competesmoe.experiments.bench.comm_counter import CommCounter

    model = _build(case, groups, rank)
    tokens, targets = _batch(rank)
    counter, flops = CommCounter(), FlopCounterMode(display=False, custom_mapping=_cpu_attention_flops())
    with counter, flops:
        out = model(tokens, targets, frozenset(case.compete))
        out.loss.backward()
    own = Counter()
    for layer in model.moe_layers:
        own.update(getattr(layer.dispatcher, "comm_bytes", {}))
    return {"calls": counter.calls, "group_sizes": counter.group_sizes, "dispatchers": dict(own),
            "flops": flops.get_total_flops(), "memory": _peak_activation_bytes(model, case.compete, rank)}


def _engine_step(case: Case, groups, rank: int, world: int) -> dict:
    """One training step as the Trainer takes it: DeepSpeed engine with the trainer's config and parameter groups."""
    import os

    from competesmoe.experiments.bench.comm_counter import CommCounter
    from competesmoe.launcher.config import config_from_dict
    from competesmoe.launcher.trainer import deepspeed_config, param_groups
    from competesmoe.parallel.deepspeed.clipping import clip_grad_norm_ep
    from competesmoe.parallel.deepspeed.engine import make_engine

    cfg = config_from_dict({"train": {"zero_stage": case.zero_stage, "micro_batch_size": BATCH},
                            "parallel": {"expert_parallel_size": case.ep}})
    model = _build(case, groups, rank)
    os.environ.setdefault("LOCAL_RANK", str(rank))  # what a launcher sets; DeepSpeed's engine checks it
    engine, _, _ = make_engine(
        model, deepspeed_config(cfg), case.ep, model.moe_layers[0].num_experts,
        lambda g: torch.optim.AdamW(g, lr=1e-3), param_groups=param_groups(model, cfg.train.weight_decay))
    tokens, targets = _batch(rank)
    counter = CommCounter()
    with counter:
        out = engine(tokens, targets, frozenset(case.compete))
        engine.backward(out.loss)
        if case.zero_stage == 0:
            clip_grad_norm_ep(engine.module, cfg.train.grad_clip)
        engine.step()
    return {"calls": counter.calls, "group_sizes": counter.group_sizes}


def _worker(rank: int, world: int, cases: list[Case]) -> dict[str, dict]:
    from competesmoe.experiments.bench.moe_layer import init_deepspeed_comm
    from competesmoe.parallel.groups import build_groups

    init_deepspeed_comm()
    out = {}
    for case in cases:
        groups = build_groups(case.ep)
        out[case.name] = (_model_step(case, groups, rank) if case.zero_stage is None
                          else _engine_step(case, groups, rank, world))
    return out


@pytest.fixture(scope="module")
def measured():
    cache: dict[int, list[dict] | Exception] = {}

    def get(world: int) -> list[dict]:
        if world not in cache:
            try:
                cache[world] = run_on_ranks(_worker, world, args=(CASES[world],), timeout=600,
                                            env={"DS_ACCELERATOR": "cpu"})
            except (RankFailed, RankTimeout) as err:
                cache[world] = err  # one spawn per world size, also when it fails
        if isinstance(cache[world], Exception):
            raise cache[world]
        return cache[world]

    return get


# ---------------------------------------------------------------------------------------------- the checks


def _workload(case: Case) -> cost.Workload:
    return cost.Workload(MODEL, moe_config(case.gather), VOCAB, BATCH)


def _layout(case: Case, world: int) -> cost.Layout:
    return cost.Layout(world=world, ep=case.ep, zero_stage=case.zero_stage or 0, gpus_per_node=world)


def _planned_layer_collectives(case: Case, world: int) -> list[cost.Collective]:
    w, layout = _workload(case), _layout(case, world)
    return [c for layer in range(w.moe_layers)
            for c in (cost.competition_collectives(w, layout) if layer in case.compete
                      else cost.router_step_collectives(w, layout))]


def _split_calls(rank_result: dict) -> tuple[list[tuple[str, int, int]], list[tuple[str, int, int]]]:
    """(the step's calls other than all-reduces, its all-reduces) as (op, group size, bytes)."""
    calls = [(op, size, nbytes) for (op, nbytes), size in zip(rank_result["calls"], rank_result["group_sizes"])]
    return [c for c in calls if c[0] != "allreduce_"], [c for c in calls if c[0] == "allreduce_"]


@pytest.mark.slow  # spawns gloo ranks (and DeepSpeed engines): about 100 s for all cases on 2 cores
@pytest.mark.parametrize("world,case", [(w, c) for w, c in ITEMS if c.zero_stage is None],
                         ids=[f"world{w}-{c.name}" for w, c in ITEMS if c.zero_stage is None])
def test_layer_bytes_flops_and_memory_match_the_measurement(measured, world, case):
    planned = _planned_layer_collectives(case, world)
    want_calls = Counter((C10D_OP[c.kind], case.ep, round(c.bytes)) for c in planned)
    want_by_name = Counter()
    for c in planned:
        want_by_name[c.name] += round(c.bytes)
    w, layout = _workload(case), _layout(case, world)
    want_flops = w.tokens * training_flops_per_token(MODEL, w.moe, VOCAB, len(case.compete))
    want_memory = cost.activations(w, layout).peak(len(case.compete))
    for rank, result in enumerate(measured(world)):
        got = result[case.name]
        others, all_reduces = _split_calls(got)
        assert Counter(others) == want_calls and not all_reduces, f"rank {rank}: {Counter(others)} != {want_calls}"
        assert Counter({k: v for k, v in got["dispatchers"].items() if v}) == want_by_name, f"rank {rank}"
        assert got["flops"] == pytest.approx(want_flops, rel=0.05), f"rank {rank}"
        assert got["memory"] == pytest.approx(want_memory, rel=0.15), f"rank {rank}"


@pytest.mark.slow
@pytest.mark.parametrize("world,case", [(w, c) for w, c in ITEMS if c.zero_stage is not None],
                         ids=[f"world{w}-{c.name}" for w, c in ITEMS if c.zero_stage is not None])
def test_training_step_bytes_match_deepspeed(measured, world, case):
    """The whole step through DeepSpeed: the MoE layers' calls exactly, the gradient all-reduces per group to the
    byte a ring's integer division loses per call, ZeRO 1/2's weight all-gathers to DeepSpeed's padding."""
    w, layout = _workload(case), _layout(case, world)
    params = cost.param_counts(MODEL, w.moe, VOCAB)
    gradients = cost.gradient_collectives(w, layout, params)
    layers = Counter((C10D_OP[c.kind], case.ep, round(c.bytes)) for c in _planned_layer_collectives(case, world))
    groups = {"dp": layout.group_size("dp"), "edp": layout.group_size("edp")}
    for rank, result in enumerate(measured(world)):
        others, all_reduces = _split_calls(result[case.name])
        gathers = [c for c in others if c[0] == C10D_OP["all_gather"]]
        assert Counter(c for c in others if c[0] != C10D_OP["all_gather"]) == layers, f"rank {rank}"
        scalars = [c for c in all_reduces if c[2] <= SCALAR_BYTES]
        big = [c for c in all_reduces if c[2] > SCALAR_BYTES]
        for c in gradients:
            size = groups[c.group]
            if c.kind == "all_reduce":
                got = [b for op, n, b in big if n == size]
                assert sum(got) == pytest.approx(c.bytes, abs=len(got)), f"rank {rank} {c.name}: {got} vs {c.bytes}"
            else:
                got = sum(b for op, n, b in gathers if n == size)
                padding = 2 * 2 * size * w.act_bytes * (size - 1)  # <= 2 groups x (2 n - 1) elements, to n - 1 ranks
                assert c.bytes <= got <= c.bytes + padding, f"rank {rank} {c.name}: {got} vs {c.bytes}"
        if case.zero_stage == 0:
            assert not gathers, f"rank {rank}: ZeRO 0 all-gathers {gathers}"
        assert len(big) == sum(c.kind == "all_reduce" for c in gradients), f"rank {rank}: {big}"
        assert len(scalars) <= 8, f"rank {rank}: {scalars}"


# ----------------------------------------------------------------------------------------------- one process


@dataclass(frozen=True)
class Tiny:
    """A tiny single-process model: overrides of MODEL and of moe_config(), precision, checkpointing, competing."""

    model: tuple = ()
    moe: tuple = ()
    precision: str = "fp32"
    checkpointing: str = "none"
    compete: tuple[int, ...] = ()

    def configs(self) -> tuple[ModelConfig, MoEConfig]:
        moe = replace(moe_config(), **dict(self.moe))
        return replace(MODEL, **dict(self.model)), replace(moe, competition=CompetitionConfig())

    def build(self):
        from competesmoe.moe.model import TransformerLM
        from competesmoe.parallel.parallelize import apply_activation_checkpointing

        model_cfg, moe = self.configs()
        torch.manual_seed(0)
        model = TransformerLM(model_cfg, moe, VOCAB).train()
        apply_activation_checkpointing(model, self.checkpointing)
        return model.to(torch.bfloat16 if self.precision == "bf16" else torch.float32)

    def workload(self) -> cost.Workload:
        model_cfg, moe = self.configs()
        return cost.Workload(model_cfg, moe, VOCAB, BATCH, precision=self.precision,
                             activation_checkpointing=self.checkpointing)


SINGLE = {
    "router": Tiny(),
    "compete-last": Tiny(compete=(1,)),
    "gelu-k1-compete": Tiny(moe=(("activation", "gelu"), ("top_k", 1)), compete=(1,)),
    "bf16-e16-k4-compete": Tiny(moe=(("num_experts", 16), ("top_k", 4)), precision="bf16", compete=(1,)),
    "glam-learned-compete": Tiny(model=(("layout", "glam"), ("n_layers", 4), ("positions", "learned")),
                                 compete=(1,)),
    "dense-layout": Tiny(model=(("layout", "dense"),)),
    "recompute-experts-compete": Tiny(checkpointing="experts", compete=(1,)),
    "recompute-full-bf16-compete": Tiny(precision="bf16", checkpointing="full", compete=(1,)),
}


@pytest.mark.parametrize("name", list(SINGLE))
def test_flops_and_activation_memory_match_the_measurement(name):
    """FLOPs within 5% of FlopCounterMode's (model FLOPs plus what activation checkpointing recomputes; they come
    out equal), the activation peak within 15% of MemTracker's."""
    from torch.utils.flop_counter import FlopCounterMode

    tiny = SINGLE[name]
    model, w = tiny.build(), tiny.workload()
    tokens, targets = _batch(0)
    counter = FlopCounterMode(display=False, custom_mapping=_cpu_attention_flops())
    with counter:
        model(tokens, targets, frozenset(tiny.compete)).loss.backward()
    want_flops = w.tokens * cost.executed_flops_per_token(w, len(tiny.compete))
    assert counter.get_total_flops() == pytest.approx(want_flops, rel=0.05)
    if tiny.checkpointing == "none":
        assert want_flops == w.tokens * training_flops_per_token(w.model, w.moe, VOCAB, len(tiny.compete))
    want_memory = cost.activations(w, cost.Layout(1, 1, 0, 1)).peak(len(tiny.compete))
    assert _peak_activation_bytes(model, tiny.compete) == pytest.approx(want_memory, rel=0.15)


def test_param_counts_are_the_models():
    from competesmoe.moe.model import TransformerLM

    model_cfg, moe = Tiny(model=(("layout", "glam"), ("n_layers", 4))).configs()
    model = TransformerLM(model_cfg, moe, VOCAB)
    counts = cost.param_counts(model_cfg, moe, VOCAB)
    experts = sum(p.numel() for layer in model.moe_layers for p in layer.experts.parameters())
    assert (counts.dense, counts.experts) == (sum(p.numel() for p in model.parameters()) - experts, experts)
    assert counts.local(cost.Layout(world=8, ep=4, zero_stage=0, gpus_per_node=8)) == (counts.dense, experts / 4)


def test_layout_groups_and_where_their_bytes_go():
    layout = cost.Layout(world=32, ep=16, zero_stage=1, gpus_per_node=8)
    assert layout.group_ranks("ep") == list(range(16)) and layout.group_ranks("edp") == [0, 16]
    assert layout.spans_nodes("ep") and layout.spans_nodes("edp") and layout.spans_nodes("dp")
    assert layout.intra_node_share("ep") == pytest.approx(7 / 15)  # 7 of rank 0's 15 EP peers share its node
    inside = cost.Layout(world=32, ep=8, zero_stage=0, gpus_per_node=8)
    assert not inside.spans_nodes("ep") and inside.intra_node_share("ep") == 1.0
    a2a = cost.Collective("dispatch", "all_to_all", "ep", 1500.0)
    assert cost.split_bytes(a2a, layout) == pytest.approx((700.0, 800.0))
    ring = cost.Collective("grad.dense", "all_reduce", "dp", 1000.0)
    assert cost.split_bytes(ring, layout) == (875.0, 125.0)  # 4 of the ring's 32 hops cross nodes
    assert cost.split_bytes(ring, replace(layout, world=8, ep=8)) == (1000.0, 0.0)
    one_per_node = cost.Collective("grad.experts", "all_reduce", "edp", 1000.0)
    assert cost.split_bytes(one_per_node, layout) == (0.0, 1000.0)  # EDP ranks 0 and 16 sit in different nodes
