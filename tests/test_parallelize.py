"""The parallelize step's activation checkpointing: the same numbers as without it (dropout and router
jitter included: RNG is replayed), the same parameter names, and fewer activations kept for backward.
Expert parallelism under recomputation is checked on real ranks in test_ep_training.py."""

import copy

import pytest
import torch

from competesmoe.moe.config import ModelConfig, MoEConfig
from competesmoe.moe.model import TransformerLM
from competesmoe.parallel.parallelize import apply_activation_checkpointing

MODES = ["experts", "full"]


def build() -> TransformerLM:
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=4, seq_len=16, dropout=0.1, layout="glam", dense_hidden=64)
    return TransformerLM(cfg, MoEConfig(num_experts=4, top_k=2, expert_hidden=64, jitter=0.1), vocab_size=50).train()


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, 50, (3, 16), generator=gen), torch.randint(0, 50, (3, 16), generator=gen)


def loss_and_grads(model: TransformerLM, compete: frozenset[int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(2)  # dropout and jitter draw from here, in forward and again in the recomputation
    out = model(*batch(), compete)
    (out.loss + out.aux_loss).backward()
    return out.loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("compete", [frozenset(), frozenset({0})], ids=["router-step", "competition-step"])
@pytest.mark.parametrize("mode", MODES)
def test_recomputation_gives_the_same_loss_and_gradients(mode, compete):
    reference = build()
    recomputed = copy.deepcopy(reference)
    apply_activation_checkpointing(recomputed, mode)
    loss_ref, grads_ref = loss_and_grads(reference, compete)
    loss, grads = loss_and_grads(recomputed, compete)
    assert torch.equal(loss, loss_ref)
    assert grads.keys() == grads_ref.keys() and len(grads) > 10
    for name, grad in grads.items():
        torch.testing.assert_close(grad, grads_ref[name], rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("mode", MODES)
def test_parameter_names_and_state_dict_are_unchanged(mode):
    model = build()
    names, keys = [n for n, _ in model.named_parameters()], list(model.state_dict())
    apply_activation_checkpointing(model, mode)
    assert [n for n, _ in model.named_parameters()] == names and list(model.state_dict()) == keys


def kept_activation_bytes(model: TransformerLM, compete: frozenset[int]) -> int:
    """Bytes of the distinct non-parameter tensors that forward keeps for backward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(*batch(), compete)
    out.loss.backward()
    return sum(kept.values())


@pytest.mark.parametrize("compete", [frozenset(), frozenset({0})], ids=["router-step", "competition-step"])
def test_recomputation_keeps_fewer_activations(compete):
    kept = {}
    for mode in ["none", *MODES]:
        model = build()
        apply_activation_checkpointing(model, mode)
        kept[mode] = kept_activation_bytes(model, compete)
    assert kept["none"] > kept["experts"] > kept["full"] > 0, kept
