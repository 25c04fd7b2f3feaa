"""Routing policies: the softmax top-K router and the CompeteSMoE competition (../docs: competesmoe.md).

Everything here is math on per-token scores; moving tokens between ranks is the dispatcher's job.

Shape legend: T tokens, E experts (global), K experts chosen per token, D d_model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

AFFINITIES = {
    "softplus_mean": lambda o: F.softplus(o).mean(-1),
    "l2_norm": lambda o: o.norm(dim=-1),
    "relu_mean": lambda o: F.relu(o).mean(-1),
    "sigmoid_mean": lambda o: torch.sigmoid(o).mean(-1),
}


class Router(nn.Module):
    """Linear gate without bias; logits are computed in fp32 whatever the training precision."""

    def __init__(self, d_model: int, num_experts: int):
        super().__init__()
        self.weight_ED = nn.Parameter(torch.empty(num_experts, d_model))
        nn.init.normal_(self.weight_ED, std=0.02)

    def forward(self, x_TD: torch.Tensor, jitter: float = 0.0) -> torch.Tensor:
        if jitter > 0 and self.training:
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - jitter, 1.0 + jitter)
        return x_TD.float() @ self.weight_ED.float().t()


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
    counts_E = torch.bincount(idx_TK.reshape(-1), minlength=num_experts).float()
    return counts_E / max(idx_TK.numel(), 1)


def z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(logits_TE, dim=-1).square().mean()


def entropy(probs_TE: torch.Tensor) -> torch.Tensor:
    return -(probs_TE * probs_TE.clamp_min(1e-12).log()).sum(-1).mean()


def competition_weights(scores_TK: torch.Tensor, variant: str) -> torch.Tensor:
    """v2: winners' affinities renormalised to sum to one; v1: softmax over the winners' affinities."""
    if variant == "v1":
        return torch.softmax(scores_TK.float(), dim=-1)
    return scores_TK / scores_TK.sum(-1, keepdim=True).clamp_min(1e-9)


def router_distillation_loss(p_router_TE: torch.Tensor, p_comp_TE: torch.Tensor) -> torch.Tensor:
    """MSE(p_R, stopgrad p_C), mean over tokens and experts: the router learns the competition."""
    return F.mse_loss(p_router_TE, p_comp_TE.detach())


def hybrid_loss(p_router_TE: torch.Tensor, p_comp_TE: torch.Tensor, winners_TK: torch.Tensor) -> torch.Tensor:
    """The same MSE restricted to the K winners of the competition."""
    return F.mse_loss(p_router_TE.gather(1, winners_TK), p_comp_TE.detach().gather(1, winners_TK))


def diversity_loss(outputs_TKD: torch.Tensor) -> torch.Tensor:
    """Mean pairwise cosine similarity among each token's K winners' outputs, diagonal excluded."""
    k = outputs_TKD.shape[1]
    if k < 2:
        return outputs_TKD.new_zeros(())
    unit_TKD = F.normalize(outputs_TKD.float(), dim=-1)
    sim_TKK = unit_TKD @ unit_TKD.transpose(1, 2)
    off_diagonal = sim_TKK.sum((1, 2)) - sim_TKK.diagonal(dim1=1, dim2=2).sum(-1)
    return (off_diagonal / (k * (k - 1))).mean()


def topk_overlap(a_TK: torch.Tensor, b_TK: torch.Tensor) -> torch.Tensor:
    """Share of each token's K choices in `a` that also appear in `b`, averaged over tokens."""
    return (a_TK.unsqueeze(-1) == b_TK.unsqueeze(-2)).any(-1).float().mean()
