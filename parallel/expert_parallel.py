"""Expert-parallel token transport: the experts of one MoE layer are sharded over an EP group.

`AllToAllDispatcher` implements `competesmoe.moe.dispatch.TokenDispatcher` with the semantics of the
single-process `LocalDispatcher`, so the MoE layer runs unchanged; only the rows move between ranks.

Router steps (dispatch / combine):
  1. sort this rank's kept assignments by global expert; EP rank r holds experts [r*e, (r+1)*e);
  2. exchange the per-expert counts (one all-to-all of E integers, on the device), then copy what the host
     must know (split sizes, rows per local expert) in one transfer: the step's one wait for the device;
  3. all-to-all the token rows with uneven splits; they arrive grouped by (source rank, local expert);
  4. permute them to (local expert, source rank) order for the grouped expert matmuls.
  combine undoes 4, 3 and 1 and sums each token's K weighted rows in fp32 on the home rank.

Competition steps (every expert answers every token of the EP group):
  gather_tokens   pads the home tokens to the group's largest count and all-gathers them -> x_GD;
  gather_scores   (gather='scores') all-to-alls the affinities so each home rank holds scores_TE
                  over all E experts for its own tokens (T x E floats per rank);
  gather_winners  all-gathers the home ranks' winners (integers), then every expert rank sends
                  back the (token, k) rows whose winner it holds (uneven all-to-all) -> o_TKD;
  gather_outputs  (gather='outputs', the design card's literal variant) all-to-alls the expert
                  outputs themselves: each home rank gets o_ETD for its tokens and from then on the
                  competition is local (meta.outputs_at_home: gather_scores / gather_winners move nothing).

Every collective goes through competesmoe.parallel.collectives (the device checked; torch's functional
collectives, so selective activation checkpointing keeps their outputs). Every data tensor crosses ranks through
an autograd.Function whose backward runs the transposed collective, so gradients reach the expert ranks and the home ranks. Counts and indices are plain
integer tensors. Every rank enters the same collectives in the same order, also with zero rows.

Shape legend (as in moe/dispatch.py): T home tokens, D d_model, E global experts, e local experts,
P EP group size, K choices per token, A = T*K assignments (token-major), S the kept ones this rank sends,
N rows received by this rank's experts
(sorted by local expert), G tokens of the whole EP group (every local expert answers them).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from competesmoe.moe.dispatch import rows_of_assignments, select_winners, sort_by_expert, unsort, weighted_sum
from competesmoe.moe.routing import count_per_expert
from competesmoe.parallel import collectives
from competesmoe.parallel.groups import ParallelGroups

GATHER_MODES = ("scores", "outputs")


# ---------------------------------------------------------------------------------------------
# Differentiable collectives (forward and backward are each one collective; bytes are counted as
# rows this rank sends to the *other* ranks, the self chunk never crosses the wire).


def _bytes_to_others(rows_per_rank: list[int], row_bytes: int, rank: int) -> int:
    return (sum(rows_per_rank) - rows_per_rank[rank]) * row_bytes


def _counting(stats) -> bool:
    """Count a forward collective's bytes: there is a counter, and this is no recomputation inside backward
    (activation checkpointing 'full' takes the collective's output from forward; nothing crosses the wire)."""
    return stats is not None and torch._C._current_graph_task_id() == -1


class _AllToAll(torch.autograd.Function):
    """Uneven all-to-all along dim 0; backward sends the gradients back the same way.

    `companion` is an optional tensor that gets a zero gradient: it ties a tensor whose own
    backward holds a collective (the dispatched rows) to this one, so that collective's backward
    runs on every rank even where nothing consumed the rows (an expert rank that received none)."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group, rank, stats, key, companion):
        ctx.out_splits, ctx.in_splits, ctx.group, ctx.rank, ctx.stats, ctx.key = (
            out_splits, in_splits, group, rank, stats, key)
        ctx.companion_shape = None if companion is None else companion.shape
        out = collectives.all_to_all(x, out_splits, in_splits, group, x.device)
        if _counting(stats):
            stats[key] += _bytes_to_others(in_splits, math.prod(x.shape[1:]) * x.element_size(), rank)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        grad_in = collectives.all_to_all(grad_out, ctx.in_splits, ctx.out_splits, ctx.group, grad_out.device)
        if ctx.stats is not None:
            ctx.stats[ctx.key + ".backward"] += _bytes_to_others(
                ctx.out_splits, math.prod(grad_out.shape[1:]) * grad_out.element_size(), ctx.rank)
        companion_grad = None
        if ctx.companion_shape is not None:
            companion_grad = grad_out.new_zeros(ctx.companion_shape)
        return grad_in, None, None, None, None, None, None, companion_grad


class _AllGather(torch.autograd.Function):
    """Equal-size all-gather along dim 0; backward reduce-scatters (sums) the gradients."""

    @staticmethod
    def forward(ctx, x, group, size, stats, key):
        ctx.group, ctx.size, ctx.stats, ctx.key = group, size, stats, key
        out = collectives.all_gather(x, group, x.device)
        if _counting(stats):
            stats[key] += (size - 1) * x.numel() * x.element_size()
        return out

    @staticmethod
    def backward(ctx, grad_out):
        grad_in = collectives.reduce_scatter(grad_out, ctx.group, grad_out.device)
        if ctx.stats is not None:
            ctx.stats[ctx.key + ".backward"] += (ctx.size - 1) * grad_in.numel() * grad_in.element_size()
        return grad_in, None, None, None, None


# ---------------------------------------------------------------------------------------------
# Index math (pure functions, unit-tested without ranks).


def local_expert_order(recv_counts_Pe: torch.Tensor, num_rows: int | None = None) -> torch.Tensor:
    """Rows arrive grouped by source rank, then local expert (recv_counts_Pe[s, j] rows each).
    Returns the stable permutation perm_N such that rows[perm_N] are grouped by local expert,
    then source rank (each source keeps its own order). num_rows: their total when the host knows it (then
    nothing waits for the device)."""
    num_sources, num_local = recv_counts_Pe.shape
    expert_of_block = torch.arange(num_local, device=recv_counts_Pe.device).repeat(num_sources)
    expert_N = expert_of_block.repeat_interleave(recv_counts_Pe.reshape(-1), output_size=num_rows)
    return torch.argsort(expert_N, stable=True)


def group_token_index(tokens_per_rank: list[int], max_tokens: int, device=None) -> torch.Tensor:
    """Rows of the valid tokens in a padded all-gather [P * max_tokens] (rank-major)."""
    return torch.cat([torch.arange(r * max_tokens, r * max_tokens + n, device=device)
                      for r, n in enumerate(tokens_per_rank)])


def first_true(mask: torch.Tensor, count: int) -> torch.Tensor:
    """The flat indices of mask's true entries in increasing order, given how many there are (torch.nonzero
    without waiting for the device to tell the count)."""
    return torch.argsort((~mask.reshape(-1)).to(torch.int8), stable=True)[:count]


# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AllToAllDispatchMeta:
    """What combine needs to undo dispatch."""

    order_S: torch.Tensor
    """This rank's kept assignments sorted by global expert (= by destination rank): the rows it sent."""
    experts_TK: torch.Tensor
    """The routing (its shape gives T and K)."""
    send_splits: list[int]
    """Rows this rank sent to each EP rank."""
    recv_splits: list[int]
    """Rows this rank received from each EP rank."""
    perm_N: torch.Tensor
    """received_rows[perm_N] is grouped by local expert (then source rank)."""
    counts_e: torch.Tensor
    """Tokens per local expert, in the order the experts see them (device)."""
    counts: list[int]
    """The same on the host."""
    received_ND: torch.Tensor
    """The rows as received (source-major); combine ties its backward to this one's."""


@dataclass(frozen=True)
class AllToAllCompetitionMeta:
    """The EP group's tokens as gathered by gather_tokens."""

    num_tokens: int
    """This rank's home tokens T."""
    tokens_per_rank: list[int]
    """Home tokens of each EP rank; x_GD is their concatenation in rank order."""
    tokens_per_rank_P: torch.Tensor
    """The same on the device."""
    max_tokens: int
    """Padded rows per rank in the all-gathers."""
    outputs_at_home: bool = False
    """gather='outputs' after gather_outputs: every expert's outputs for the home tokens are here (o_ETD), so
    scores and winners need no further communication."""


class AllToAllDispatcher:
    """Experts sharded contiguously over an EP group; tokens travel by uneven all-to-all.

    `ep` is a ParallelGroups (its `ep` group, `ep_rank`, `ep_size` are used) or a process group
    (None = the default group). `gather` is moe.competition.gather ('scores' | 'outputs').
    `comm_bytes` counts the bytes this rank sends to other ranks per collective (forward, and
    '<name>.backward'); a benchmark may clear it between steps.

    The host learns split sizes once per exchange: a router step waits for the device once (the counts, after
    they were exchanged on the device), a competition step once in gather_tokens and, with gather='scores',
    once in gather_winners.
    """

    def __init__(self, num_experts: int, ep: ParallelGroups | dist.ProcessGroup | None = None,
                 gather: str = "scores"):
        if isinstance(ep, ParallelGroups):
            self.group, self.ep_rank, self.ep_size = ep.ep, ep.ep_rank, ep.ep_size
        else:
            self.group = ep
            self.ep_rank, self.ep_size = dist.get_rank(group=ep), dist.get_world_size(group=ep)
        if num_experts % self.ep_size:
            raise ValueError(f"num_experts ({num_experts}) must be divisible by the EP size ({self.ep_size})")
        if gather not in GATHER_MODES:
            raise ValueError(f"gather = {gather!r} is not one of {GATHER_MODES}")
        self.gather = gather
        self.num_experts = num_experts
        self.num_local_experts = num_experts // self.ep_size
        self.first_local_expert = self.ep_rank * self.num_local_experts
        self.comm_bytes: dict[str, int] = defaultdict(int)

    def _count(self, key: str, nbytes: int) -> None:
        if _counting(self.comm_bytes):
            self.comm_bytes[key] += nbytes

    # Router steps ---------------------------------------------------------------------------
    def dispatch(self, x_TD: torch.Tensor, experts_TK: torch.Tensor, keep_TK: torch.Tensor | None = None):
        P, e = self.ep_size, self.num_local_experts
        order_A, counts_E = sort_by_expert(experts_TK, keep_TK, self.num_experts)
        # [s * e + j]: rows from source s for local expert j
        recv_counts = collectives.all_to_all(counts_E, None, None, self.group, x_TD.device)
        self._count("dispatch.counts", (P - 1) * e * counts_E.element_size())
        recv_counts_Pe = recv_counts.view(P, e)
        counts_e = recv_counts_Pe.sum(0)
        # What the host must know, in one copy: rows to send to and receive from each rank, rows per local expert.
        host = torch.cat([counts_E.view(P, e).sum(1), recv_counts_Pe.sum(1), counts_e]).tolist()
        send_splits, recv_splits, counts = host[:P], host[P:2 * P], host[2 * P:]
        order_S = order_A[:sum(send_splits)] if keep_TK is not None else order_A

        received_ND = _AllToAll.apply(rows_of_assignments(x_TD, order_S, experts_TK.shape[1]), recv_splits,
                                      send_splits, self.group, self.ep_rank, self.comm_bytes, "dispatch", None)
        perm_N = local_expert_order(recv_counts_Pe, sum(recv_splits))
        meta = AllToAllDispatchMeta(order_S=order_S, experts_TK=experts_TK, send_splits=send_splits,
                                    recv_splits=recv_splits, perm_N=perm_N, counts_e=counts_e, counts=counts,
                                    received_ND=received_ND)
        return received_ND[perm_N], meta

    def combine(self, y_ND: torch.Tensor, weights_TK: torch.Tensor, meta: AllToAllDispatchMeta):
        companion = meta.received_ND if meta.received_ND.requires_grad else None
        y_SD = _AllToAll.apply(unsort(y_ND, meta.perm_N), meta.send_splits, meta.recv_splits, self.group,
                               self.ep_rank, self.comm_bytes, "combine", companion)
        return weighted_sum(y_SD, meta.order_S, weights_TK)

    # Competition steps ----------------------------------------------------------------------
    def gather_tokens(self, x_TD: torch.Tensor):
        """The EP group's tokens, rank-major: x_GD (G = sum of the ranks' token counts)."""
        num_tokens = x_TD.shape[0]
        count = torch.full((1,), num_tokens, dtype=torch.int64, device=x_TD.device)
        tokens_per_rank_P = collectives.all_gather(count, self.group, x_TD.device)
        self._count("gather_tokens.counts", (self.ep_size - 1) * count.element_size())
        tokens_per_rank = tokens_per_rank_P.tolist()
        max_tokens = max(tokens_per_rank)
        meta = AllToAllCompetitionMeta(num_tokens=num_tokens, tokens_per_rank=tokens_per_rank,
                                       tokens_per_rank_P=tokens_per_rank_P, max_tokens=max_tokens)

        x_pad = torch.nn.functional.pad(x_TD, (0, 0, 0, max_tokens - num_tokens))
        x_GD = _AllGather.apply(x_pad, self.group, self.ep_size, self.comm_bytes, "gather_tokens")
        if any(n != max_tokens for n in tokens_per_rank):
            x_GD = x_GD[group_token_index(tokens_per_rank, max_tokens, x_TD.device)]
        return x_GD, meta

    def gather_outputs(self, outputs_eGD: torch.Tensor, meta):
        """gather='outputs': each home rank receives every expert's outputs for its own tokens
        (o_ETD, returned in the place of o_eGD with meta.outputs_at_home set, so the rest of the competition
        step is the single-process one). gather='scores': nothing moves here."""
        if self.gather != "outputs":
            return outputs_eGD, meta
        e, P, T = self.num_local_experts, self.ep_size, meta.num_tokens
        D = outputs_eGD.shape[-1]
        send_GX = outputs_eGD.transpose(0, 1).reshape(-1, e * D)  # rank-major tokens: chunk r goes to r
        recv = _AllToAll.apply(send_GX, [T] * P, meta.tokens_per_rank, self.group, self.ep_rank,
                               self.comm_bytes, "gather_outputs", None)
        outputs_ETD = recv.view(P, T, e, D).permute(0, 2, 1, 3).reshape(P * e, T, D)
        return outputs_ETD, replace(meta, outputs_at_home=True)

    def gather_scores(self, scores_Ge: torch.Tensor, meta) -> torch.Tensor:
        """Every expert's affinity for each home token: scores_TE (columns in global expert order)."""
        if meta.outputs_at_home:  # scores_Ge is already scores_TE
            return scores_Ge
        if self.gather == "outputs":
            raise RuntimeError("gather='outputs' needs the MoE layer to call dispatcher.gather_outputs(outputs_eGD, "
                               "meta) right after experts.forward_all")
        P, T, e = self.ep_size, meta.num_tokens, self.num_local_experts
        # scores_Ge is rank-major in G, so it is already the send buffer: chunk r -> home rank r.
        recv = _AllToAll.apply(scores_Ge, [T] * P, meta.tokens_per_rank, self.group, self.ep_rank,
                               self.comm_bytes, "gather_scores", None)
        return recv.view(P, T, e).transpose(0, 1).reshape(T, P * e)

    def gather_winners(self, outputs_eGD: torch.Tensor, winners_TK: torch.Tensor, meta):
        """The winners' outputs for each home token: outputs_TKD."""
        if meta.outputs_at_home:
            return select_winners(outputs_eGD, winners_TK)
        P, T, e = self.ep_size, meta.num_tokens, self.num_local_experts
        K, D = winners_TK.shape[1], outputs_eGD.shape[-1]
        device = winners_TK.device

        # Every rank learns every home rank's winners (integers, padded to the group's max).
        w_pad = torch.nn.functional.pad(winners_TK, (0, 0, 0, meta.max_tokens - T), value=-1)
        all_w = collectives.all_gather(w_pad, self.group, device)
        self._count("gather_winners.winners", (P - 1) * w_pad.numel() * w_pad.element_size())
        winners_GK = all_w[group_token_index(meta.tokens_per_rank, meta.max_tokens, device)]

        # As an expert rank: the (g, k) whose winner is mine, row-major, hence grouped by home rank
        # and in each home rank's (t, k) order. As a home rank: my (t, k) grouped by the rank that owns the winner.
        mine_GK = winners_GK // e == self.ep_rank
        home_G = torch.arange(P, device=device).repeat_interleave(meta.tokens_per_rank_P, output_size=sum(
            meta.tokens_per_rank))
        send_P = torch.zeros(P, dtype=torch.int64, device=device).index_add_(0, home_G, mine_GK.sum(1))
        owner_A = winners_TK.reshape(-1) // e
        host = torch.cat([send_P, count_per_expert(owner_A, P)]).tolist()  # the one wait for the device
        send_splits, recv_splits = host[:P], host[P:]

        gk_S = first_true(mine_GK, sum(send_splits))
        g_S, k_S = gk_S // K, gk_S % K
        rows_SD = outputs_eGD[winners_GK[g_S, k_S] - self.first_local_expert, g_S]
        order_A = torch.argsort(owner_A, stable=True)
        recv_AD = _AllToAll.apply(rows_SD, recv_splits, send_splits, self.group, self.ep_rank,
                                  self.comm_bytes, "gather_winners", None)
        return unsort(recv_AD, order_A).view(T, K, D)
