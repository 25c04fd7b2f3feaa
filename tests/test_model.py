"""The Transformer LM: layouts, positions, tied embeddings, causality, and the MoE plumbing."""

import pytest
import torch

from competesmoe.moe.config import ModelConfig, MoEConfig
from competesmoe.moe.layer import MoELayer
from competesmoe.moe.model import TransformerLM


def build(**model) -> TransformerLM:
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, n_layers=4, n_heads=4, seq_len=16, dense_hidden=64, **model)
    return TransformerLM(cfg, MoEConfig(num_experts=4, top_k=2, expert_hidden=32), vocab_size=50)


@pytest.mark.parametrize("layout,moe_blocks", [("switch", [0, 1, 2, 3]), ("glam", [1, 3]), ("dense", [])])
def test_layouts_place_moe_layers(layout, moe_blocks):
    model = build(layout=layout)
    assert [i for i, b in enumerate(model.blocks) if isinstance(b.ffn, MoELayer)] == moe_blocks
    out = model(torch.randint(0, 50, (2, 16)), torch.randint(0, 50, (2, 16)), frozenset({0}))
    assert len(out.moe_aux) == len(moe_blocks)
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("positions", ["rotary", "learned"])
def test_causal_the_future_does_not_change_the_past(positions):
    model = build(positions=positions).eval()
    tokens = torch.randint(0, 50, (1, 16))
    changed = tokens.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % 50
    a, b = model(tokens).logits_BSV, model(changed).logits_BSV
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_tied_and_untied_embeddings():
    tied = build(tie_embeddings=True)
    assert tied.head.weight.data_ptr() == tied.embed.weight.data_ptr()
    untied = build(tie_embeddings=False)
    assert untied.head.weight.data_ptr() != untied.embed.weight.data_ptr()


def test_compete_layers_select_which_moe_layers_compete():
    model = build(layout="glam").train()
    out = model(torch.randint(0, 50, (2, 16)), torch.randint(0, 50, (2, 16)), frozenset({1}))
    assert [a.stats["competed"].item() for a in out.moe_aux] == [0.0, 1.0]


def test_official_lm_expert_init_uses_the_model_depth():
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, n_layers=8, n_heads=4, seq_len=16, dense_hidden=64)
    model = TransformerLM(cfg, MoEConfig(num_experts=8, top_k=2, expert_hidden=64, expert_init="official_lm"), 50)
    experts = model.moe_layers[0].experts
    assert experts.w_in_EDF.std().item() == pytest.approx((2 / 8) ** 0.5 / 32 ** 0.5, rel=0.05)
    assert experts.w_out_EFD.std().item() == pytest.approx((2 / 8) ** 0.5 / (8 * 64) ** 0.5, rel=0.05)
