"""A decoder-only Transformer LM whose FFNs are MoE layers ("switch"), alternate dense/MoE ("glam"),
or are all dense ("dense"). It knows nothing of parallelism.

Shape legend: B batch, S sequence (the tokens of this call), P positions held in a KV cache (earlier ones and
these), D d_model, H heads, Dh head size, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from competesmoe.moe.config import ModelConfig, MoEConfig
from competesmoe.moe.experts import DenseFFN
from competesmoe.moe.layer import MoEAux, MoELayer
from competesmoe.moe.routing import RoutingContext


@dataclass
class ModelOutput:
    logits_BSV: torch.Tensor
    lm_loss: torch.Tensor | None
    """Mean next-token cross-entropy in nats (None without targets)."""
    aux_loss: torch.Tensor
    """Sum over MoE layers of their weighted auxiliary losses."""
    moe_aux: list[MoEAux] = field(default_factory=list)
    """Per MoE layer, in order: the loss terms and routing figures."""

    @property
    def loss(self) -> torch.Tensor:
        return self.lm_loss + self.aux_loss


ROTARY_BASE = 10000.0
"""The rotary embeddings' base (theta): inverse frequencies base^(-2i / Dh)."""


@dataclass
class LayerCache:
    """One block's keys and values of the positions seen so far (generation; training never uses one)."""

    k_BHPDh: torch.Tensor | None = None
    v_BHPDh: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.k_BHPDh is None else self.k_BHPDh.shape[-2]

    def append(self, k_BHSDh: torch.Tensor, v_BHSDh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Adds this call's keys and values; returns those of every position so far."""
        if self.k_BHPDh is not None:
            k_BHSDh, v_BHSDh = torch.cat([self.k_BHPDh, k_BHSDh], dim=-2), torch.cat([self.v_BHPDh, v_BHSDh], dim=-2)
        self.k_BHPDh, self.v_BHPDh = k_BHSDh, v_BHSDh
        return k_BHSDh, v_BHSDh


@dataclass
class KVCache:
    """Every block's LayerCache: a model called with one continues from the positions it holds."""

    layers: list[LayerCache]

    @classmethod
    def empty(cls, n_layers: int) -> KVCache:
        return cls([LayerCache() for _ in range(n_layers)])

    @property
    def length(self) -> int:
        return self.layers[0].length


def rotary_tables(seq_len: int, head_dim: int, base: float = ROTARY_BASE) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles_SH = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    return angles_SH.cos(), angles_SH.sin()


def apply_rotary(x_BHSDh: torch.Tensor, cos_SH: torch.Tensor, sin_SH: torch.Tensor, start: int = 0) -> torch.Tensor:
    """Rotates each head's halves (x1, x2) by the angles of positions start .. start + S - 1."""
    seq = x_BHSDh.shape[-2]
    x1, x2 = x_BHSDh.float().chunk(2, dim=-1)
    cos, sin = cos_SH[start:start + seq], sin_SH[start:start + seq]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x_BHSDh.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.dropout = cfg.dropout
        self.rotary = cfg.positions == "rotary"
        if self.rotary:
            cos, sin = rotary_tables(cfg.seq_len, cfg.d_model // cfg.n_heads)
            self.register_buffer("rotary_cos", cos, persistent=False)
            self.register_buffer("rotary_sin", sin, persistent=False)

    def forward(self, x_BSD: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        """cache: the earlier positions' keys and values (generation); x_BSD then holds the positions after them."""
        batch, seq, d_model = x_BSD.shape
        start = 0 if cache is None else cache.length
        qkv = self.qkv(x_BSD).view(batch, seq, 3, self.n_heads, d_model // self.n_heads)
        q_BHSDh, k_BHSDh, v_BHSDh = qkv.permute(2, 0, 3, 1, 4)
        if self.rotary:
            q_BHSDh = apply_rotary(q_BHSDh, self.rotary_cos, self.rotary_sin, start)
            k_BHSDh = apply_rotary(k_BHSDh, self.rotary_cos, self.rotary_sin, start)
        mask_SP = None
        if cache is not None:
            k_BHSDh, v_BHSDh = cache.append(k_BHSDh, v_BHSDh)
            if start > 0:  # is_causal aligns the mask top-left; these queries sit after `start` cached keys
                positions = torch.arange(start + seq, device=x_BSD.device)
                mask_SP = positions[None, :] <= positions[start:, None]
        out = F.scaled_dot_product_attention(q_BHSDh, k_BHSDh, v_BHSDh, attn_mask=mask_SP, is_causal=mask_SP is None,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.proj(out.transpose(1, 2).reshape(batch, seq, d_model))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, moe_cfg: MoEConfig, use_moe: bool, vocab_size: int = 0):
        super().__init__()
        self.norm_attn = nn.RMSNorm(cfg.d_model)
        self.attn = Attention(cfg)
        self.norm_ffn = nn.RMSNorm(cfg.d_model)
        self.ffn = (MoELayer(moe_cfg, cfg.d_model, vocab_size, cfg.n_layers) if use_moe
                    else DenseFFN(cfg.d_model, cfg.dense_hidden, cfg.dense_activation or moe_cfg.activation))
        self.drop = nn.Dropout(cfg.dropout)

    @property
    def is_moe(self) -> bool:
        return isinstance(self.ffn, MoELayer)

    def forward(self, x_BSD: torch.Tensor, compete: bool, ctx: RoutingContext | None = None,
                cache: LayerCache | None = None) -> tuple[torch.Tensor, MoEAux | None]:
        x_BSD = x_BSD + self.drop(self.attn(self.norm_attn(x_BSD), cache))
        h_BSD = self.norm_ffn(x_BSD)
        if self.is_moe:
            y_BSD, aux = self.ffn(h_BSD, compete=compete, ctx=ctx)
        else:
            y_BSD, aux = self.ffn(h_BSD), None
        return x_BSD + self.drop(y_BSD), aux


def uses_moe(layout: str, block_index: int) -> bool:
    return layout == "switch" or (layout == "glam" and block_index % 2 == 1)


class TransformerLM(nn.Module):
    def __init__(self, cfg: ModelConfig, moe_cfg: MoEConfig, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(vocab_size, cfg.d_model)
        self.pos_embed = nn.Embedding(cfg.seq_len, cfg.d_model) if cfg.positions == "learned" else None
        self.blocks = nn.ModuleList(Block(cfg, moe_cfg, uses_moe(cfg.layout, i), vocab_size) for i in range(cfg.n_layers))
        self.norm_out = nn.RMSNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, vocab_size, bias=False)
        self._init_weights()
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
        for block in self.blocks:  # scaled residual projections (GPT-2)
            nn.init.normal_(block.attn.proj.weight, std=0.02 / math.sqrt(2 * self.cfg.n_layers))

    @property
    def moe_layers(self) -> list[MoELayer]:
        return [b.ffn for b in self.blocks if b.is_moe]

    def hidden(self, tokens_BS: torch.Tensor, compete_layers: frozenset[int] = frozenset(),
               routing: RoutingContext | None = None, cache: KVCache | None = None) -> tuple[torch.Tensor, list[MoEAux]]:
        """The final normalised hidden states (before the LM head) and each MoE layer's aux.
        cache: generation's keys and values (KVCache.empty to start); tokens_BS continue the positions it holds."""
        ctx = replace(routing if routing is not None else RoutingContext(), tokens_BS=tokens_BS)
        x_BSD = self.embed(tokens_BS)
        if self.pos_embed is not None:
            start = 0 if cache is None else cache.length
            x_BSD = x_BSD + self.pos_embed(torch.arange(start, start + tokens_BS.shape[1], device=tokens_BS.device))
        moe_aux: list[MoEAux] = []
        for i, block in enumerate(self.blocks):
            x_BSD, aux = block(x_BSD, compete=len(moe_aux) in compete_layers, ctx=ctx,
                               cache=None if cache is None else cache.layers[i])
            if aux is not None:
                moe_aux.append(aux)
        return self.norm_out(x_BSD), moe_aux

    def forward(self, tokens_BS: torch.Tensor, targets_BS: torch.Tensor | None = None,
                compete_layers: frozenset[int] = frozenset(), routing: RoutingContext | None = None,
                cache: KVCache | None = None) -> ModelOutput:
        """compete_layers: indices (among MoE layers, from 0) that run a competition step now.
        routing: the step and overrides the routing policies may need (None: step 0, the policies' K).
        cache: generation's keys and values (see `hidden`); None in training."""
        h_BSD, moe_aux = self.hidden(tokens_BS, compete_layers, routing, cache)
        logits_BSV = self.head(h_BSD)
        lm_loss = None
        if targets_BS is not None:
            lm_loss = F.cross_entropy(logits_BSV.float().flatten(0, 1), targets_BS.flatten())
        aux_loss = sum((a.loss for a in moe_aux), logits_BSV.new_zeros((), dtype=torch.float32))
        return ModelOutput(logits_BSV=logits_BSV, lm_loss=lm_loss, aux_loss=aux_loss, moe_aux=moe_aux)
