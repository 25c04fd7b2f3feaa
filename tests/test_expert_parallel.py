"""Expert-parallel transport (AllToAllDispatcher) against the single-process layer.

The pyramid: index math (no ranks); dispatch -> identity experts -> combine round trip on real gloo
ranks (rows, counts, gradients, bytes); the MoE layer with EP = 2 and 4 (and EP = 2 inside a world
of 4) against the LocalDispatcher layer run in one process, outputs and gradients.

Reference: every rank builds the same layer from one seed and all ranks' tokens. The reference runs
each rank's slice of tokens through the LocalDispatcher layer (auxiliary losses and capacity are per
rank, so per slice) and backpropagates  sum_r (y_r * R_r).sum() + aux_r.loss.  The EP run gives each
rank its own slice, its expert shard (new Parameters) and an AllToAllDispatcher, and backpropagates
its own term. Then: y_r, x_r.grad and aux_r.loss equal the reference slice; expert shard grads summed
over the EDP group equal the reference rows of those experts; router grads summed over all ranks
equal the reference router grad.

All distributed cases of one world size run in one spawn (process start-up dominates the runtime);
each case reports its own mismatches, and each case is its own pytest item.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
from torch import nn

from competesmoe.moe.config import CompetitionConfig, MoEConfig
from competesmoe.moe.layer import MoELayer
from competesmoe.parallel.expert_parallel import AllToAllDispatcher, group_token_index, local_expert_order
from competesmoe.parallel.groups import ParallelGroups
from competesmoe.parallel.ranks import RankFailed, RankTimeout, run_on_ranks

D_MODEL, HIDDEN = 16, 32
ATOL = RTOL = 1e-5


# ---------------------------------------------------------------------------------------------
# Index math (no ranks).


def test_local_expert_order_groups_by_local_expert_then_source():
    # 3 sources, 2 local experts: source-major blocks [s0e0 s0e1 s1e0 s1e1 s2e0 s2e1]
    counts_Pe = torch.tensor([[2, 1], [0, 3], [1, 0]])
    rows = ["s0e0a", "s0e0b", "s0e1a", "s1e1a", "s1e1b", "s1e1c", "s2e0a"]
    perm = local_expert_order(counts_Pe)
    assert [rows[i] for i in perm.tolist()] == ["s0e0a", "s0e0b", "s2e0a", "s0e1a", "s1e1a", "s1e1b", "s1e1c"]
    assert local_expert_order(torch.zeros(4, 2, dtype=torch.long)).numel() == 0


def test_group_token_index_skips_padding():
    assert group_token_index([2, 0, 3], 3).tolist() == [0, 1, 6, 7, 8]


# ---------------------------------------------------------------------------------------------
# Distributed cases.


@dataclass(frozen=True)
class Case:
    name: str
    num_experts: int = 8
    top_k: int = 2
    compete: bool = False
    gather: str = "scores"
    capacity_factor: float = 0.0
    setup: str = ""
    """'starve_first_rank': no token is routed to EP rank 0's experts; 'one_expert': every token to
    the last expert; 'silent_first_rank': EP rank 0's experts never win a competition."""
    affinity: str = "softplus_mean"
    activation: str = "gelu"
    eval_too: bool = False
    variant: str = "v2"
    """'v1': the v1 regime's step (sparse target with gradient, softmax weights, balance over all K winners)."""
    combine_gate: bool = False


CASES = [
    Case("router-k1-E8", top_k=1),
    Case("router-k2-E8", top_k=2, eval_too=True),
    Case("router-k8-E16", num_experts=16, top_k=8),
    Case("router-k2-swiglu", activation="swiglu"),
    Case("router-starve-first-rank", top_k=2, setup="starve_first_rank"),
    Case("router-one-expert", top_k=1, setup="one_expert"),
    Case("router-capacity", top_k=2, capacity_factor=0.75),
    Case("router-capacity-one-expert", top_k=1, capacity_factor=1.0, setup="one_expert"),
]
for _gather in ("scores", "outputs"):
    CASES += [
        Case(f"compete-{_gather}-k1-E8", top_k=1, compete=True, gather=_gather),
        Case(f"compete-{_gather}-k2-E8", top_k=2, compete=True, gather=_gather),
        Case(f"compete-{_gather}-k8-E16", num_experts=16, top_k=8, compete=True, gather=_gather),
        Case(f"compete-{_gather}-silent-first-rank", top_k=2, compete=True, gather=_gather,
             setup="silent_first_rank", affinity="l2_norm"),
        Case(f"compete-{_gather}-v1-k2-E8", top_k=2, compete=True, gather=_gather, affinity="l2_norm", variant="v1"),
        Case(f"compete-{_gather}-v1-combine-gate-k1-E8", top_k=1, compete=True, gather=_gather, affinity="l2_norm",
             variant="v1", combine_gate=True),
    ]
# EP = 2 inside a world of 4 (two EP groups, expert grads reduced over the EDP groups).
SUBGROUP_CASES = [c for c in CASES if c.name in ("router-k2-E8", "router-starve-first-rank", "compete-scores-k2-E8",
                                                 "compete-outputs-k2-E8", "compete-scores-v1-k2-E8")]


def tokens_per_rank(world: int) -> list[int]:
    return [6 + 3 * r for r in range(world)]  # uneven on purpose (padding in the competition gathers)


class _Mismatch:
    def __init__(self):
        self.errors: list[str] = []

    def close(self, what: str, got: torch.Tensor, want: torch.Tensor):
        if got.shape != want.shape:
            self.errors.append(f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}")
        elif not torch.allclose(got, want, atol=ATOL, rtol=RTOL):
            self.errors.append(f"{what}: max |diff| {(got - want).abs().max().item():.3g}")

    def true(self, what: str, ok: bool):
        if not ok:
            self.errors.append(what)


def _run_layer_case(case: Case, rank: int, world: int, groups) -> list[str]:
    check = _Mismatch()
    E, P = case.num_experts, groups.ep_size
    e = E // P
    cfg = MoEConfig(num_experts=E, top_k=case.top_k, expert_hidden=HIDDEN, activation=case.activation,
                    router="competesmoe", capacity_factor=case.capacity_factor,
                    competition=CompetitionConfig(gather=case.gather, affinity=case.affinity, hybrid_theta=0.5,
                                                  variant=case.variant, combine_gate=case.combine_gate,
                                                  router_loss_coef=0.3, diversity_coef=0.1, balance_coef=0.05))
    torch.manual_seed(1234)
    ref = MoELayer(cfg, D_MODEL)
    xs = [torch.randn(1, n, D_MODEL) for n in tokens_per_rank(world)]
    rs = [torch.randn(1, n, D_MODEL) for n in tokens_per_rank(world)]
    with torch.no_grad():
        if case.setup in ("starve_first_rank", "one_expert"):
            for x in xs:
                x[..., 0] = 3.0
            if case.setup == "starve_first_rank":
                ref.router.weight_ED[:e, 0] = -5.0  # EP rank 0 of every group holds experts [0, e)
            else:
                ref.router.weight_ED[E - 1, 0] = 5.0
        elif case.setup == "silent_first_rank":
            ref.experts.w_out_EFD[:e] *= 1e-3
    ep = copy.deepcopy(ref)

    # Reference: one process, every rank's slice separately, one backward of the summed loss.
    ref.train()
    xs_ref = [x.clone().requires_grad_() for x in xs]
    outs_ref = [ref(x, compete=case.compete) for x in xs_ref]
    sum((y * r).sum() + aux.loss for (y, aux), r in zip(outs_ref, rs)).backward()

    # Expert parallel: my tokens, my expert shard, the all-to-all transport.
    lo, hi = groups.ep_rank * e, (groups.ep_rank + 1) * e
    ep.experts.w_in_EDF = nn.Parameter(ref.experts.w_in_EDF.detach()[lo:hi].clone())
    ep.experts.w_out_EFD = nn.Parameter(ref.experts.w_out_EFD.detach()[lo:hi].clone())
    ep.dispatcher = AllToAllDispatcher(E, groups, gather=case.gather)
    ep.train()
    x = xs[rank].clone().requires_grad_()
    y, aux = ep(x, compete=case.compete)
    ((y * rs[rank]).sum() + aux.loss).backward()

    y_ref, aux_ref = outs_ref[rank]
    check.close("output y", y, y_ref)
    check.close("aux loss", aux.loss, aux_ref.loss)
    for key, value in aux_ref.stats.items():
        if key in aux.stats:
            check.close(f"stat {key}", aux.stats[key], value)
    check.close("input grad", x.grad, xs_ref[rank].grad)
    grad_router = ep.router.weight_ED.grad.clone()
    dist.all_reduce(grad_router, group=groups.dp)
    check.close("router grad (sum over ranks)", grad_router, ref.router.weight_ED.grad)
    for name in ("w_in_EDF", "w_out_EFD"):
        grad = getattr(ep.experts, name).grad.clone()
        dist.all_reduce(grad, group=groups.edp)
        check.close(f"expert {name} grad rows [{lo}:{hi}] (sum over EDP)", grad, getattr(ref.experts, name).grad[lo:hi])

    # The case tests what it says.
    check.true("competition did not run", bool(aux.stats["competed"]) == case.compete)
    frac = aux_ref.stats["expert_fraction"]
    if case.setup in ("starve_first_rank", "silent_first_rank"):
        check.true(f"setup: EP rank 0's experts were chosen ({frac.tolist()})", frac[:e].sum().item() == 0)
    if case.setup == "one_expert":
        check.true(f"setup: not all tokens to the last expert ({frac.tolist()})", frac[E - 1].item() == 1)
    if case.capacity_factor > 0:
        check.true("capacity dropped nothing", aux_ref.stats["dropped_fraction"].item() > 0)
    if case.compete:
        used = {k.split(".")[0] for k, v in ep.dispatcher.comm_bytes.items() if v > 0}
        want = {"gather_tokens", "gather_outputs"} if case.gather == "outputs" else \
            {"gather_tokens", "gather_scores", "gather_winners"}
        check.true(f"collectives used {sorted(used)}, expected {sorted(want)}", used == want)

    if case.eval_too:  # inference: no autograd, no backward collectives
        ref.eval()
        ep.eval()
        with torch.no_grad():
            check.close("eval output", ep(xs[rank])[0], ref(xs[rank])[0])
    return [f"{case.name}: {err}" for err in check.errors]


def _run_roundtrip(rank: int, world: int, groups, num_experts: int = 8, top_k: int = 2) -> list[str]:
    """dispatch -> identity experts -> combine on hand-built assignments: EP rank 1 of each group has
    no home tokens and its experts receive nothing; rows, counts, output, grads and bytes checked."""
    check = _Mismatch()
    E, P, ep_rank = num_experts, groups.ep_size, groups.ep_rank
    e = E // P
    group_first = rank - ep_rank  # EP groups are consecutive ranks
    gen = torch.Generator().manual_seed(7)
    home = [5, 0, 7, 3][:P] * (world // P)
    allowed = torch.tensor([g for g in range(E) if g // e != 1])
    xs, token_As, expert_As, weight_As = [], [], [], []
    for n in home:
        xs.append(torch.randn(n, D_MODEL, generator=gen))
        token_As.append(torch.arange(n).repeat_interleave(top_k))
        expert_As.append(allowed[torch.randint(len(allowed), (n * top_k,), generator=gen)])
        weight_As.append(torch.rand(n * top_k, generator=gen))
    R = torch.randn(home[rank], D_MODEL, generator=gen)

    d = AllToAllDispatcher(E, groups)
    keep = nn.Parameter(torch.zeros(()))
    x = xs[rank].clone().requires_grad_()
    x_ND, meta = d.dispatch(x, expert_As[rank].view(-1, top_k))

    want_rows, want_counts = [], []
    for j in range(e):
        g = ep_rank * e + j
        rows = [xs[s][token_As[s][expert_As[s] == g]] for s in range(group_first, group_first + P)]
        want_rows += rows
        want_counts.append(sum(r.shape[0] for r in rows))
    check.close("dispatched rows", x_ND.detach(), torch.cat(want_rows))
    check.true(f"counts {meta.counts} != {want_counts}", meta.counts == want_counts)

    # GroupedExperts with no rows returns zeros that do not depend on its input: mimic that.
    y_ND = x_ND * (1.0 + keep) if x_ND.shape[0] else x_ND.new_zeros(0, D_MODEL) + 0.0 * keep
    y = d.combine(y_ND, weight_As[rank].view(-1, top_k), meta)
    want_y = torch.zeros(home[rank], D_MODEL).index_add(0, token_As[rank],
                                                        xs[rank][token_As[rank]] * weight_As[rank].unsqueeze(1))
    check.close("combined output", y.detach(), want_y)
    (y * R).sum().backward()
    want_grad = torch.zeros(home[rank]).index_add(0, token_As[rank], weight_As[rank]).unsqueeze(1) * R
    check.close("input grad", x.grad, want_grad)

    sent_to_others = int((expert_As[rank] // e != ep_rank).sum())
    check.true(f"dispatch bytes {d.comm_bytes['dispatch']} != {sent_to_others * D_MODEL * 4}",
               d.comm_bytes["dispatch"] == sent_to_others * D_MODEL * 4)
    check.true("combine backward bytes != dispatch bytes",
               d.comm_bytes["combine.backward"] == d.comm_bytes["dispatch"])
    return [f"roundtrip: {err}" for err in check.errors]


def _grid(ep_size: int) -> ParallelGroups:
    """The EP x EDP grid of parallel/groups.py (EP groups = consecutive ranks), built on plain
    torch.distributed (build_groups goes through DeepSpeed's group registry). Collective."""
    world, rank = dist.get_world_size(), dist.get_rank()
    ep = edp = None
    for ranks in [list(range(s, s + ep_size)) for s in range(0, world, ep_size)]:
        group = dist.new_group(ranks)
        ep = group if rank in ranks else ep
    for ranks in [list(range(o, world, ep_size)) for o in range(ep_size)]:
        group = dist.new_group(ranks)
        edp = group if rank in ranks else edp
    return ParallelGroups(world_size=world, rank=rank, ep_size=ep_size, ep=ep, edp=edp, dp=dist.group.WORLD)


def _worker(rank: int, world: int, plans: list[tuple[int, list[Case]]]) -> dict[str, list[str]]:
    report = {}
    for ep_size, cases in plans:
        groups = _grid(ep_size)
        prefix = f"ep{ep_size}-of-{world}"
        report[f"{prefix}-roundtrip"] = _run_roundtrip(rank, world, groups)
        for case in cases:
            report[f"{prefix}-{case.name}"] = _run_layer_case(case, rank, world, groups)
    return report


PLANS = {
    2: [(2, CASES)],
    4: [(4, CASES), (2, SUBGROUP_CASES)],
}
ITEMS = [(world, f"ep{ep}-of-{world}-{name}") for world, plans in PLANS.items() for ep, cases in plans
         for name in ["roundtrip"] + [c.name for c in cases]]


@pytest.fixture(scope="module")
def reports():
    cache: dict[int, dict[str, list[str]] | Exception] = {}

    def get(world: int) -> dict[str, list[str]]:
        if world not in cache:
            try:
                per_rank = run_on_ranks(_worker, world, args=(PLANS[world],), timeout=120)
            except (RankFailed, RankTimeout) as err:
                cache[world] = err  # one spawn per world size, also when it fails
            else:
                merged: dict[str, list[str]] = {}
                for r, report in enumerate(per_rank):
                    for key, errors in report.items():
                        merged.setdefault(key, []).extend(f"rank {r}: {err}" for err in errors)
                cache[world] = merged
        if isinstance(cache[world], Exception):
            raise cache[world]
        return cache[world]

    return get


@pytest.mark.parametrize("world,item", ITEMS, ids=[item for _, item in ITEMS])
def test_expert_parallel_matches_single_process(reports, world, item):
    errors = reports(world)[item]
    assert not errors, "\n".join(errors)


# ---------------------------------------------------------------------------------------------
# The helper itself: a child's traceback reaches the test; a hang fails within the timeout.


def _raise_on_rank_one(rank, world):
    if rank == 1:
        raise ValueError("boom from rank one")
    return rank


def _hang_on_rank_zero(rank, world):
    if rank == 0:
        dist.barrier()  # rank 1 never joins
    else:
        import time
        time.sleep(60)


def test_run_on_ranks_reports_child_traceback():
    with pytest.raises(RankFailed, match="(?s)rank 1 of 2 failed.*ValueError: boom from rank one"):
        run_on_ranks(_raise_on_rank_one, 2, timeout=60)


def test_run_on_ranks_times_out_on_hang():
    with pytest.raises(RankTimeout):
        run_on_ranks(_hang_on_rank_zero, 2, timeout=5)
