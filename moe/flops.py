"""Model FLOPs of a training step: the matrix products our model runs, per token.

Counted the way torch.utils.flop_counter.FlopCounterMode counts (2 FLOPs per multiply-add, every matrix
product; norms, softmax and other elementwise work not counted) and with the convention of model FLOPs
utilisation (PaLM appendix B, Megatron, torchtitan): a backward costs twice its forward (input and weight
gradients), attention's score and value products are counted over the full S x S (causal masking not halved,
a flash kernel's recomputation not counted), activation checkpointing's recomputation not counted.

Assumptions: the softmax router's product (2 D E) stands for every routing policy's (the baselines' routers
differ by far less than 1% of a step); `moe.top_k` experts per token on a router step (dropless, or capacity
never reached); on a competition step every expert answers every token (E in place of K) and the K winners'
outputs meet in the diversity loss's K x K product.

Shape legend: D d_model, S sequence, V vocabulary, E experts, K experts per token, F expert hidden width,
Fd dense FFN hidden width.
"""

from __future__ import annotations

from dataclasses import dataclass

from competesmoe.moe.config import ModelConfig, MoEConfig
from competesmoe.moe.model import uses_moe

BACKWARD_FACTOR = 2
"""A backward's FLOPs over its forward's: every product computes the gradients of both of its inputs."""


@dataclass(frozen=True)
class ForwardFlops:
    """Forward FLOPs per token of a router step, by part of the model (all blocks together), and the extra
    of one competing layer."""

    attention: float
    """Q, K, V and output projections and the scores and values products of every block."""
    dense_ffn: float
    """The dense FFN blocks (layouts 'glam' and 'dense')."""
    router: float
    """The routers of every MoE layer."""
    experts: float
    """Every MoE layer's experts on its K assignments per token."""
    head: float
    """The LM head (D x V)."""
    competition_experts: float
    """One competing layer's experts over its router step: E - K more answers per token."""
    diversity: float
    """One competing layer's diversity loss: the K x K product of the winners' outputs."""

    @property
    def router_step(self) -> float:
        return self.attention + self.dense_ffn + self.router + self.experts + self.head

    @property
    def competition_extra(self) -> float:
        """One competing layer over its router step."""
        return self.competition_experts + self.diversity


def ffn_flops(d_model: int, hidden: int, activation: str) -> int:
    """Forward FLOPs of one FFN (an expert or a dense block) on one token: D -> hidden (x2 for SwiGLU's gate)
    -> D."""
    in_width = 2 * hidden if activation == "swiglu" else hidden
    return 2 * d_model * in_width + 2 * hidden * d_model


def num_moe_layers(model: ModelConfig) -> int:
    return sum(uses_moe(model.layout, i) for i in range(model.n_layers))


def forward_flops(model: ModelConfig, moe: MoEConfig, vocab_size: int) -> ForwardFlops:
    D, S = model.d_model, model.seq_len
    n_moe = num_moe_layers(model)
    n_dense = model.n_layers - n_moe
    expert = ffn_flops(D, moe.expert_hidden, moe.activation)
    K, E = moe.top_k, moe.num_experts
    diversity = 2 * K * K * D if K > 1 else 0  # unit_TKD @ unit_TKD^T (none for K 1)
    return ForwardFlops(
        attention=model.n_layers * (2 * D * 3 * D + 2 * D * D + 2 * 2 * S * D),
        dense_ffn=n_dense * ffn_flops(D, model.dense_hidden, model.dense_activation or moe.activation),
        router=n_moe * 2 * D * E,
        experts=n_moe * K * expert,
        head=2 * D * vocab_size,
        competition_experts=(E - K) * expert,
        diversity=diversity,
    )


def training_flops_per_token(model: ModelConfig, moe: MoEConfig, vocab_size: int, competing_layers: float = 0) -> float:
    """Forward plus backward model FLOPs per token of a training step in which `competing_layers` MoE layers
    compete (0: a router step; a fraction: the mean over steps)."""
    fwd = forward_flops(model, moe, vocab_size)
    return (1 + BACKWARD_FACTOR) * (fwd.router_step + competing_layers * fwd.competition_extra)
