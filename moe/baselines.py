"""The papers' baseline routing policies, beside the softmax router and the competition.

Same model, same data, only the routing differs (docs/competesmoe.md, section 6). Each policy
only turns a layer's tokens into top-K expert indices and gate weights (a `RoutingDecision`); the
MoE layer then dispatches them over whatever transport it has, so every policy works with expert
parallelism unchanged.

  * XMoE (Chi et al. 2022): tokens are projected into a low-dimensional routing space and scored by
    cosine similarity to learned expert embeddings, divided by a temperature (learned by default; fixed
    as in the v2 code with moe.baseline.xmoe_learn_temperature=false); softmax, top-K, weights
    renormalised (or, xmoe_gates=softmax_topk, a softmax over the top-K probabilities as the v2 code);
    Switch balance loss.
  * StableMoE (Dai et al. 2022): stage 1 routes by s = x C^T (top-K, gate sigmoid(s)) with StableMoE's
    balance loss and distils the assignment into a lightweight router that sees only the token id
    (a small token embedding times distilled centroids); stage 2 routes with that distilled router,
    frozen, while the gates sigmoid(s) keep learning from the task.
  * SMoE-Dropout (Chen et al. 2023): a random router that is never trained; the number of active
    experts grows linearly over training; evaluation uses moe.top_k.

Switch / GShard are `router: smoe` with top_k 1 / 2 (moe/layer.py); the dense baseline is
`model.layout: dense` with `model.dense_hidden = top_k * expert_hidden` (equal active parameters).
The papers' own settings of these baselines (no balance loss in v1, v2's fixed-temperature XMoE) are
named presets in moe/presets.py.

Each policy is a module with the interface of `routing.SoftmaxRouter`: it returns a
`routing.RoutingDecision`. What a policy needs from training (the step, for StableMoE's stage and
SMoE-Dropout's K) comes in explicitly through a `routing.RoutingContext` passed down the forward;
nothing is kept on the modules between calls.

Shape legend: T tokens, D d_model, E experts (global), K experts chosen per token, R routing-space
width, V vocabulary, B batch, S sequence.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from competesmoe.moe import routing
from competesmoe.moe.routing import RoutingContext, RoutingDecision

MIN_TEMPERATURE = 0.01


# ---------------------------------------------------------------------------------------------
# The math, as plain functions (tests/test_baselines.py checks each against loops).


def cosine_logits(x_TD: torch.Tensor, proj_RD: torch.Tensor, embed_ER: torch.Tensor,
                  log_inv_temperature: torch.Tensor) -> torch.Tensor:
    """XMoE: cos(W x, e_i) / tau in fp32, W: D -> R, tau = exp(-log_inv_temperature) kept >= 0.01."""
    z_TR = F.normalize(x_TD.float() @ proj_RD.float().t(), dim=-1, eps=1e-6)
    e_ER = F.normalize(embed_ER.float(), dim=-1, eps=1e-6)
    scale = log_inv_temperature.float().clamp(max=math.log(1.0 / MIN_TEMPERATURE)).exp()
    return (z_TR @ e_ER.t()) * scale


def stablemoe_balance_loss(scores_TE: torch.Tensor, experts_TK: torch.Tensor) -> torch.Tensor:
    """StableMoE's balance loss, per assignment: sum_i (c_i - c)/c * sum_{t in A_i} sigmoid(s_ti) / (T K).

    c_i = assignments to expert i, c = T K / E their mean, A_i = tokens assigned to i. Gradient raises
    the gates of under-loaded experts and lowers those of over-loaded ones.
    """
    num_tokens, k = experts_TK.shape
    num_experts = scores_TE.shape[-1]
    counts_E = torch.bincount(experts_TK.reshape(-1), minlength=num_experts).to(scores_TE.dtype)
    mean = num_tokens * k / num_experts
    chosen_gates_TK = torch.sigmoid(scores_TE.gather(1, experts_TK))
    overload_TK = ((counts_E - mean) / mean)[experts_TK]
    return (overload_TK.detach() * chosen_gates_TK).sum() / max(num_tokens * k, 1)


def distillation_cross_entropy(logits_TE: torch.Tensor, experts_TK: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the distilled router against the stage-1 assignment: uniform over the K
    chosen experts (K = 1: plain cross-entropy to the chosen expert), mean over tokens."""
    logp_TE = torch.log_softmax(logits_TE.float(), dim=-1)
    return -logp_TE.gather(1, experts_TK.detach()).mean()


def stablemoe_stage(step: int, total_steps: int, stage1_fraction: float) -> int:
    """1 while step < floor(stage1_fraction * total_steps), then 2."""
    return 1 if step < int(stage1_fraction * total_steps) else 2


def smoe_dropout_k(step: int, total_steps: int, k_start: int, k_end: int) -> int:
    """K grows linearly from k_start (first step) to k_end (last steps); each value gets an equal share."""
    levels = k_end - k_start + 1
    return min(k_end, k_start + (levels * max(step, 0)) // max(total_steps, 1))


# ---------------------------------------------------------------------------------------------
# The policies as modules (their parameters live under `router`, so they get no weight decay).


class XMoERouter(nn.Module):
    def __init__(self, cfg, d_model: int):
        super().__init__()
        b = cfg.baseline
        self.cfg = cfg
        self.proj_RD = nn.Parameter(torch.empty(b.xmoe_dim, d_model))
        self.embed_ER = nn.Parameter(torch.empty(cfg.num_experts, b.xmoe_dim))
        # shape [1], not a 0-dim tensor: DeepSpeed's initial broadcast cannot view a 0-dim parameter
        log_inv_temperature = torch.full((1,), math.log(1.0 / b.xmoe_temperature))
        if b.xmoe_learn_temperature:
            self.log_inv_temperature = nn.Parameter(log_inv_temperature)
        else:  # the v2 code's fixed temperature: a buffer, saved with the model and never trained
            self.register_buffer("log_inv_temperature", log_inv_temperature)
        nn.init.normal_(self.proj_RD, std=0.02)
        nn.init.orthogonal_(self.embed_ER, gain=0.32)

    def forward(self, x_TD: torch.Tensor, ctx: RoutingContext, default_k: int, training: bool) -> RoutingDecision:
        k = ctx.top_k or default_k
        logits_TE = cosine_logits(x_TD, self.proj_RD, self.embed_ER, self.log_inv_temperature)
        probs_TE = torch.softmax(logits_TE, dim=-1)
        weights_TK, experts_TK = routing.topk_renormalised(probs_TE, k)
        if self.cfg.baseline.xmoe_gates == "softmax_topk":  # the v2 code's _keepTopk
            weights_TK = torch.softmax(probs_TE.gather(1, experts_TK), dim=-1)
        balance = routing.switch_balance_loss(probs_TE, experts_TK)
        temperature = torch.exp(-self.log_inv_temperature.detach().float()).clamp(min=MIN_TEMPERATURE).reshape(())
        weighted = {"balance_loss": self.cfg.balance_coef * balance}
        return RoutingDecision(weights_TK, experts_TK, probs_TE, weighted["balance_loss"],
                               {"balance_loss": balance.detach(), "temperature": temperature,
                                **routing.weighted_stats(weighted)})


class StableMoERouter(nn.Module):
    def __init__(self, cfg, d_model: int, vocab_size: int):
        super().__init__()
        if vocab_size < 1:
            raise ValueError("StableMoE's distilled router routes on token ids: build the layer with vocab_size")
        b = cfg.baseline
        self.cfg = cfg
        self.centroids_ED = nn.Parameter(torch.empty(cfg.num_experts, d_model))
        self.distilled_embed_VR = nn.Parameter(torch.empty(vocab_size, b.stablemoe_dim))
        self.distilled_centroids_ER = nn.Parameter(torch.empty(cfg.num_experts, b.stablemoe_dim))
        nn.init.normal_(self.centroids_ED, std=0.02)
        nn.init.normal_(self.distilled_embed_VR, std=1.0)
        nn.init.normal_(self.distilled_centroids_ER, std=1.0 / math.sqrt(b.stablemoe_dim))

    def distilled_params(self) -> list[nn.Parameter]:
        return [self.distilled_embed_VR, self.distilled_centroids_ER]

    def distilled_logits(self, tokens_T: torch.Tensor) -> torch.Tensor:
        return self.distilled_embed_VR[tokens_T].float() @ self.distilled_centroids_ER.float().t()

    def forward(self, x_TD: torch.Tensor, ctx: RoutingContext, default_k: int, training: bool) -> RoutingDecision:
        if ctx.tokens_BS is None:
            raise ValueError("StableMoE needs the token ids in the routing context (TransformerLM fills them in)")
        b = self.cfg.baseline
        k = ctx.top_k or default_k
        stage = stablemoe_stage(ctx.step, ctx.total_steps, b.stablemoe_stage1)
        # Stage 2 freezes the distilled router. The flag is set from the context on every call (a pure
        # function of the step, no history), so its parameters get no gradient (None, not zeros):
        # DeepSpeed's ZeRO-0 path skips them and torch AdamW leaves them untouched, momentum included.
        # ZeRO 1/2 and bf16 step their flat fp32 copies anyway, so the config refuses them for StableMoE.
        for param in self.distilled_params():
            param.requires_grad_(stage == 1)
        tokens_T = ctx.tokens_BS.reshape(-1)
        scores_TE = x_TD.float() @ self.centroids_ED.float().t()
        zero = scores_TE.new_zeros(())
        if stage == 1:
            experts_TK = scores_TE.topk(k, dim=-1).indices
            distill = distillation_cross_entropy(self.distilled_logits(tokens_T), experts_TK)
            balance = stablemoe_balance_loss(scores_TE, experts_TK)
            probs_TE = torch.softmax(scores_TE, dim=-1)
            weighted = {"balance_loss": self.cfg.balance_coef * balance,
                        "distill_loss": b.stablemoe_distill_coef * distill}
            loss = sum(weighted.values())
        else:
            distilled_TE = self.distilled_logits(tokens_T).detach()
            experts_TK = distilled_TE.topk(k, dim=-1).indices
            probs_TE = torch.softmax(distilled_TE, dim=-1)
            distill = balance = zero
            weighted = {"balance_loss": zero, "distill_loss": zero}
            loss = zero
        weights_TK = torch.sigmoid(scores_TE.gather(1, experts_TK))
        return RoutingDecision(weights_TK, experts_TK, probs_TE, loss,
                               {"balance_loss": balance.detach(), "distill_loss": distill.detach(),
                                "stage": zero.new_tensor(float(stage)), **routing.weighted_stats(weighted)})


class RandomFrozenRouter(nn.Module):
    """SMoE-Dropout: a random linear gate that is never trained (a buffer, saved with the model)."""

    def __init__(self, cfg, d_model: int):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("weight_ED", torch.randn(cfg.num_experts, d_model) / math.sqrt(d_model))

    def active_k(self, ctx: RoutingContext, default_k: int, training: bool) -> int:
        if ctx.top_k:
            return ctx.top_k
        if not training:
            return default_k
        b = self.cfg.baseline
        return smoe_dropout_k(ctx.step, ctx.total_steps, b.dropout_k_start, b.dropout_k_end or self.cfg.num_experts)

    def forward(self, x_TD: torch.Tensor, ctx: RoutingContext, default_k: int, training: bool) -> RoutingDecision:
        k = self.active_k(ctx, default_k, training)
        logits_TE = x_TD.float() @ self.weight_ED.float().t()
        probs_TE = torch.softmax(logits_TE, dim=-1)
        weights_TK, experts_TK = routing.topk_renormalised(probs_TE, k)
        return RoutingDecision(weights_TK, experts_TK, probs_TE, probs_TE.new_zeros(()),
                               {"active_k": probs_TE.new_tensor(float(k))})

