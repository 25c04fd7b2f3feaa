"""Text continuation with a trained model: the router's top-K routing (no competition: that only shapes training),
one token at a time from a KV cache.

The context is the model's training length (model.seq_len): when prompt and continuation outgrow it, the cache is
dropped and the newest half of the window is encoded again (so rotary and learned positions stay within what the
model was trained on).

Shape legend: S tokens so far (prompt and continuation), V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from competesmoe.moe.model import KVCache, TransformerLM
from competesmoe.moe.routing import RoutingContext


@dataclass(frozen=True)
class Sampling:
    """How each next token is chosen."""

    max_new_tokens: int = 200
    """Tokens to add at most (fewer when the model ends the document)."""
    temperature: float = 1.0
    """Softmax temperature; 0 = always the most likely token (greedy)."""
    top_k: int | None = None
    """Sample only among the K most likely tokens (None: all)."""
    seed: int = 0
    """Seed of the sampling generator: the same seed, model and prompt give the same continuation."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens ({self.max_new_tokens}) must not be negative")
        if self.temperature < 0:
            raise ValueError(f"temperature ({self.temperature}) must not be negative")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k ({self.top_k}) must be at least 1")


@torch.no_grad()
def generate(model: TransformerLM, prompt_S: torch.Tensor, sampling: Sampling, stop_id: int | None = None,
             routing: RoutingContext | None = None) -> list[int]:
    """The ids that continue prompt_S (1-D, on the model's device), without stop_id (the end of document) when
    the model chooses it. The model must be in eval mode (routing without jitter or competition); routing: the
    step a routing policy may need (StableMoE's stage), as in evaluation."""
    if model.training:
        raise ValueError("generate needs the model in eval mode (model.eval())")
    if prompt_S.numel() == 0:
        raise ValueError("generate needs a prompt of at least one token")
    generator = torch.Generator(device=prompt_S.device).manual_seed(sampling.seed)
    window = model.cfg.seq_len
    tokens_S = prompt_S[-window:]
    cache, logits_V = _encode(model, tokens_S, routing)
    new: list[int] = []
    while len(new) < sampling.max_new_tokens:
        next_id = next_token(logits_V, sampling, generator)
        if next_id == stop_id:
            break
        new.append(next_id)
        tokens_S = torch.cat([tokens_S, tokens_S.new_tensor([next_id])])
        if cache.length == window:  # the window is full: keep its newest half and encode that again
            tokens_S = tokens_S[-(window // 2 + 1):]
            cache, logits_V = _encode(model, tokens_S, routing)
        else:
            logits_V = model(tokens_S[-1:].unsqueeze(0), routing=routing, cache=cache).logits_BSV[0, -1]
    return new


def _encode(model: TransformerLM, tokens_S: torch.Tensor, routing: RoutingContext | None) -> tuple[KVCache, torch.Tensor]:
    """A fresh cache holding tokens_S, and the next-token logits after them."""
    cache = KVCache.empty(len(model.blocks))
    return cache, model(tokens_S.unsqueeze(0), routing=routing, cache=cache).logits_BSV[0, -1]


def next_token(logits_V: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> int:
    """Greedy at temperature 0; otherwise a draw from softmax(logits / T) over the top-K logits."""
    logits_V = logits_V.float()
    if sampling.temperature == 0:
        return int(logits_V.argmax())
    logits_V = logits_V / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < logits_V.numel():
        kth = logits_V.topk(sampling.top_k).values[-1]
        logits_V = logits_V.masked_fill(logits_V < kth, float("-inf"))
    return int(torch.multinomial(torch.softmax(logits_V, dim=-1), 1, generator=generator))
