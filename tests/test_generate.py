"""Generation: the KV cache computes what the full forward computes, sampling is deterministic for a seed, and
the prompt checks of `competesmoe generate`."""

import pytest
import sentencepiece as spm
import torch

from competesmoe.common.errors import UserError
from competesmoe.data.tokenizer import ByteTokenizer, SentencePieceTokenizer
from competesmoe.launcher.generate import encode_prompt
from competesmoe.moe.config import ModelConfig, MoEConfig
from competesmoe.moe.generate import Sampling, generate
from competesmoe.moe.model import KVCache, TransformerLM

VOCAB = 50


def build(layout="switch", positions="rotary", seq_len=16) -> TransformerLM:
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=4, seq_len=seq_len, layout=layout, positions=positions,
                      dense_hidden=48)
    return TransformerLM(cfg, MoEConfig(num_experts=4, top_k=2, expert_hidden=32, activation="swiglu"), VOCAB).eval()


@pytest.mark.parametrize("layout,positions", [("switch", "rotary"), ("glam", "learned"), ("dense", "rotary")])
def test_cached_forward_equals_the_full_forward(layout, positions):
    """A prompt of 5 tokens, then one token at a time, then a chunk of 4: every position's logits as one full
    forward of the 16 tokens computes them; the prefill is the training forward itself (bitwise)."""
    model = build(layout, positions)
    tokens = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        full = model(tokens).logits_BSV
        cache = KVCache.empty(len(model.blocks))
        prefill = model(tokens[:, :5], cache=cache).logits_BSV
        steps = [model(tokens[:, i:i + 1], cache=cache).logits_BSV for i in range(5, 12)]
        chunk = model(tokens[:, 12:], cache=cache).logits_BSV
    assert cache.length == 16
    assert torch.equal(prefill, model(tokens[:, :5]).logits_BSV)
    torch.testing.assert_close(torch.cat([prefill, *steps, chunk], dim=1), full, atol=1e-5, rtol=0)


def greedy_by_recomputation(model: TransformerLM, prompt: torch.Tensor, n: int) -> list[int]:
    tokens = prompt.clone()
    with torch.no_grad():
        for _ in range(n):
            next_id = model(tokens.unsqueeze(0)).logits_BSV[0, -1].argmax()
            tokens = torch.cat([tokens, next_id.view(1)])
    return tokens[len(prompt):].tolist()


def test_greedy_generation_equals_recomputing_every_step():
    model = build()
    prompt = torch.randint(0, VOCAB, (4,))
    assert generate(model, prompt, Sampling(max_new_tokens=12, temperature=0)) == greedy_by_recomputation(model, prompt, 12)
    # top-1 sampling is greedy whatever the temperature
    assert generate(model, prompt, Sampling(max_new_tokens=12, top_k=1, seed=5)) == greedy_by_recomputation(model, prompt, 12)


def test_sampling_is_deterministic_for_a_seed_and_slides_past_the_context():
    model = build(seq_len=16)
    prompt = torch.randint(0, VOCAB, (30,))  # longer than the context: its last 16 tokens are used
    first = generate(model, prompt, Sampling(max_new_tokens=24, temperature=1.0, seed=3))
    assert len(first) == 24  # 40 positions in all, through a 16-token window
    assert generate(model, prompt, Sampling(max_new_tokens=24, temperature=1.0, seed=3)) == first
    assert generate(model, prompt, Sampling(max_new_tokens=24, temperature=1.0, seed=4)) != first
    assert generate(model, prompt[-16:], Sampling(max_new_tokens=24, temperature=1.0, seed=3)) == first


def test_generation_stops_at_the_end_of_document():
    model = build()
    prompt = torch.randint(0, VOCAB, (4,))
    greedy = greedy_by_recomputation(model, prompt, 6)
    stop = greedy[3]
    assert generate(model, prompt, Sampling(max_new_tokens=6, temperature=0), stop_id=stop) == greedy[:greedy.index(stop)]


def test_generate_refuses_training_mode_and_bad_sampling():
    with pytest.raises(ValueError, match="eval mode"):
        generate(build().train(), torch.tensor([1, 2]), Sampling())
    for bad, field in [({"top_k": 0}, "top_k"), ({"temperature": -1.0}, "temperature"),
                       ({"max_new_tokens": -1}, "max_new_tokens")]:
        with pytest.raises(ValueError, match=f"^{field} "):
            Sampling(**bad)


@pytest.fixture(scope="module")
def spm_without_byte_fallback(tmp_path_factory) -> SentencePieceTokenizer:
    """A user's SentencePiece model that maps characters it lacks to <unk>."""
    path = tmp_path_factory.mktemp("spm") / "plain.model"
    text = [f"the quick brown fox {i} jumps over the lazy dog" for i in range(200)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_prefix=str(path.with_suffix("")),
                                   vocab_size=40, hard_vocab_limit=False, byte_fallback=False,
                                   minloglevel=2)
    return SentencePieceTokenizer(path)


def test_prompt_checks(spm_without_byte_fallback):
    assert encode_prompt(ByteTokenizer(), b"\xff\xfe caf\xc3\xa9").tolist() == [255, 254, 32, 99, 97, 102, 195, 169]
    with pytest.raises(UserError, match="^--prompt is empty"):
        encode_prompt(ByteTokenizer(), b"")
    with pytest.raises(UserError, match=r"^--prompt is not UTF-8 text \(byte 0xe9 at offset 3\)"):
        encode_prompt(spm_without_byte_fallback, b"caf\xe9")
    with pytest.raises(UserError, match="no piece for .*'é€'"):
        encode_prompt(spm_without_byte_fallback, "the café costs 3€".encode())
    assert len(encode_prompt(spm_without_byte_fallback, b"the lazy fox")) > 0
