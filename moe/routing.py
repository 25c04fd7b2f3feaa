"""Routing policies' common ground: what a policy receives and returns, the softmax router, and the
CompeteSMoE math (docs/competesmoe.md names the function beside each equation).

Everything here is math on per-token scores; moving tokens between ranks is the dispatcher's job.
A routing policy is a module `policy(x_TD, ctx, default_k, training) -> RoutingDecision`: the softmax
router here, the papers' baselines in `moe/baselines.py`.

Shape legend: T tokens, E experts (global), K experts chosen per token, D d_model, B batch, S sequence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

AFFINITIES = {
    "softplus_mean": lambda o: F.softplus(o).mean(-1),
    "l2_norm": lambda o: o.norm(dim=-1),
    "relu_mean": lambda o: F.relu(o).mean(-1),
    "sigmoid_mean": lambda o: torch.sigmoid(o).mean(-1),
}


@dataclass(frozen=True)
class RoutingContext:
    """What a routing policy may depend on besides the tokens' hidden states, passed explicitly
    with every forward (the trainer builds it; evaluation builds its own)."""

    step: int = 0
    """The optimizer step being taken (0-based); in evaluation, the steps trained so far."""
    total_steps: int = 1
    """train.max_steps of the run."""
    top_k: int | None = None
    """Experts per token to use instead of the policy's own K (evaluation sweeps); None = the policy's."""
    tokens_BS: torch.Tensor | None = None
    """Token ids of the batch (the model fills this in; StableMoE's distilled router routes on them)."""


@dataclass
class RoutingDecision:
    """One routing of T tokens: what the layer dispatches, plus loss and monitoring figures."""

    weights_TK: torch.Tensor
    """Gate weight of each chosen expert (the task gradient reaches the router through these)."""
    experts_TK: torch.Tensor
    """Chosen expert ids."""
    probs_TE: torch.Tensor
    """The policy's routing distribution over experts (monitoring: entropy, figures)."""
    loss: torch.Tensor
    """Weighted auxiliary loss of this routing."""
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    """Detached per-layer figures for metrics.jsonl (same keys on every call of one policy)."""


class SoftmaxRouter(nn.Module):
    """The linear softmax top-K router (SMoE; CompeteSMoE's router steps): logits g = W x in fp32,
    p_R = softmax(g), top-K with renormalised weights (or, `raw_gates`, the probabilities themselves as
    the Switch Transformer gates), Switch balance loss and z-loss."""

    def __init__(self, d_model: int, num_experts: int, *, balance_coef: float = 0.0, z_loss_coef: float = 0.0,
                 jitter: float = 0.0, raw_gates: bool = False):
        super().__init__()
        self.weight_ED = nn.Parameter(torch.empty(num_experts, d_model))
        nn.init.normal_(self.weight_ED, std=0.02)
        self.balance_coef, self.z_loss_coef, self.jitter, self.raw_gates = balance_coef, z_loss_coef, jitter, raw_gates

    def logits(self, x_TD: torch.Tensor, jitter: float = 0.0) -> torch.Tensor:
        """g = W x in fp32; with jitter eps > 0 in training, x is scaled by U(1 - eps, 1 + eps) first."""
        if jitter > 0 and self.training:
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - jitter, 1.0 + jitter)
        return x_TD.float() @ self.weight_ED.float().t()

    def forward(self, x_TD: torch.Tensor, ctx: RoutingContext, default_k: int, training: bool) -> RoutingDecision:
        logits_TE = self.logits(x_TD, self.jitter)
        probs_TE = torch.softmax(logits_TE, dim=-1)
        weights_TK, experts_TK = topk_renormalised(probs_TE, ctx.top_k or default_k)
        if self.raw_gates:
            weights_TK = probs_TE.gather(1, experts_TK)
        balance = switch_balance_loss(probs_TE, experts_TK)
        zloss = z_loss(logits_TE)
        weighted = {"balance_loss": self.balance_coef * balance, "z_loss": self.z_loss_coef * zloss}
        return RoutingDecision(weights_TK, experts_TK, probs_TE, sum(weighted.values()),
                               {"balance_loss": balance.detach(), "z_loss": zloss.detach(), **weighted_stats(weighted)})


WEIGHTED = "weighted_"
"""Prefix of the stats that hold a weighted auxiliary loss term (coef * loss); the trainer's metrics report each as
its share of the LM loss ('<term>_to_lm')."""


def weighted_stats(weighted: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{'weighted_<term>': coef * loss, detached} for the terms of an auxiliary loss."""
    return {WEIGHTED + name: value.detach() for name, value in weighted.items()}


def topk_renormalised(probs_TE: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-K of probabilities and their weights renormalised to sum to one per token."""
    top_TK, idx_TK = probs_TE.topk(k, dim=-1)
    return top_TK / top_TK.sum(-1, keepdim=True).clamp_min(1e-9), idx_TK


def switch_balance_loss(probs_TE: torch.Tensor, idx_TK: torch.Tensor) -> torch.Tensor:
    """E * sum_e mean_prob_e * frac_e, frac_e = share of the T*K assignments that go to expert e."""
    num_experts = probs_TE.shape[-1]
    frac_E = expert_fraction(idx_TK, num_experts)
    return num_experts * (probs_TE.mean(0) * frac_E).sum()


def expert_fraction(idx_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    return count_per_expert(idx_TK, num_experts).float() / max(idx_TK.numel(), 1)


def count_per_expert(idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """How many entries of idx name each expert (int64 [E]). Unlike torch.bincount it never waits for the device
    (bincount reads the largest id on the host to size its output)."""
    flat = idx.reshape(-1)
    return torch.zeros(num_experts, dtype=torch.int64, device=idx.device).scatter_add_(0, flat, torch.ones_like(flat))


def z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(logits_TE, dim=-1).square().mean()


def entropy(probs_TE: torch.Tensor) -> torch.Tensor:
    return -(probs_TE * probs_TE.clamp_min(1e-12).log()).sum(-1).mean()


def competition_weights(scores_TK: torch.Tensor, variant: str) -> torch.Tensor:
    """v2: winners' affinities renormalised to sum to one; v1: softmax over the winners' affinities."""
    if variant == "v1":
        return torch.softmax(scores_TK.float(), dim=-1)
    return scores_TK / scores_TK.sum(-1, keepdim=True).clamp_min(1e-9)


def combine_gate(scores_TE: torch.Tensor, logits_TE: torch.Tensor) -> torch.Tensor:
    """v1's --combine_gate: the competition ranks 0.5 * affinity + 0.5 * router logit."""
    return 0.5 * scores_TE + 0.5 * logits_TE


def competition_target(p_comp_TE: torch.Tensor, scores_TE: torch.Tensor, winners_TK: torch.Tensor,
                       variant: str) -> torch.Tensor:
    """What the router learns on a competition step. v2: stopgrad p_C, p_C = softmax(s) over all E experts.
    v1: softmax over the K winners' scores, 0 for the other experts, and not detached (the router loss also
    trains the experts through it)."""
    if variant == "v1":
        losers_out_TE = torch.full_like(scores_TE, float("-inf"))
        return torch.softmax(losers_out_TE.scatter(1, winners_TK, scores_TE.gather(1, winners_TK)), dim=-1)
    return p_comp_TE.detach()


def router_distillation_loss(p_router_TE: torch.Tensor, target_TE: torch.Tensor) -> torch.Tensor:
    """MSE(p_R, target), mean over tokens and experts (the target comes from `competition_target`)."""
    return F.mse_loss(p_router_TE, target_TE)


def hybrid_loss(p_router_TE: torch.Tensor, target_TE: torch.Tensor, winners_TK: torch.Tensor) -> torch.Tensor:
    """The same MSE restricted to the K winners of the competition, mean over tokens and winners."""
    return F.mse_loss(p_router_TE.gather(1, winners_TK), target_TE.gather(1, winners_TK))


def competition_balance_winners(winners_TK: torch.Tensor, variant: str) -> torch.Tensor:
    """The assignments the competition's Switch balance loss counts: the top-1 winner (v2 code) or all K (v1 code)."""
    return winners_TK if variant == "v1" else winners_TK[:, :1]


def diversity_loss(outputs_TKD: torch.Tensor) -> torch.Tensor:
    """Cosine similarity among each token's K winners' outputs with the diagonal zeroed, mean over all T x K x K
    entries (the v2 code's mean; (K-1)/K times the mean over pairs). 0 for K = 1."""
    k = outputs_TKD.shape[1]
    if k < 2:
        return outputs_TKD.new_zeros((), dtype=torch.float32)
    unit_TKD = F.normalize(outputs_TKD.float(), dim=-1)
    sim_TKK = unit_TKD @ unit_TKD.transpose(1, 2)
    off_diagonal_T = sim_TKK.sum((1, 2)) - sim_TKK.diagonal(dim1=1, dim2=2).sum(-1)
    return (off_diagonal_T / (k * k)).mean()


def topk_overlap(a_TK: torch.Tensor, b_TK: torch.Tensor) -> torch.Tensor:
    """Share of each token's K choices in `a` that also appear in `b`, averaged over tokens."""
    return (a_TK.unsqueeze(-1) == b_TK.unsqueeze(-2)).any(-1).float().mean()


def entropy_ratio(probs_TE: torch.Tensor) -> torch.Tensor:
    """Mean entropy over ln E: 1 = uniform (no preference among the experts), 0 = one expert certain."""
    num_experts = probs_TE.shape[-1]
    return entropy(probs_TE) / math.log(num_experts) if num_experts > 1 else probs_TE.new_zeros(())


def rms(x: torch.Tensor) -> torch.Tensor:
    """Root mean square over every entry, in fp32 (0 for an empty tensor)."""
    return (x.float().square().sum() / max(x.numel(), 1)).sqrt()
