"""`competesmoe export --format hf`: a checkpoint (any EP layout) as a Hugging Face model folder that
`transformers` loads as `MixtralForCausalLM` (AutoModelForCausalLM, no remote code): config.json, safetensors
shards in Mixtral's checkpoint names, the tokenizer (tokenizer.json, tokenizer_config.json; SentencePiece runs
also tokenizer.model) and generation_config.json.

At inference a CompeteSMoE model is an ordinary sparse MoE (the competition only shapes training): evaluation
routes by the router's top-K of a softmax, renormalised, which is Mixtral's router. The blocks are Mixtral's too:
pre-RMSNorm, rotary positions with the rotate-half convention, bias-free projections, SwiGLU experts. So the
`switch` layout with SwiGLU experts and rotary positions exports exactly (the equality is tested on logits). The
rest is refused, naming the keys that would make a model exportable:
- GELU experts (moe.activation: gelu): Mixtral's experts are gated, act(x W1) * (x W3), and a plain GELU MLP is
  not one of them (without biases no W3 makes the gate 1); no decoder-only class of transformers has ungated
  experts with rotary positions (Switch Transformers and NLLB-MoE are encoder-decoders).
- `glam` (dense and MoE blocks alternate) and `dense`: Mixtral has no dense blocks. The one class with
  softmax-top-K routing and interleaved dense blocks, Qwen2-MoE (decoder_sparse_step 2), always adds a gated
  shared expert: a zero-width one would be exact in transformers but not something inference servers and
  quantisers are known to accept.
- learned positions, the xmoe / stablemoe routers (cosine routing, token-id routing), raw Switch gates
  (moe.baseline.smoe_raw_gates) and a capacity factor (our evaluation drops tokens; Mixtral never does).

Weights keep their dtype. RMSNorm's eps is the one our norms use (torch.nn.RMSNorm without eps takes the
input dtype's epsilon; Mixtral's norm computes in fp32, so fp32's), the rotary base is moe.model.ROTARY_BASE.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import torch

from competesmoe.common.errors import UserError
from competesmoe.data.tokenizer import ByteTokenizer, SentencePieceTokenizer
from competesmoe.launcher.checkpoint import model_state, open_checkpoint
from competesmoe.launcher.checkpoint.reading import run_tokenizer
from competesmoe.launcher.config import Config
from competesmoe.moe.model import ROTARY_BASE

ARCHITECTURE = "MixtralForCausalLM"
EOD_TOKEN = "<|endoftext|>"
"""The byte tokenizer's end-of-document id (256) in the exported vocabulary."""
EXPORTABLE_ROUTERS = ("competesmoe", "smoe", "smoe_dropout")
"""Routers whose evaluation is a linear softmax top-K with renormalised weights (Mixtral's router)."""
PROBE_TEXT = "Grüße, 世界! naïve café — ½ × 3 ≥ 1 🙂\n\tTabs,  two  spaces,   three.\n\nEnd."
"""Checked through both tokenizers on export: unicode, emoji (byte fallback), whitespace runs, newlines."""
SPM_TEXT_PIECES = (1, 4)
"""SentencePiece piece types that text can be segmented into: NORMAL, USER_DEFINED (not UNKNOWN, CONTROL, UNUSED
or BYTE, which it reaches only as <unk> and byte fallback)."""
UNIGRAM_TIES = ("a unigram SentencePiece model converts to a tokenizers Unigram that finds the same best "
                "segmentation, but where two segmentations score exactly the same it may pick the other one "
                "(SentencePiece sums scores in float32, tokenizers in float64): about 1 token in 1,500 of text "
                "differs; tokenizer.model in the folder encodes exactly (sentencepiece), or train with "
                "data.spm_model_type: bpe (identical ids)")
"""What an exported unigram tokenizer does not guarantee (measured by tests/test_hf_export.py)."""
UNREACHABLE = -1e9
"""A unigram score no segmentation of text chooses while another exists."""


def export_hf(checkpoint: Path, out_dir: Path, max_shard_size: int | str = "5GB") -> Path:
    """Writes the Hugging Face folder of a checkpoint into out_dir (new or empty), all at once."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"{out_dir} is not an empty folder; choose a new or empty output folder (nothing is "
                        f"overwritten)")
    _require_transformers()
    saved = open_checkpoint(checkpoint)
    check_exportable(saved.cfg, saved.path)
    tokenizer = run_tokenizer(saved)
    state = mixtral_state(model_state(saved), saved.cfg)
    staging = out_dir.parent / f".{out_dir.name}.staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)  # left by an export of ours that was killed
    staging.mkdir(parents=True)
    try:
        write_folder(staging, saved.cfg, state, tokenizer, max_shard_size)
        os.replace(staging, out_dir)  # an empty out_dir is replaced; nothing half-written is ever there
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def _require_transformers() -> None:
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise UserError("export --format hf needs transformers: pip install -e '.[hf]' "
                        "(or pip install 'transformers>=5.24,<6')") from None


def check_exportable(cfg: Config, path: Path) -> None:
    """Refuses, in one line naming the config keys to change, a model Mixtral cannot represent exactly."""
    model, moe = cfg.model, cfg.moe
    raw_gates = moe.router == "smoe" and moe.baseline.smoe_raw_gates
    checks = [("model.layout", model.layout, model.layout == "switch", "switch"),
              ("model.positions", model.positions, model.positions == "rotary", "rotary"),
              ("moe.activation", moe.activation, moe.activation == "swiglu", "swiglu"),
              ("moe.router", moe.router, moe.router in EXPORTABLE_ROUTERS, " or ".join(EXPORTABLE_ROUTERS)),
              ("moe.baseline.smoe_raw_gates", raw_gates, not raw_gates, False),
              ("moe.capacity_factor", moe.capacity_factor, moe.capacity_factor == 0, 0.0)]
    wrong = [f"{key}={have} (needs {need})" for key, have, ok, need in checks if not ok]
    if wrong:
        raise UserError(f"{path} is not exportable as {ARCHITECTURE}: {', '.join(wrong)}; train with those keys "
                        f"set to be exportable (README: 'Using a trained model')")


def mixtral_state(state: dict[str, torch.Tensor], cfg: Config) -> dict[str, torch.Tensor]:
    """Our state dict in Mixtral's checkpoint names: the fused qkv and the stacked experts split (every tensor
    a copy of its own, as safetensors wants)."""
    d_model, tied = cfg.model.d_model, cfg.model.tie_embeddings
    hf = {"model.embed_tokens.weight": state["embed.weight"], "model.norm.weight": state["norm_out.weight"]}
    if not tied:
        hf["lm_head.weight"] = state["head.weight"]
    for i in range(cfg.model.n_layers):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        # qkv's output features are (3, H, Dh), as Attention.forward views them; HF's q/k/v are (H, Dh) each
        q_DD, k_DD, v_DD = state[ours + "attn.qkv.weight"].split(d_model)
        hf.update({theirs + "input_layernorm.weight": state[ours + "norm_attn.weight"],
                   theirs + "post_attention_layernorm.weight": state[ours + "norm_ffn.weight"],
                   theirs + "self_attn.q_proj.weight": q_DD, theirs + "self_attn.k_proj.weight": k_DD,
                   theirs + "self_attn.v_proj.weight": v_DD, theirs + "self_attn.o_proj.weight": state[ours + "attn.proj.weight"],
                   theirs + "block_sparse_moe.gate.weight": state[ours + "ffn.router.weight_ED"]})
        hf.update(_mixtral_experts(state[ours + "ffn.experts.w_in_EDF"], state[ours + "ffn.experts.w_out_EFD"],
                                   theirs + "block_sparse_moe.experts."))
    return {name: tensor.clone(memory_format=torch.contiguous_format) for name, tensor in hf.items()}


def _mixtral_experts(w_in_EDF: torch.Tensor, w_out_EFD: torch.Tensor, prefix: str) -> dict[str, torch.Tensor]:
    """GroupedExperts' SwiGLU halves (gate first, then up: GroupedExperts._act) as Mixtral's per-expert
    w1 (gate), w3 (up) and w2 (down), each an nn.Linear weight [out, in]."""
    gate_EDF, up_EDF = w_in_EDF.chunk(2, dim=-1)
    weights = {}
    for e in range(w_in_EDF.shape[0]):
        weights.update({f"{prefix}{e}.w1.weight": gate_EDF[e].t(), f"{prefix}{e}.w3.weight": up_EDF[e].t(),
                        f"{prefix}{e}.w2.weight": w_out_EFD[e].t()})
    return weights


def write_folder(out: Path, cfg: Config, state: dict[str, torch.Tensor], tokenizer, max_shard_size="5GB") -> None:
    """config.json, generation_config.json, the weights (state: Mixtral's names) and the tokenizer into out."""
    from huggingface_hub import save_torch_state_dict
    from transformers import GenerationConfig

    special = _special_ids(tokenizer)
    mixtral_config(cfg, tokenizer.vocab_size, state["model.embed_tokens.weight"].dtype, special).save_pretrained(out)
    GenerationConfig(**special).save_pretrained(out)
    save_torch_state_dict(state, out, max_shard_size=max_shard_size)
    write_tokenizer(tokenizer, out, cfg.model.seq_len)
    _readable_as_usual(out)


def _readable_as_usual(out: Path) -> None:
    """safetensors writes its files owner-only (0600); a model folder is shared like any file the user writes."""
    umask = os.umask(0o022)
    os.umask(umask)
    for path in out.iterdir():
        path.chmod(0o666 & ~umask)


def _special_ids(tokenizer) -> dict[str, int | None]:
    """Generation stops at the end-of-document id (None: the run's data had none). No BOS: we never add one."""
    return {"bos_token_id": None, "eos_token_id": tokenizer.eod, "pad_token_id": None}


def mixtral_config(cfg: Config, vocab_size: int, dtype: torch.dtype, special: dict):
    from transformers import MixtralConfig

    model, moe = cfg.model, cfg.moe
    return MixtralConfig(
        architectures=[ARCHITECTURE], vocab_size=vocab_size, hidden_size=model.d_model,
        intermediate_size=moe.expert_hidden, num_hidden_layers=model.n_layers, num_attention_heads=model.n_heads,
        num_key_value_heads=model.n_heads, head_dim=model.d_model // model.n_heads, hidden_act="silu",
        max_position_embeddings=model.seq_len, rms_norm_eps=torch.finfo(torch.float32).eps,
        tie_word_embeddings=model.tie_embeddings, num_local_experts=moe.num_experts, num_experts_per_tok=moe.top_k,
        router_aux_loss_coef=moe.balance_coef, router_jitter_noise=0.0, sliding_window=None, attention_dropout=0.0,
        rope_parameters={"rope_type": "default", "rope_theta": ROTARY_BASE}, dtype=dtype, **special)


def write_tokenizer(tokenizer, out: Path, max_length: int) -> None:
    """tokenizer.json + tokenizer_config.json that AutoTokenizer loads as a fast tokenizer (no remote code)
    encoding every text to our ids: no BOS/EOS added, and special tokens in the text are plain text (as ours
    treat them). A SentencePiece model is also copied as tokenizer.model (for tools that read it)."""
    from transformers import PreTrainedTokenizerFast

    if isinstance(tokenizer, ByteTokenizer):
        backend, specials = _byte_level_backend(tokenizer)
    else:
        backend, specials = _sentencepiece_backend(tokenizer)
        shutil.copyfile(tokenizer.model_file, out / "tokenizer.model")
    hf = PreTrainedTokenizerFast(tokenizer_object=backend, split_special_tokens=True, model_max_length=max_length,
                                 clean_up_tokenization_spaces=False, **specials)
    _check_same_ids(tokenizer, hf)
    hf.save_pretrained(out)
    # The class name both transformers 4 and 5 know (5 writes its new name, TokenizersBackend, an alias of it)
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def _byte_level_backend(tokenizer: ByteTokenizer) -> tuple:
    """One token per byte, id = the byte (GPT-2's byte-to-unicode alphabet, no merges), and the
    end-of-document id as a special token after them; with its special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = bytes_to_unicode()
    backend = Tokenizer(models.BPE(vocab={alphabet[b]: b for b in range(256)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    if tokenizer.eod is None:
        return backend, {}
    backend.add_special_tokens([EOD_TOKEN])
    return backend, {"eos_token": EOD_TOKEN}


def _sentencepiece_backend(tokenizer: SentencePieceTokenizer) -> tuple:
    """transformers' own SentencePiece conversion that follows the model's settings (normaliser, dummy prefix,
    whitespace, byte fallback, BPE merges by piece score or the unigram scores); with the model's <unk> and
    </s> as special tokens (<s> stays a plain piece: nothing of ours adds it)."""
    from transformers.convert_slow_tokenizer import SentencePieceExtractor, SpmConverter

    extractor = SentencePieceExtractor(str(tokenizer.model_file))
    vocab = extractor.extract(None)["vocab"]
    if isinstance(vocab, list):  # unigram: (piece, score) in id order
        vocab = _only_text_pieces_reachable(vocab, extractor.proto)
        print(f"competesmoe: note: {UNIGRAM_TIES}", file=sys.stderr)
    backend = SpmConverter.build_tokenizer_from_spm_proto(extractor.proto, vocab, legacy=False)
    spec = extractor.proto.trainer_spec
    specials = {name: piece for name, piece, piece_id in [("unk_token", spec.unk_piece, spec.unk_id),
                                                           ("eos_token", spec.eos_piece, spec.eos_id)] if piece_id >= 0}
    return backend, specials


def _only_text_pieces_reachable(vocab: list[tuple[str, float]], proto) -> list[tuple[str, float]]:
    """SentencePiece's unigram lattice holds only text pieces; the tokenizers Unigram model holds every piece, and
    control and byte pieces score 0 (the best), so '</s>' or '<0x41>' in a text would become one token: give
    them a score no path takes."""
    return [(piece, score if spec.type in SPM_TEXT_PIECES else UNREACHABLE)
            for (piece, score), spec in zip(vocab, proto.pieces, strict=True)]


def _check_same_ids(ours, hf) -> None:
    expected = [int(i) for i in ours.encode(PROBE_TEXT.encode("utf-8"))]
    got = hf(PROBE_TEXT)["input_ids"]
    if got != expected:
        raise UserError(f"the Hugging Face tokenizer converted from the run's {ours.kind} tokenizer encodes a test "
                        f"text differently (first difference at token {_first_difference(expected, got)}); this "
                        f"tokenizer cannot be exported")


def _first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
