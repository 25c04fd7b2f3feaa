"""`competesmoe export --format hf`: transformers loads the folder as MixtralForCausalLM and computes our logits,
AutoTokenizer encodes to our ids (byte-level and SentencePiece), and what cannot be exported is refused in one line.

The tests marked slow train tiny models (an EP-2 byte-level run on two ranks, a SentencePiece run) and export them
through the command line."""

import json
import subprocess
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from torch import nn

from competesmoe.common.errors import UserError
from competesmoe.data.config import DataConfig
from competesmoe.data.prepare import prepare
from competesmoe.data.tokenizer import ByteTokenizer, SentencePieceTokenizer
from competesmoe.launcher.config import Config
from competesmoe.launcher.hf_export import EOD_TOKEN, check_exportable, mixtral_state, write_folder, write_tokenizer
from competesmoe.moe.config import ModelConfig, MoEConfig
from competesmoe.moe.generate import Sampling, generate
from competesmoe.moe.model import ROTARY_BASE, TransformerLM
from support import ROOT, TINY, competesmoe, one_error_line

pytest.importorskip("transformers", reason="the [hf] extra: pip install -e '.[hf]' (CI installs it)")

TEXTS = ["Grüße aus Zürich — 東京, naïve café, ½ × 3 ≥ 1 🙂🚀",
         "  two leading spaces, trailing ones  ", "\n\nnew\nlines\n\tand\ttabs\r\n", "a  b   c    d",
         "literal specials: </s> <s> <unk> <|endoftext|> <0x41>", "x", "ﬁ ligature, Ω, e\u0301 (combining)"]
"""Texts every exported tokenizer must encode to our ids (with a slice of the corpus)."""


def tiny_config(tie: bool = True, **moe) -> Config:
    cfg = Config()
    cfg.model = ModelConfig(d_model=32, n_layers=2, n_heads=4, seq_len=32, tie_embeddings=tie)
    cfg.moe = MoEConfig(num_experts=4, top_k=2, expert_hidden=24, activation="swiglu", **moe)
    return cfg


def max_logit_difference(ours: TransformerLM, hf, tokens_BS: torch.Tensor) -> float:
    with torch.no_grad():
        return (ours(tokens_BS).logits_BSV - hf(tokens_BS).logits).abs().max().item()


def test_random_untied_model_equals_mixtral_across_shards(tmp_path):
    """Every weight lands where Mixtral reads it (norms and router randomised too), over several shards."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(tie=False)
    torch.manual_seed(0)
    model = TransformerLM(cfg.model, cfg.moe, vocab_size=257).eval()
    for module in model.modules():
        if isinstance(module, nn.RMSNorm):
            nn.init.uniform_(module.weight, 0.5, 1.5)
    for layer in model.moe_layers:
        nn.init.normal_(layer.router.weight_ED, std=1.0)
    write_folder(tmp_path, cfg, mixtral_state(model.state_dict(), cfg), ByteTokenizer(with_eod=True),
                 max_shard_size="40KB")
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    assert (tmp_path / "model.safetensors.index.json").is_file()
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == "MixtralForCausalLM"
    assert hf.config.rms_norm_eps == torch.finfo(torch.float32).eps  # nn.RMSNorm(eps=None) on fp32
    assert hf.config.rope_parameters["rope_theta"] == ROTARY_BASE and not hf.config.tie_word_embeddings
    assert hf.generation_config.eos_token_id == 256
    tokens = torch.randint(0, 257, (3, cfg.model.seq_len), generator=torch.Generator().manual_seed(1))
    assert max_logit_difference(model, hf, tokens) <= 1e-5


@pytest.mark.parametrize("overrides,needles", [
    ({"model.layout": "glam"}, ["model.layout=glam (needs switch)"]),
    ({"moe.activation": "gelu", "model.positions": "learned"},
     ["model.positions=learned (needs rotary)", "moe.activation=gelu (needs swiglu)"]),
    ({"moe.router": "xmoe"}, ["moe.router=xmoe (needs competesmoe or smoe or smoe_dropout)"]),
    ({"moe.router": "smoe", "moe.baseline.smoe_raw_gates": True}, ["moe.baseline.smoe_raw_gates=True (needs False)"]),
    ({"moe.capacity_factor": 1.25}, ["moe.capacity_factor=1.25 (needs 0.0)"]),
])
def test_what_mixtral_cannot_represent_is_refused_naming_the_keys(overrides, needles):
    from competesmoe.common.typed_config import set_dotted
    from competesmoe.launcher.config import config_from_dict, to_dict

    tree = to_dict(tiny_config())
    for key, value in overrides.items():
        set_dotted(tree, key, value)
    with pytest.raises(UserError) as err:
        check_exportable(config_from_dict(tree), Path("ckpt"))
    message = str(err.value)
    assert "\n" not in message and message.startswith("ckpt is not exportable as MixtralForCausalLM")
    assert all(needle in message for needle in needles), message
    check_exportable(tiny_config(), Path("ckpt"))  # the exportable shape passes


def test_the_demo_exports_with_swiglu_experts():
    from competesmoe.launcher.config import load_config

    check_exportable(load_config(TINY, ["moe.activation=swiglu"]), Path("ckpt"))
    with pytest.raises(UserError, match=r": moe.activation=gelu \(needs swiglu\); train with"):
        check_exportable(load_config(TINY), Path("ckpt"))


def assert_same_ids(ours, folder: Path, texts: list[str]) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(folder)
    for text in texts:
        expected = [int(i) for i in ours.encode(text.encode("utf-8"))]
        assert hf(text)["input_ids"] == expected, text[:80]
        assert hf.decode(expected) == text, text[:80]


@pytest.mark.parametrize("with_eod", [False, True])
def test_byte_tokenizer_gives_our_ids(tmp_path, with_eod):
    from transformers import AutoTokenizer

    ours = ByteTokenizer(with_eod)
    write_tokenizer(ours, tmp_path, max_length=64)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert_same_ids(ours, tmp_path, TEXTS)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert len(hf) == ours.vocab_size
    assert hf.eos_token_id == (256 if with_eod else None)
    if with_eod:
        assert hf.convert_ids_to_tokens(256) == EOD_TOKEN


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory, bundled_corpus_bytes) -> Path:
    """About the first 200 KB of the corpus, cut after a newline (valid UTF-8)."""
    path = tmp_path_factory.mktemp("corpus") / "small.xml"
    path.write_bytes(bundled_corpus_bytes[:bundled_corpus_bytes.rfind(b"\n", 0, 200_000) + 1])
    return path


@pytest.fixture(scope="module")
def sentencepiece_models(tmp_path_factory, small_corpus) -> dict[str, SentencePieceTokenizer]:
    """Our preparation's SentencePiece settings (byte fallback, identity normalisation, no dummy prefix, every
    space kept), BPE and unigram."""
    models = {}
    for model_type in ("bpe", "unigram"):
        out = tmp_path_factory.mktemp(model_type)
        prepare(DataConfig(path=str(small_corpus), tokenizer="sentencepiece", spm_model_type=model_type,
                           vocab_size=512), out, progress=False)
        models[model_type] = SentencePieceTokenizer(out / "spm.model")
    return models


def exported_tokenizer(ours: SentencePieceTokenizer, out: Path) -> Path:
    out.mkdir()
    write_tokenizer(ours, out, max_length=64)
    assert (out / "tokenizer.model").read_bytes() == ours.model_file.read_bytes()
    return out


def test_sentencepiece_bpe_tokenizer_gives_our_ids(tmp_path, sentencepiece_models, small_corpus):
    ours = sentencepiece_models["bpe"]
    corpus = small_corpus.read_bytes().decode("utf-8")
    assert_same_ids(ours, exported_tokenizer(ours, tmp_path / "hf"), TEXTS + [corpus[50_000:70_000]])


def test_sentencepiece_unigram_tokenizer_differs_only_where_scores_tie(tmp_path, sentencepiece_models, small_corpus):
    """The same ids on the test texts; on 20 KB of the corpus a few tokens differ, and only where two
    segmentations score the same (UNIGRAM_TIES): the total score of both encodings is equal."""
    from transformers import AutoTokenizer

    ours = sentencepiece_models["unigram"]
    folder = exported_tokenizer(ours, tmp_path / "hf")
    assert_same_ids(ours, folder, TEXTS)
    text = small_corpus.read_bytes().decode("utf-8")[50_000:70_000]
    expected = [int(i) for i in ours.encode(text.encode("utf-8"))]
    got = AutoTokenizer.from_pretrained(folder)(text)["input_ids"]
    assert AutoTokenizer.from_pretrained(folder).decode(got) == text
    differing = sum(a != b for a, b in zip(expected, got)) + abs(len(expected) - len(got))
    assert differing <= len(expected) // 500, differing
    score = spm.SentencePieceProcessor(model_file=str(ours.model_file)).get_score
    assert sum(map(score, got)) == pytest.approx(sum(map(score, expected)), abs=1e-3)


# ---------------------------------------------------------------------------------------------
# Trained models, through the command line (slow).

TRAIN = ["moe.activation=swiglu", "model.d_model=64", "model.n_layers=2", "model.n_heads=2", "model.seq_len=64",
         "moe.expert_hidden=64", "train.micro_batch_size=4", "train.max_steps=30", "train.eval_every=0",
         "train.eval_batches=2", "train.log_every=10", "train.checkpoint_every=30"]
"""A tiny exportable model (switch, SwiGLU experts, rotary) trained for 30 steps."""


def train(args: list[str], run: Path) -> Path:
    result = competesmoe(*args, f"output_dir={run}", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return run


@pytest.fixture(scope="module")
def byte_run(tmp_path_factory) -> Path:
    """Two ranks, two experts' shards (EP 2): export gathers every expert."""
    return train(["launch", "--nproc", "2", "--launcher", "torchrun", TINY, "parallel.expert_parallel_size=2", *TRAIN],
                 tmp_path_factory.mktemp("byte") / "run")


@pytest.fixture(scope="module")
def spm_run(tmp_path_factory, small_corpus) -> Path:
    return train(["train", TINY, "data.tokenizer=sentencepiece", "data.vocab_size=600", f"data.path={small_corpus}",
                  *TRAIN], tmp_path_factory.mktemp("spm") / "run")


def export(run: Path, out: Path) -> subprocess.CompletedProcess:
    return competesmoe("export", str(run), str(out), "--format", "hf")


@pytest.mark.slow
@pytest.mark.parametrize("run_fixture", ["byte_run", "spm_run"])
def test_trained_model_exports_with_equal_logits_ids_and_greedy_text(run_fixture, request, tmp_path):
    from transformers import AutoModelForCausalLM

    from competesmoe.launcher.checkpoint import load_model
    from competesmoe.launcher.checkpoint.reading import run_tokenizer

    run, out = request.getfixturevalue(run_fixture), tmp_path / "hf"
    result = export(run, out)
    assert result.returncode == 0, result.stderr[-3000:]
    saved, ours = load_model(run)
    tokenizer = run_tokenizer(saved)
    expected = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
    assert {p.name for p in out.iterdir()} == expected | ({"tokenizer.model"} if tokenizer.kind != "byte" else set())
    if saved.ep_size > 1:
        assert ours.moe_layers[0].experts.w_in_EDF.shape[0] == saved.cfg.moe.num_experts

    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    seq = saved.cfg.model.seq_len
    ids = torch.as_tensor(tokenizer.encode((ROOT / "README.md").read_bytes()[:20_000]).astype("int64"))
    batch = ids[:4 * seq].view(4, seq)
    difference = max_logit_difference(ours, hf, batch)
    print(f"{run_fixture}: max |logits ours - transformers| = {difference:.3g}")
    assert difference <= 1e-5

    assert_same_ids(tokenizer, out, TEXTS)
    prompt = batch[0, :16]
    with torch.no_grad():
        theirs = hf.generate(prompt.unsqueeze(0), max_new_tokens=24, do_sample=False)[0, 16:].tolist()
    assert generate(ours, prompt, Sampling(max_new_tokens=24, temperature=0), stop_id=tokenizer.eod) == theirs


@pytest.mark.slow
def test_generate_prints_the_same_continuation_for_a_seed(byte_run):
    """A byte-level model may well write bytes that are not UTF-8: stdout carries them as they are."""
    prompt = b"The history of "

    def run(seed: int) -> bytes:
        result = competesmoe("generate", str(byte_run), "--prompt", prompt, "--max-new-tokens", "40",
                             "--temperature", "1.0", "--seed", str(seed), text=False)
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout

    first = run(1)
    assert first.startswith(prompt) and len(first) > len(prompt) + 1
    assert run(1) == first and run(2) != first


@pytest.mark.slow
def test_bad_input_is_one_line(tmp_path, byte_run, spm_run):
    gelu = train(["train", TINY, "train.max_steps=2", "train.eval_every=0", "train.eval_batches=1", "model.d_model=32",
                  "model.n_layers=2", "model.n_heads=2", "model.seq_len=32", "moe.expert_hidden=32",
                  "train.micro_batch_size=2", "model.layout=glam"], tmp_path / "gelu")
    line = one_error_line(export(gelu, tmp_path / "out"))
    assert "is not exportable as MixtralForCausalLM" in line and "model.layout=glam (needs switch)" in line
    assert "moe.activation=gelu (needs swiglu)" in line and not (tmp_path / "out").exists()

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    assert "is not an empty folder" in one_error_line(export(byte_run, taken))
    assert [p.name for p in taken.iterdir()] == ["notes.txt"] and (taken / "notes.txt").read_text() == "mine"

    result = competesmoe("generate", str(spm_run), "--prompt", b"caf\xe9 latin-1")
    assert "--prompt is not UTF-8 text (byte 0xe9 at offset 3)" in one_error_line(result)
