"""Expert-parallel token transport: the experts of one MoE layer are sharded over an EP group.

`AllToAllDispatcher` implements `competesmoe.moe.dispatch.TokenDispatcher` with the semantics of the
single-process `LocalDispatcher`, so the MoE layer runs unchanged; only the rows move between ranks.

Router steps (dispatch / combine):
  1. sort this rank's kept assignments by global expert; EP rank r holds experts [r*e, (r+1)*e);
  2. exchange the per-expert counts (one all-to-all of E integers);
  3. all-to-all the token rows with uneven splits; they arrive grouped by (source rank, local expert);
  4. permute them to (local expert, source rank) order for the grouped expert matmuls.
  combine undoes 4, 3 and 1 and does the weighted scatter-add on the home rank.

Competition steps (every expert answers every token of the EP group):
  gather_tokens   pads the home tokens to the group's largest count and all-gathers them -> x_GD;
  gather_scores   (gather='scores') all-to-alls the affinities so each home rank holds scores_TE
                  over all E experts for its own tokens (T x E floats per rank);
  gather_winners  all-gathers the home ranks' winners (integers), then every expert rank sends
                  back the (token, k) rows whose winner it holds (uneven all-to-all) -> o_TKD;
  gather_outputs  (gather='outputs', the design card's literal variant) all-to-alls the expert
                  outputs themselves: each home rank gets o_ETD for its tokens and from then on the
                  competition is local (meta.outputs_at_home: gather_scores / gather_winners move nothing).

Every data tensor crosses ranks through an autograd.Function whose backward runs the transposed
collective, so gradients reach the expert ranks and the home ranks. Counts and indices are plain
integer tensors. Every rank enters the same collectives in the same order, also with zero rows.

Shape legend (as in moe/dispatch.py): T home tokens, D d_model, E global experts, e local experts,
P EP group size, K choices per token, A kept assignments, N rows received by this rank's experts
(sorted by local expert), G tokens of the whole EP group (every local expert answers them).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from competesmoe.moe.dispatch import select_winners, unsort, weighted_scatter
from competesmoe.parallel.groups import ParallelGroups

GATHER_MODES = ("scores", "outputs")

# torch 2.13 renamed the tensor forms (the old names warn); older torch has only the old ones.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


# ---------------------------------------------------------------------------------------------
# Differentiable collectives (forward and backward are each one collective; bytes are counted as
# rows this rank sends to the *other* ranks, the self chunk never crosses the wire).


def _bytes_to_others(rows_per_rank: list[int], row_bytes: int, rank: int) -> int:
    return (sum(rows_per_rank) - rows_per_rank[rank]) * row_bytes


class _AllToAll(torch.autograd.Function):
    """Uneven all_to_all_single along dim 0; backward sends the gradients back the same way.

    `companion` is an optional tensor that gets a zero gradient: it ties a tensor whose own
    backward holds a collective (the dispatched rows) to this one, so that collective's backward
    runs on every rank even where nothing consumed the rows (an expert rank that received none)."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group, rank, stats, key, companion):
        ctx.out_splits, ctx.in_splits, ctx.group, ctx.rank, ctx.stats, ctx.key = (
            out_splits, in_splits, group, rank, stats, key)
        ctx.companion_shape = None if companion is None else companion.shape
        out = _all_to_all(x, out_splits, in_splits, group)
        if stats is not None:
            stats[key] += _bytes_to_others(in_splits, math.prod(x.shape[1:]) * x.element_size(), rank)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        grad_in = _all_to_all(grad_out, ctx.in_splits, ctx.out_splits, ctx.group)
        if ctx.stats is not None:
            ctx.stats[ctx.key + ".backward"] += _bytes_to_others(
                ctx.out_splits, math.prod(grad_out.shape[1:]) * grad_out.element_size(), ctx.rank)
        companion_grad = None
        if ctx.companion_shape is not None:
            companion_grad = grad_out.new_zeros(ctx.companion_shape)
        return grad_in, None, None, None, None, None, None, companion_grad


def _all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    x = x.contiguous()
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x, output_split_sizes=out_splits, input_split_sizes=in_splits, group=group)
    return out


class _AllGather(torch.autograd.Function):
    """Equal-size all-gather along dim 0; backward reduce-scatters (sums) the gradients."""

    @staticmethod
    def forward(ctx, x, group, size, stats, key):
        ctx.group, ctx.size, ctx.stats, ctx.key = group, size, stats, key
        x = x.contiguous()
        out = x.new_empty((size * x.shape[0], *x.shape[1:]))
        _all_gather(out, x, group=group)
        if stats is not None:
            stats[key] += (size - 1) * x.numel() * x.element_size()
        return out

    @staticmethod
    def backward(ctx, grad_out):
        grad_out = grad_out.contiguous()
        grad_in = grad_out.new_empty((grad_out.shape[0] // ctx.size, *grad_out.shape[1:]))
        _reduce_scatter(grad_in, grad_out, op=dist.ReduceOp.SUM, group=ctx.group)
        if ctx.stats is not None:
            ctx.stats[ctx.key + ".backward"] += (ctx.size - 1) * grad_in.numel() * grad_in.element_size()
        return grad_in, None, None, None, None


# ---------------------------------------------------------------------------------------------
# Index math (pure functions, unit-tested without ranks).


def local_expert_order(recv_counts_Pe: torch.Tensor) -> torch.Tensor:
    """Rows arrive grouped by source rank, then local expert (recv_counts_Pe[s, j] rows each).
    Returns the stable permutation perm_N such that rows[perm_N] are grouped by local expert,
    then source rank (each source keeps its own order)."""
    num_sources, num_local = recv_counts_Pe.shape
    expert_of_block = torch.arange(num_local, device=recv_counts_Pe.device).repeat(num_sources)
    expert_N = expert_of_block.repeat_interleave(recv_counts_Pe.reshape(-1))
    return torch.argsort(expert_N, stable=True)


def group_token_index(tokens_per_rank: list[int], max_tokens: int, device=None) -> torch.Tensor:
    """Rows of the valid tokens in a padded all-gather [P * max_tokens] (rank-major)."""
    return torch.cat([torch.arange(r * max_tokens, r * max_tokens + n, device=device)
                      for r, n in enumerate(tokens_per_rank)])


# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AllToAllDispatchMeta:
    """What combine needs to undo dispatch."""

    order_A: torch.Tensor
    """Permutation that sorts this rank's assignments by global expert (= by destination rank)."""
    token_A: torch.Tensor
    """Home token of each assignment (original assignment order)."""
    send_splits: list[int]
    """Rows this rank sent to each EP rank."""
    recv_splits: list[int]
    """Rows this rank received from each EP rank."""
    perm_N: torch.Tensor
    """received_rows[perm_N] is grouped by local expert (then source rank)."""
    counts: list[int]
    """Tokens per local expert, in the order the experts see them."""
    received_ND: torch.Tensor
    """The rows as received (source-major); combine ties its backward to this one's."""


@dataclass(frozen=True)
class AllToAllCompetitionMeta:
    """The EP group's tokens as gathered by gather_tokens."""

    num_tokens: int
    """This rank's home tokens T."""
    tokens_per_rank: list[int]
    """Home tokens of each EP rank; x_GD is their concatenation in rank order."""
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

    # Router steps ---------------------------------------------------------------------------
    def dispatch(self, x_TD: torch.Tensor, token_A: torch.Tensor, expert_A: torch.Tensor):
        P, e = self.ep_size, self.num_local_experts
        order_A = torch.argsort(expert_A, stable=True)
        counts_E = torch.bincount(expert_A, minlength=self.num_experts)
        recv_counts = torch.empty_like(counts_E)  # [s * e + j]: rows from source s for local expert j
        dist.all_to_all_single(recv_counts, counts_E, group=self.group)
        self.comm_bytes["dispatch.counts"] += (P - 1) * e * counts_E.element_size()
        recv_counts_Pe = recv_counts.view(P, e)
        send_splits = counts_E.view(P, e).sum(1).tolist()
        recv_splits = recv_counts_Pe.sum(1).tolist()

        received_ND = _AllToAll.apply(x_TD[token_A[order_A]], recv_splits, send_splits, self.group,
                                      self.ep_rank, self.comm_bytes, "dispatch", None)
        perm_N = local_expert_order(recv_counts_Pe)
        meta = AllToAllDispatchMeta(order_A=order_A, token_A=token_A, send_splits=send_splits,
                                    recv_splits=recv_splits, perm_N=perm_N,
                                    counts=recv_counts_Pe.sum(0).tolist(), received_ND=received_ND)
        return received_ND[perm_N], meta

    def combine(self, y_ND: torch.Tensor, weight_A: torch.Tensor, meta: AllToAllDispatchMeta, num_tokens: int):
        companion = meta.received_ND if meta.received_ND.requires_grad else None
        y_AD = _AllToAll.apply(unsort(y_ND, meta.perm_N), meta.send_splits, meta.recv_splits, self.group,
                               self.ep_rank, self.comm_bytes, "combine", companion)
        return weighted_scatter(unsort(y_AD, meta.order_A), weight_A, meta.token_A, num_tokens)

    # Competition steps ----------------------------------------------------------------------
    def gather_tokens(self, x_TD: torch.Tensor):
        """The EP group's tokens, rank-major: x_GD (G = sum of the ranks' token counts)."""
        num_tokens = x_TD.shape[0]
        count = torch.tensor([num_tokens], dtype=torch.int64, device=x_TD.device)
        tokens_per_rank = count.new_empty(self.ep_size)
        _all_gather(tokens_per_rank, count, group=self.group)
        self.comm_bytes["gather_tokens.counts"] += (self.ep_size - 1) * count.element_size()
        tokens_per_rank = tokens_per_rank.tolist()
        max_tokens = max(tokens_per_rank)
        meta = AllToAllCompetitionMeta(num_tokens=num_tokens, tokens_per_rank=tokens_per_rank, max_tokens=max_tokens)

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
        all_w = w_pad.new_empty((P * meta.max_tokens, K))
        _all_gather(all_w, w_pad.contiguous(), group=self.group)
        self.comm_bytes["gather_winners.winners"] += (P - 1) * w_pad.numel() * w_pad.element_size()
        winners_GK = all_w[group_token_index(meta.tokens_per_rank, meta.max_tokens, device)]

        # As an expert rank: the (g, k) whose winner is mine, row-major, hence grouped by home rank
        # and in each home rank's (t, k) order.
        g_S, k_S = (winners_GK // e == self.ep_rank).nonzero(as_tuple=True)
        rows_SD = outputs_eGD[winners_GK[g_S, k_S] - self.first_local_expert, g_S]
        home_G = torch.arange(P, device=device).repeat_interleave(
            torch.tensor(meta.tokens_per_rank, device=device))
        send_splits = torch.bincount(home_G[g_S], minlength=P).tolist()

        # As a home rank: my (t, k) grouped by the rank that owns the winner, (t, k) order within.
        owner_A = winners_TK.reshape(-1) // e
        order_A = torch.argsort(owner_A, stable=True)
        recv_splits = torch.bincount(owner_A, minlength=P).tolist()
        recv_AD = _AllToAll.apply(rows_SD, recv_splits, send_splits, self.group, self.ep_rank,
                                  self.comm_bytes, "gather_winners", None)
        return unsort(recv_AD, order_A).view(T, K, D)
