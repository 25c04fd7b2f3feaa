"""Dense-to-MoE upcycling: an MoE model's starting weights made from a trained dense model of the same shape.

Sparse upcycling (Komatsuzaki et al., 2023), as CompeteSMoE v2 starts its MoE models from dense ones (the v2 code's
--sparse_upcycling, Fsoft-AIC/CompeteSMoE scripts/train/phi35mini/siglip/sft.sh: every expert a deep copy of the
dense MLP). Every MoE layer's experts are copies of the dense FFN at the same block (optionally plus independent
Gaussian noise per expert, so that the experts can tell themselves apart in a competition), its router keeps the
MoE model's own fresh initialisation, and every other tensor (embeddings, attention, norms, head, GLaM's dense
FFNs) is the dense model's. With identical experts an upcycled model computes exactly the dense model's function
at step 0: renormalised top-K weights sum to one on router steps, and on competition steps identical experts have
identical affinities, so the winners' weights sum to one too (docs/competesmoe.md, section 8).

The dense model is a `TransformerLM` with model.layout 'dense', model.dense_hidden = moe.expert_hidden and the same
activation; anything else is refused with a message naming the fields. This module knows nothing of checkpoints:
the caller reads the dense run's weights and loads the result with `moe_model.load_state_dict`, before the model
is parallelized (experts are whole here).
"""

from __future__ import annotations

import torch

from competesmoe.common.errors import UserError
from competesmoe.moe.layer import MoELayer
from competesmoe.moe.model import TransformerLM


def upcycle(dense_state_dict: dict[str, torch.Tensor], moe_model: TransformerLM, noise_std: float = 0.0,
            generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """The state dict of `moe_model` upcycled from `dense_state_dict` (the dense model's `state_dict()`).

    noise_std: standard deviation of the N(0, noise_std^2) noise added to each expert's copy of the dense weights
    (0: exact copies); generator: the random stream of that noise (on the dense tensors' device). `moe_model` is
    not changed."""
    if noise_std < 0:
        raise UserError(f"upcycling noise_std ({noise_std}) must not be negative")
    state = {name: tensor.detach().clone() for name, tensor in moe_model.state_dict().items()}
    moe_layers = {f"blocks.{i}.ffn.": block.ffn for i, block in enumerate(moe_model.blocks)
                  if isinstance(block.ffn, MoELayer)}
    moe_prefixes = tuple(moe_layers)
    for prefix, layer in moe_layers.items():
        experts = layer.experts
        w_in_DF, w_out_FD = _dense_ffn(dense_state_dict, prefix, experts)
        for name, weight in ((prefix + "experts.w_in_EDF", w_in_DF), (prefix + "experts.w_out_EFD", w_out_FD)):
            copies = weight.unsqueeze(0).expand(experts.num_experts, *weight.shape).clone()
            if noise_std > 0:
                copies += noise_std * torch.randn(copies.shape, generator=generator, dtype=copies.dtype,
                                                  device=copies.device)
            state[name] = copies
    for name, tensor in state.items():
        if not name.startswith(moe_prefixes):
            state[name] = _same_tensor(dense_state_dict, name, tensor)
    moe_names = set(state) | {p + w for p in moe_prefixes for w in ("w_in.weight", "w_out.weight")}
    extra = sorted(set(dense_state_dict) - moe_names)
    if extra:
        raise UserError(f"the dense model has {extra[0]}, which the MoE model lacks: upcycling needs the same model "
                        f"section (model.layout 'dense' apart); compare the two runs' model.* settings")
    return state


def _dense_ffn(dense: dict[str, torch.Tensor], prefix: str, experts) -> tuple[torch.Tensor, torch.Tensor]:
    """The dense FFN of one block as one expert's (w_in_DF, w_out_FD); nn.Linear stores [out, in]."""
    names = (prefix + "w_in.weight", prefix + "w_out.weight")
    if any(name not in dense for name in names):
        raise UserError(f"the dense model has no dense FFN at {prefix[:-1]} ({names[0]} missing): upcycle from a run "
                        f"with model.layout: dense")
    w_in_DF, w_out_FD = dense[names[0]].t(), dense[names[1]].t()
    want_in, want_out = tuple(experts.w_in_EDF.shape[1:]), tuple(experts.w_out_EFD.shape[1:])
    if (tuple(w_in_DF.shape), tuple(w_out_FD.shape)) != (want_in, want_out):
        raise UserError(f"the dense FFN at {prefix[:-1]} is {tuple(w_in_DF.shape)} -> {tuple(w_out_FD.shape)} but each "
                        f"expert is {want_in} -> {want_out}: upcycling needs the dense run's model.dense_hidden equal "
                        f"to moe.expert_hidden ({experts.w_out_EFD.shape[1]}) and the same activation "
                        f"(model.dense_activation / moe.activation)")
    return w_in_DF, w_out_FD


def _same_tensor(dense: dict[str, torch.Tensor], name: str, like: torch.Tensor) -> torch.Tensor:
    if name not in dense:
        raise UserError(f"the dense model has no {name}: upcycling needs the same model section (model.layout "
                        f"'dense' apart); compare the two runs' model.* settings")
    if dense[name].shape != like.shape:
        raise UserError(f"{name} is {tuple(dense[name].shape)} in the dense model but {tuple(like.shape)} in the MoE "
                        f"model: upcycling needs the same model.* shape (d_model, n_heads, seq_len, vocabulary)")
    return dense[name].detach().clone().to(like.dtype)
