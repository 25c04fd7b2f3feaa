"""The MoE layer: a routing policy (router step or competition step) over a token transport.

Shape legend: B batch, S sequence, T = B*S tokens, D d_model, E global experts, e local experts,
K choices per token, A = T*K assignments (token-major), N kept rows at this rank's experts, G tokens
answered by every local expert in a competition step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from competesmoe.moe import baselines, routing
from competesmoe.moe.baselines import RoutingContext, RoutingDecision
from competesmoe.moe.config import MoEConfig
from competesmoe.moe.dispatch import LocalDispatcher, TokenDispatcher
from competesmoe.moe.experts import GroupedExperts, expert_init_stds


@dataclass
class MoEAux:
    """What one MoE layer's forward reports besides its output: the weighted auxiliary loss and
    detached figures for monitoring. Returned, never stored on the module."""

    loss: torch.Tensor
    stats: dict[str, torch.Tensor] = field(default_factory=dict)


def capacity_keep_mask(expert_A: torch.Tensor, num_experts: int, capacity: int) -> torch.Tensor:
    """Keep the first `capacity` assignments of each expert in assignment (token-major) order."""
    order_A = torch.argsort(expert_A, stable=True)
    counts_E = routing.count_per_expert(expert_A, num_experts)
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    rank_in_expert_sorted = torch.arange(expert_A.numel(), device=expert_A.device) - starts_E[expert_A[order_A]]
    keep_A = torch.empty_like(expert_A, dtype=torch.bool)
    keep_A[order_A] = rank_in_expert_sorted < capacity
    return keep_A


class _Affinity(torch.autograd.Function):
    """An affinity of every expert's outputs (routing.AFFINITIES), computed in fp32 one expert at a time: only the
    outputs in their own dtype are kept for backward, never an fp32 copy of all of them."""

    @staticmethod
    def forward(ctx, outputs_eGD, kind):
        ctx.kind = kind
        ctx.save_for_backward(outputs_eGD)
        return torch.stack([routing.AFFINITIES[kind](o_GD.float()) for o_GD in outputs_eGD])

    @staticmethod
    def backward(ctx, grad_eG):
        (outputs_eGD,) = ctx.saved_tensors
        grad_eGD = torch.empty_like(outputs_eGD)
        for o_GD, g_G, out_GD in zip(outputs_eGD, grad_eG, grad_eGD):
            with torch.enable_grad():
                o32_GD = o_GD.detach().float().requires_grad_()
                (grad_o32,) = torch.autograd.grad(routing.AFFINITIES[ctx.kind](o32_GD), o32_GD, g_G)
            out_GD.copy_(grad_o32)
        return grad_eGD, None


def expert_affinities(outputs_eGD: torch.Tensor, kind: str) -> torch.Tensor:
    """scores_eG (fp32): the affinity `kind` of each expert's output for each token."""
    if outputs_eGD.dtype == torch.float32:
        return routing.AFFINITIES[kind](outputs_eGD)
    return _Affinity.apply(outputs_eGD, kind)


def _softmax_router(cfg: MoEConfig, d_model: int, raw_gates: bool) -> routing.SoftmaxRouter:
    return routing.SoftmaxRouter(d_model, cfg.num_experts, balance_coef=cfg.balance_coef,
                                 z_loss_coef=cfg.z_loss_coef, jitter=cfg.jitter, raw_gates=raw_gates)


ROUTING_POLICIES = {
    "smoe": lambda cfg, d_model, vocab: _softmax_router(cfg, d_model, cfg.baseline.smoe_raw_gates),
    "competesmoe": lambda cfg, d_model, vocab: _softmax_router(cfg, d_model, raw_gates=False),
    "xmoe": lambda cfg, d_model, vocab: baselines.XMoERouter(cfg, d_model),
    "stablemoe": lambda cfg, d_model, vocab: baselines.StableMoERouter(cfg, d_model, vocab),
    "smoe_dropout": lambda cfg, d_model, vocab: baselines.RandomFrozenRouter(cfg, d_model),
}
"""moe.router -> the routing policy of router steps (vocab: StableMoE's distilled router routes on token ids)."""


class MoELayer(nn.Module):
    def __init__(self, cfg: MoEConfig, d_model: int, vocab_size: int = 0, n_layers: int = 1):
        """vocab_size: StableMoE's distilled router routes on token ids; n_layers: the model's blocks
        (moe.expert_init 'official_lm' scales the experts' initial weights by sqrt(2 / n_layers))."""
        super().__init__()
        self.cfg = cfg
        self.num_experts = cfg.num_experts
        self.top_k = cfg.top_k
        self.router = ROUTING_POLICIES[cfg.router](cfg, d_model, vocab_size)
        self.experts = GroupedExperts(cfg.num_experts, d_model, cfg.expert_hidden, cfg.activation,
                                      init_stds=expert_init_stds(cfg, d_model, n_layers),
                                      grouped_gemm=cfg.grouped_gemm)
        # The transport; `parallelize` swaps in an expert-parallel one and shards `experts`.
        self.dispatcher: TokenDispatcher = LocalDispatcher(cfg.num_experts)

    def forward(self, x_BSD: torch.Tensor, compete: bool = False,
                ctx: RoutingContext | None = None) -> tuple[torch.Tensor, MoEAux]:
        """ctx: the step and overrides a routing policy may need (routing.RoutingContext)."""
        x_TD = x_BSD.reshape(-1, x_BSD.shape[-1])
        if compete and self.cfg.competes and self.training:
            y_TD, aux = self._competition_step(x_TD)
        else:
            y_TD, aux = self._router_step(x_TD, ctx if ctx is not None else RoutingContext())
        aux.stats.update(routing.weighted_stats({"aux_loss": aux.loss}))
        return y_TD.view_as(x_BSD), aux

    # ------------------------------------------------------------------------------------------
    def route(self, x_TD: torch.Tensor, ctx: RoutingContext) -> RoutingDecision:
        """Top-K experts and gate weights of a router step, from the layer's routing policy."""
        if ctx.top_k is not None and not 1 <= ctx.top_k <= self.num_experts:
            raise ValueError(f"routing top_k {ctx.top_k} must be within [1, {self.num_experts}]")
        return self.router(x_TD, ctx, self.top_k, self.training)

    def _router_step(self, x_TD: torch.Tensor, ctx: RoutingContext) -> tuple[torch.Tensor, MoEAux]:
        cfg = self.cfg
        decision = self.route(x_TD, ctx)
        weights_TK, experts_TK = decision.weights_TK, decision.experts_TK
        keep_TK = None
        if cfg.capacity_factor > 0:
            num_tokens, top_k = experts_TK.shape
            capacity = math.ceil(cfg.capacity_factor * num_tokens * top_k / self.num_experts)
            keep_TK = capacity_keep_mask(experts_TK.reshape(-1), self.num_experts, capacity).view_as(experts_TK)

        x_ND, meta = self.dispatcher.dispatch(x_TD, experts_TK, keep_TK)
        y_ND = self.experts(x_ND, meta.counts_e, meta.counts)
        y_TD = self.dispatcher.combine(y_ND, weights_TK, meta).to(x_TD.dtype)

        stats = self._common_stats(decision.probs_TE, experts_TK, competed=False)
        stats.update(decision.stats)
        if keep_TK is not None:
            stats["dropped_fraction"] = 1.0 - keep_TK.float().mean()
        return y_TD, MoEAux(loss=decision.loss, stats=stats)

    def _competition_step(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, MoEAux]:
        """Every expert answers every token; the highest affinities win (docs/competesmoe.md, section 3)."""
        comp = self.cfg.competition
        # The router only learns from the router loss here (and, v1 combine_gate, through the mixed score).
        logits_TE = self.router.logits(x_TD)
        p_router_TE = torch.softmax(logits_TE, dim=-1)

        x_GD, meta = self.dispatcher.gather_tokens(x_TD)
        outputs_eGD = self.experts.forward_all(x_GD)
        # gather='outputs' (expert parallel): each home rank now holds all E experts' outputs for its
        # own tokens and the rest of the step is local. Otherwise a no-op.
        outputs_eGD, meta = self.dispatcher.gather_outputs(outputs_eGD, meta)
        scores_Ge = expert_affinities(outputs_eGD, comp.affinity).transpose(0, 1)
        scores_TE = self.dispatcher.gather_scores(scores_Ge, meta)
        if comp.combine_gate:
            scores_TE = routing.combine_gate(scores_TE, logits_TE)

        top_scores_TK, winners_TK = scores_TE.topk(self.top_k, dim=-1)
        weights_TK = routing.competition_weights(top_scores_TK, comp.variant)
        outputs_TKD = self.dispatcher.gather_winners(outputs_eGD, winners_TK, meta)
        y_TD = (weights_TK.unsqueeze(-1).float() * outputs_TKD.float()).sum(1).to(x_TD.dtype)

        loss, stats = self._competition_losses(p_router_TE, scores_TE, winners_TK, outputs_TKD)
        return y_TD, MoEAux(loss=loss, stats=stats)

    def _competition_losses(self, p_router_TE, scores_TE, winners_TK, outputs_TKD):
        """The competition's weighted auxiliary loss and its figures (docs/competesmoe.md, sections 3 and 7)."""
        comp = self.cfg.competition
        p_comp_TE = torch.softmax(scores_TE, dim=-1)
        target_TE = routing.competition_target(p_comp_TE, scores_TE, winners_TK, comp.variant)
        distill = routing.router_distillation_loss(p_router_TE, target_TE)
        hybrid = routing.hybrid_loss(p_router_TE, target_TE, winners_TK)
        diversity = routing.diversity_loss(outputs_TKD)
        balance = routing.switch_balance_loss(p_comp_TE, routing.competition_balance_winners(winners_TK, comp.variant))
        weighted = {"router_loss": comp.router_loss_coef * (distill + comp.hybrid_theta * hybrid),
                    "diversity_loss": comp.diversity_coef * diversity,
                    "competition_balance_loss": comp.balance_coef * balance}

        stats = self._common_stats(p_router_TE, winners_TK, competed=True)
        overlap = routing.topk_overlap(p_router_TE.topk(self.top_k, dim=-1).indices, winners_TK)
        stats.update(router_loss=distill.detach(), hybrid_loss=hybrid.detach(), diversity_loss=diversity.detach(),
                     competition_balance_loss=balance.detach(), router_competition_overlap=overlap,
                     # overlap / (K/E): 1 = the router agrees with the competition no more than chance does
                     router_competition_overlap_vs_chance=overlap * (self.num_experts / self.top_k),
                     competition_entropy_ratio=routing.entropy_ratio(p_comp_TE.detach()),
                     expert_output_rms=routing.rms(outputs_TKD.detach()),
                     **routing.weighted_stats(weighted))
        return sum(weighted.values()), stats

    def _common_stats(self, probs_TE, chosen_TK, competed: bool) -> dict[str, torch.Tensor]:
        return {
            "expert_fraction": routing.expert_fraction(chosen_TK, self.num_experts),
            "router_entropy": routing.entropy(probs_TE.detach()),
            "competed": probs_TE.new_full((), float(competed)),
        }
