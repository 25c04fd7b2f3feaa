"""The cost of a layout, from the code's own arithmetic: the bytes each collective of a training step moves,
the memory a rank holds, and a step's time on given links and FLOP rate.

Communication: the collectives `expert_parallel.AllToAllDispatcher` runs for one MoE layer (router step:
dispatch and combine; competition step: the gathers of moe.competition.gather), each forward and backward,
and the gradient reduction DeepSpeed 0.19 runs once per optimizer step (parallel/deepspeed/engine.py): ZeRO 0
all-reduces dense gradients over all ranks (DP) and expert gradients over the ranks holding the same experts
(EDP); ZeRO 1 and 2 do the same all-reduces (DeepSpeed's `use_multi_rank_bucket_allreduce`: each rank then
keeps its partition) and all-gather the updated weight partitions after the step. Bytes are those a rank sends
to the other ranks of the group (the counting of `AllToAllDispatcher.comm_bytes` and of the benchmark's
collective counter; an all-reduce counts as a ring, 2 (n-1)/n of the tensor). Rows routed to experts are
assumed balanced (each expert gets T K / E of a rank's assignments; the planner cannot know the router).

Memory per rank: weights, gradients and Adam states by the ZeRO paper's accounting (Rajbhandari et al. 2020,
section 3: bf16 keeps fp32 master weights with the optimizer; ZeRO 1 partitions optimizer states, ZeRO 2
gradients too; dense parameters over DP, experts over EDP; DeepSpeed's communication buckets come on top), and
the activations of one micro-batch: every tensor autograd keeps for backward, as the model's code saves it
(`activations_per_token` names them), at the start of backward, plus the largest transient of backward (the LM
head's gradients, or a competing layer's).

Shape legend: T tokens per rank per micro-batch, D d_model, S sequence, H heads, V vocabulary, E experts,
e = E / P local experts, K experts per token, F expert hidden, Fd dense hidden, P the EP size, b bytes of an
activation element (2 bf16, 4 fp32).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from competesmoe.moe.config import ModelConfig, MoEConfig
from competesmoe.moe.flops import BACKWARD_FACTOR, forward_flops, num_moe_layers, training_flops_per_token
from competesmoe.moe.model import TransformerLM, uses_moe

ZERO_STAGES = (0, 1, 2)
COLLECTIVE_KINDS = ("all_to_all", "all_gather", "reduce_scatter", "all_reduce")
INDEX_BYTES = 8  # int64: counts, token and expert indices
FP32 = 4


@dataclass(frozen=True)
class Layout:
    """Where the ranks are: W ranks, EP groups of P consecutive ranks, G GPUs per node."""

    world: int
    ep: int
    zero_stage: int
    gpus_per_node: int

    @property
    def edp(self) -> int:
        """Ranks holding the same experts (expert gradients are reduced among them)."""
        return self.world // self.ep

    def group_ranks(self, group: str) -> list[int]:
        """Rank 0's group: 'ep' (shares one layer's experts), 'edp' (holds the same experts) or 'dp' (all)."""
        if group == "ep":
            return list(range(self.ep))
        if group == "edp":
            return list(range(0, self.world, self.ep))
        return list(range(self.world))

    def group_size(self, group: str) -> int:
        return len(self.group_ranks(group))

    def nodes_spanned(self, group: str) -> int:
        return len({r // self.gpus_per_node for r in self.group_ranks(group)})

    def spans_nodes(self, group: str) -> bool:
        return self.nodes_spanned(group) > 1

    def intra_node_share(self, group: str) -> float:
        """Share of rank 0's peers in the group that sit in its node (an all-to-all's bytes split alike)."""
        peers = self.group_ranks(group)[1:]
        return sum(r < self.gpus_per_node for r in peers) / len(peers) if peers else 1.0


@dataclass(frozen=True)
class Workload:
    """What every rank runs: the model, its precision and layout options, and its batch."""

    model: ModelConfig
    moe: MoEConfig
    vocab_size: int
    micro_batch_size: int
    grad_accum: int = 1
    precision: str = "fp32"
    """'fp32' or 'bf16' (train.precision)."""
    activation_checkpointing: str = "none"
    """parallel.activation_checkpointing: 'none', 'experts' or 'full'."""

    @property
    def tokens(self) -> int:
        """T: tokens per rank per micro-batch."""
        return self.micro_batch_size * self.model.seq_len

    @property
    def act_bytes(self) -> int:
        """b: bytes per activation, weight and gradient element."""
        return 2 if self.precision == "bf16" else FP32

    @property
    def moe_layers(self) -> int:
        return num_moe_layers(self.model)


# ---------------------------------------------------------------------------------------------- communication


@dataclass(frozen=True)
class Collective:
    """One collective call: what this rank sends to the other ranks of `group`."""

    name: str
    """What moves (the dispatcher's comm_bytes key, or grad.* / params.* for DeepSpeed's reduction)."""
    kind: str
    """One of COLLECTIVE_KINDS."""
    group: str
    """'ep', 'edp' or 'dp' (Layout.group_ranks)."""
    bytes: float
    """Sent to the other ranks of the group per call."""
    calls: float = 1
    """Calls per optimizer step (per micro-batch layer step until `per_step` scales it)."""

    @property
    def total(self) -> float:
        return self.bytes * self.calls


def router_step_collectives(w: Workload, layout: Layout) -> list[Collective]:
    """One MoE layer's router step on one micro-batch, forward and backward (none at EP 1)."""
    P = layout.ep
    if P == 1:
        return []
    e, T, K, D, b = w.moe.num_experts // P, w.tokens, w.moe.top_k, w.model.d_model, w.act_bytes
    rows = T * K * (P - 1) / P  # balanced: a rank's assignments spread evenly over the EP ranks
    return [Collective("dispatch.counts", "all_to_all", "ep", (P - 1) * e * INDEX_BYTES),
            *_both_ways("dispatch", "all_to_all", rows * D * b),
            *_both_ways("combine", "all_to_all", rows * D * b)]


def competition_collectives(w: Workload, layout: Layout) -> list[Collective]:
    """One competing MoE layer on one micro-batch, forward and backward (none at EP 1)."""
    P = layout.ep
    if P == 1:
        return []
    e, T, K, D, b = w.moe.num_experts // P, w.tokens, w.moe.top_k, w.model.d_model, w.act_bytes
    tokens = [Collective("gather_tokens.counts", "all_gather", "ep", (P - 1) * INDEX_BYTES),
              Collective("gather_tokens", "all_gather", "ep", (P - 1) * T * D * b),
              Collective("gather_tokens.backward", "reduce_scatter", "ep", (P - 1) * T * D * b)]
    if w.moe.competition.gather == "outputs":  # every local expert's outputs for each other rank's tokens
        return tokens + _both_ways("gather_outputs", "all_to_all", (P - 1) * T * e * D * b)
    return tokens + [*_both_ways("gather_scores", "all_to_all", (P - 1) * T * e * FP32),
                     Collective("gather_winners.winners", "all_gather", "ep", (P - 1) * T * K * INDEX_BYTES),
                     *_both_ways("gather_winners", "all_to_all", T * K * (P - 1) / P * D * b)]


def _both_ways(name: str, kind: str, nbytes: float) -> list[Collective]:
    """A differentiable all-to-all: its backward sends the gradients back the same amount."""
    return [Collective(name, kind, "ep", nbytes), Collective(f"{name}.backward", kind, "ep", nbytes)]


@dataclass(frozen=True)
class ParamCounts:
    dense: int
    """Parameters every rank holds (attention, norms, routers, dense FFNs, embeddings)."""
    experts: int
    """Expert parameters of all E experts of all layers (a rank holds 1 / P of them)."""

    def local(self, layout: Layout) -> tuple[int, float]:
        """(dense, expert) parameters held by one rank."""
        return self.dense, self.experts / layout.ep


def param_counts(model: ModelConfig, moe: MoEConfig, vocab_size: int) -> ParamCounts:
    """Counted on the model itself, built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        lm = TransformerLM(model, moe, vocab_size)
    experts = sum(p.numel() for layer in lm.moe_layers for p in layer.experts.parameters())
    return ParamCounts(dense=sum(p.numel() for p in lm.parameters()) - experts, experts=experts)


def gradient_collectives(w: Workload, layout: Layout, params: ParamCounts) -> list[Collective]:
    """DeepSpeed's gradient reduction and (ZeRO 1/2) weight all-gather of one optimizer step."""
    dense, experts = params.local(layout)
    out = []
    for suffix, group, count in (("dense", "dp", dense), ("experts", "edp", experts)):
        n = layout.group_size(group)
        if n == 1 or count == 0:
            continue
        nbytes = count * w.act_bytes
        out.append(Collective(f"grad.{suffix}", "all_reduce", group, 2 * (n - 1) * nbytes / n))
        if layout.zero_stage > 0:  # each rank's updated partition to every other rank
            out.append(Collective(f"params.{suffix}", "all_gather", group, (n - 1) * nbytes / n))
    return out


def step_collectives(w: Workload, layout: Layout, params: ParamCounts, competing_layers: float) -> list[Collective]:
    """Every collective of one optimizer step (grad_accum micro-batches) with `competing_layers` MoE layers
    competing (a fraction: the mean over steps), calls per step filled in."""
    routers = w.moe_layers - competing_layers
    per_micro = ([replace(c, calls=routers * w.grad_accum) for c in router_step_collectives(w, layout)]
                 + [replace(c, calls=competing_layers * w.grad_accum) for c in competition_collectives(w, layout)])
    return [c for c in per_micro if c.calls] + gradient_collectives(w, layout, params)


# ------------------------------------------------------------------------------------------------- memory


@dataclass(frozen=True)
class Activations:
    """Bytes of one micro-batch's activations on one rank."""

    saved_router_step: float
    """Kept for backward at the end of a forward in which no layer competes."""
    saved_competition_extra: float
    """What one competing layer keeps beyond its router step."""
    head_saved: float
    """The part of `saved_router_step` the LM head and loss keep (freed first in backward)."""
    logits: float
    """The logits, held by the step's output through backward."""
    head_transient: float
    """Gradients alive at once in the head's backward."""
    competition_transient: float
    """Gradients alive at once in a competing layer's backward."""
    block_transient: float
    """Gradients alive at once in a router-step block's backward."""
    checkpointed_block: float = 0.0
    """parallel.activation_checkpointing 'full': a block's activations while it is recomputed in backward."""

    def peak(self, competing_layers: int = 0) -> float:
        """Live activation bytes at the worst moment of forward + backward, `competing_layers` of the last
        MoE layers competing (the worst place for them: backward reaches them first)."""
        saved = self.saved_router_step + competing_layers * self.saved_competition_extra
        at_head = saved + self.logits + self.head_transient
        in_blocks = saved - self.head_saved + self.logits + self.checkpointed_block
        at_block = in_blocks + max(self.block_transient, self.competition_transient if competing_layers else 0.0)
        return max(at_head, at_block)


def activations(w: Workload, layout: Layout) -> Activations:
    """The activation model (bytes): per-token figures of `activations_per_token` times T."""
    per_token = activations_per_token(w, layout.ep)
    T = w.tokens
    blocks = [per_token["moe_block" if uses_moe(w.model.layout, i) else "dense_block"] for i in range(w.model.n_layers)]
    head = per_token["head"]
    moe_const = per_token["moe_layer_constant"]
    if w.activation_checkpointing == "full":  # only block inputs stay; one block is recomputed at a time
        block_inputs = w.model.n_layers * per_token["block_input"] * T
        worst_block = max(blocks) * T + moe_const
        return Activations(
            saved_router_step=(per_token["batch"] + head) * T + block_inputs, head_saved=head * T,
            saved_competition_extra=0.0, logits=per_token["logits"] * T, head_transient=per_token["head_transient"] * T,
            competition_transient=per_token["competition_extra"] * T + per_token["competition_transient"] * T,
            block_transient=per_token["block_transient"] * T, checkpointed_block=worst_block)
    return Activations(
        saved_router_step=(per_token["batch"] + sum(blocks) + head) * T + w.moe_layers * moe_const,
        saved_competition_extra=per_token["competition_extra"] * T,
        head_saved=head * T, logits=per_token["logits"] * T, head_transient=per_token["head_transient"] * T,
        competition_transient=per_token["competition_transient"] * T, block_transient=per_token["block_transient"] * T)


def activations_per_token(w: Workload, ep: int) -> dict[str, float]:
    """Bytes per token that autograd keeps, by the code that keeps them (moe/model.py, moe/layer.py,
    moe/routing.py, moe/experts.py, moe/dispatch.py, parallel/expert_parallel.py). Left out: dropout masks
    (configs use dropout 0), tensors of a handful of elements, and the baselines' own router tensors (the softmax
    router's stand in: a few per token and expert, as theirs)."""
    m, moe, b = w.model, w.moe, w.act_bytes
    D, H, V, E, K, F = m.d_model, m.n_heads, w.vocab_size, moe.num_experts, moe.top_k, moe.expert_hidden
    experts_on = w.activation_checkpointing != "experts"  # the hidden layers are recomputed one expert at a time
    hidden = _hidden_bytes(moe.activation, F, b)
    norm = 2 * FP32 * D + FP32  # RMSNorm: its input and x * rstd in fp32, and rstd
    attention = (norm + b * D  # qkv's input
                 + 3 * b * D + (2 * b * D if m.positions == "rotary" else 0)  # q, k, v (rotated q, k are copies)
                 + b * D + FP32 * H  # attention output and logsumexp
                 + b * D)  # the output projection's input (a copy: transposed heads)
    router = FP32 * D + 2 * FP32 * E + (INDEX_BYTES + FP32) * K + 3 * FP32  # x and logits/probs in fp32, top-K
    ep_indices = 2 * INDEX_BYTES * K if ep > 1 else 0  # the received rows' permutation, both ways
    moe_router_step = (router + INDEX_BYTES * K + b * K * D  # dispatch's gather index, the experts' rows
                       + (K * hidden if experts_on else 0)
                       + 2 * INDEX_BYTES * K + (b + FP32) * K * D + FP32 * K  # combine: unsort, weighted sum in fp32
                       + ep_indices)
    dense_ffn = norm + b * D + _hidden_bytes(m.dense_activation or moe.activation, m.dense_hidden, b)
    competition = (FP32 * D + FP32 * E  # the router's x and p_R
                   + _competition_tokens_bytes(w, ep)
                   + (E * hidden if experts_on else 0) + b * E * D  # every expert on every token (the affinity's input)
                   + 2 * INDEX_BYTES * K + FP32 * K + 2 * FP32  # winners (and the router's choice), weights
                   + _winner_rows_indices(K, ep, w.moe.competition.gather)
                   + FP32 * K * D + FP32 * K  # the winners' outputs and weights in the mix (fp32)
                   + FP32 * E + 2 * FP32 * K  # p_C, the hybrid loss's gathers
                   + _diversity_bytes(K, D, b))
    return {
        "batch": 2 * INDEX_BYTES,  # token ids and targets
        "block_input": b * D,
        "moe_block": attention + norm + moe_router_step,
        "dense_block": attention + dense_ffn,
        "moe_layer_constant": FP32 * E + (FP32 * E * D if b != FP32 else 0),  # expert shares; fp32 router weight
        "competition_extra": competition - moe_router_step,
        "head": norm + b * D + FP32 * V,  # final norm, the head's input, log-softmax output (fp32)
        "logits": b * V,
        "head_transient": 2 * FP32 * V,  # gradients of the log-softmax output and of the fp32 logits
        # Every expert output's gradient, reached through the affinities and through the winners; which branch
        # autograd runs first depends on the graph, so the larger of the two orders. The affinity branch first: in
        # fp32 both of autograd's gradients (the mean's spread over the outputs, then softplus's) and the winners'
        # one; below fp32 the outputs' gradient and one expert's fp32 work at a time (moe/layer.py _Affinity). The
        # winners first: the gradients of every output (fp32 has a second, the affinity's) and of the winners'
        # outputs in fp32 and in the activation dtype (the mix and the diversity loss), and the layer's output's.
        "competition_transient": max((2 * FP32 + b) * E * D if b == FP32 else b * E * D + 3 * FP32 * D,
                                     (b + (FP32 if b == FP32 else 0)) * E * D + (FP32 + b) * K * D + b * D),
        # Measured rather than derived (MemTracker, fp32 and bf16, GELU and SwiGLU): what a router-step block's
        # backward holds at once grows with its K rows and its token per token, in fp32 whatever the precision.
        "block_transient": FP32 * (K + 1) * D,
    }


def _hidden_bytes(activation: str, width: int, b: int) -> int:
    """An FFN's hidden layer per token it answers: pre-activation and activation (SwiGLU: h of twice the width,
    silu(gate), the product)."""
    return {"gelu": 2, "swiglu": 4}[activation] * b * width


def _competition_tokens_bytes(w: Workload, ep: int) -> float:
    """The experts' input kept on a competition step, per home token: the EP group's P T gathered rows; at EP 1
    the normalised tokens themselves (in fp32 the same tensor as the router's input, already counted)."""
    if ep > 1:
        return ep * w.act_bytes * w.model.d_model
    return 0 if w.act_bytes == FP32 else w.act_bytes * w.model.d_model


def _winner_rows_indices(K: int, ep: int, gather: str) -> float:
    """Indices that pick the winners' outputs: at home, one token index per token (select_winners); with
    gather='scores' across ranks, the (token, expert) index of every row sent (balanced: T K rows) and the
    permutation that puts the received rows back in (token, k) order."""
    return 3 * INDEX_BYTES * K if ep > 1 and gather == "scores" else INDEX_BYTES


def _diversity_bytes(K: int, D: int, b: int) -> float:
    """The diversity loss's normalised winners (and their fp32 copy in bf16) and norms; nothing at K 1."""
    if K < 2:
        return 0
    return FP32 * K * D * (2 if b != FP32 else 1) + 2 * FP32 * K


@dataclass(frozen=True)
class Memory:
    """Bytes per rank."""

    weights: float
    gradients: float
    optimizer: float
    """Adam's two moments, plus the fp32 master weights in bf16."""
    activations: Activations

    @property
    def states(self) -> float:
        return self.weights + self.gradients + self.optimizer

    def peak(self, competing_layers: int = 0) -> float:
        return self.states + self.activations.peak(competing_layers)


def memory(w: Workload, layout: Layout, params: ParamCounts) -> Memory:
    dense, experts = params.local(layout)
    b = w.act_bytes
    optimizer_bytes = 2 * FP32 + (FP32 if b != FP32 else 0)  # m, v (+ fp32 master)
    dp, edp = layout.group_size("dp"), layout.group_size("edp")

    def held(from_stage: int) -> float:
        """Elements a rank holds of a state that ZeRO partitions from `from_stage` on (dense over DP, experts over
        EDP)."""
        if layout.zero_stage >= from_stage:
            return dense / dp + experts / edp
        return dense + experts

    return Memory(weights=(dense + experts) * b, gradients=held(2) * b, optimizer=held(1) * optimizer_bytes,
                  activations=activations(w, layout))


# --------------------------------------------------------------------------------------------------- time


@dataclass(frozen=True)
class Hardware:
    """What a step's time is estimated on (per GPU)."""

    peak_flops: float
    """Dense matmul peak in the training precision, FLOP/s."""
    mfu: float
    """The share of the peak the compute reaches (compute time = FLOPs / (peak x mfu))."""
    intra_node_Bps: float
    """Bytes/s a GPU sends to GPUs of its node (one direction)."""
    inter_node_Bps: float
    """Bytes/s a GPU sends to other nodes (its network link, one direction)."""


def collective_seconds(c: Collective, layout: Layout, hw: Hardware) -> float:
    """Time of one call, bandwidth only (latency is not modelled): the bytes inside the node over NVLink and those
    across nodes over the GPU's network link go at once; the slower of the two sets the time."""
    intra, inter = split_bytes(c, layout)
    return max(intra / hw.intra_node_Bps, inter / hw.inter_node_Bps)


def split_bytes(c: Collective, layout: Layout) -> tuple[float, float]:
    """(intra-node, inter-node) bytes of one call. An all-to-all sends to each peer alike: the peers outside the
    node get their share over the network. A ring collective (all-gather, reduce-scatter, all-reduce; NCCL's rings
    visit a node's ranks in a row, one ring per GPU's network link) crosses nodes on m of its n hops, m the nodes
    the group spans: m / n of a rank's bytes go over the network, all of them when each node holds one rank."""
    if c.kind == "all_to_all":
        share = layout.intra_node_share(c.group)
        return c.bytes * share, c.bytes * (1 - share)
    nodes = layout.nodes_spanned(c.group)
    inter = c.bytes * nodes / layout.group_size(c.group) if nodes > 1 else 0.0
    return c.bytes - inter, inter


@dataclass(frozen=True)
class StepEstimate:
    """One optimizer step of one rank."""

    competing_layers: float
    flops: float
    """Executed: model FLOPs plus activation checkpointing's recomputation."""
    collectives: list[Collective] = field(default_factory=list)
    compute_s: float = 0.0
    comm_s: float = 0.0

    @property
    def serial_s(self) -> float:
        """Nothing overlapped: what the code does today (its all-to-alls block, DeepSpeed reduces after backward)."""
        return self.compute_s + self.comm_s

    @property
    def overlapped_s(self) -> float:
        """Every collective hidden behind compute: the bound a perfectly overlapping schedule reaches."""
        return max(self.compute_s, self.comm_s)


def recomputed_flops_per_token(w: Workload, competing_layers: float) -> float:
    """Forward FLOPs per token that parallel.activation_checkpointing runs again in backward ('experts': every
    expert's input projection, where torch's checkpoint stops recomputing once backward has what it needs; 'full':
    every block, early stop off). Model FLOPs (MFU) leave them out; the GPU still runs them."""
    fwd = forward_flops(w.model, w.moe, w.vocab_size)
    if w.activation_checkpointing == "experts":
        moe = w.moe
        in_width = 2 * moe.expert_hidden if moe.activation == "swiglu" else moe.expert_hidden
        answers = w.moe_layers * moe.top_k + competing_layers * (moe.num_experts - moe.top_k)
        return answers * 2 * w.model.d_model * in_width
    if w.activation_checkpointing == "full":
        return fwd.router_step - fwd.head + competing_layers * fwd.competition_extra
    return 0.0


def executed_flops_per_token(w: Workload, competing_layers: float) -> float:
    """What the GPU computes per token: model FLOPs plus the recomputation of activation checkpointing."""
    return (training_flops_per_token(w.model, w.moe, w.vocab_size, competing_layers)
            + recomputed_flops_per_token(w, competing_layers))


def estimate_step(w: Workload, layout: Layout, params: ParamCounts, hw: Hardware,
                  competing_layers: float) -> StepEstimate:
    tokens = w.tokens * w.grad_accum
    flops = tokens * executed_flops_per_token(w, competing_layers)
    collectives = step_collectives(w, layout, params, competing_layers)
    comm_s = sum(collective_seconds(c, layout, hw) * c.calls for c in collectives)
    return StepEstimate(competing_layers=competing_layers, flops=flops, collectives=collectives,
                        compute_s=flops / (hw.peak_flops * hw.mfu), comm_s=comm_s)


def competing_layer_seconds(w: Workload, layout: Layout, hw: Hardware) -> tuple[float, float]:
    """(compute, communication) seconds of one competing layer on one micro-batch: the layer is
    communication-bound when the second is larger."""
    fwd = forward_flops(w.model, w.moe, w.vocab_size)
    per_layer = (fwd.router + fwd.experts) / max(w.moe_layers, 1) + fwd.competition_extra
    compute = (1 + BACKWARD_FACTOR) * per_layer * w.tokens / (hw.peak_flops * hw.mfu)
    comm = sum(collective_seconds(c, layout, hw) for c in competition_collectives(w, layout))
    return compute, comm
