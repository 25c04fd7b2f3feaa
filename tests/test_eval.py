"""`competesmoe eval` on raw text: the same split rules as prepare, every token scored once, the loss
equal to an independent loop over the model, the K override, and bad input in one line."""

import bz2
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from support import ROOT, TINY, competesmoe

pytestmark = pytest.mark.slow  # real training runs / launchers: see tests/conftest.py
SMALL = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.seq_len=32", "moe.num_experts=4",
         "moe.expert_hidden=32", "train.max_steps=6", "train.eval_every=0", "train.log_every=3",
         "train.eval_batches=2", "train.micro_batch_size=4", "train.checkpoint_every=0"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny trained run on a small corpus of our own (a .bz2, to exercise decompression)."""
    tmp = tmp_path_factory.mktemp("evalrun")
    text = (ROOT / "README.md").read_bytes() * 3
    corpus = tmp / "corpus.txt.bz2"
    corpus.write_bytes(bz2.compress(text))
    run = tmp / "run"
    result = competesmoe("train", TINY, *SMALL, "moe.router=smoe", f"data.path={corpus}", f"output_dir={run}")
    assert result.returncode == 0, result.stderr[-3000:]
    return run, corpus, text


def eval_json(*args) -> dict:
    result = competesmoe("eval", *args, "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def reference_loss(run: Path, tokens: np.ndarray, top_k=None) -> tuple[float, int]:
    """Independent scoring: one window at a time, starts at multiples of seq_len, a shorter last window."""
    from competesmoe.launcher.evaluate import load_run
    from competesmoe.moe.routing import RoutingContext

    loaded = load_run(run)
    S = loaded.cfg.model.seq_len
    nats, count, start = 0.0, 0, 0
    with torch.no_grad():
        while start < len(tokens) - 1:
            window = torch.tensor(tokens[start:start + S + 1], dtype=torch.long)
            ctx = RoutingContext(step=loaded.step, total_steps=loaded.cfg.train.max_steps, top_k=top_k)
            logits = loaded.model(window[None, :-1], routing=ctx).logits_BSV[0]
            nats += F.cross_entropy(logits, window[1:], reduction="sum").item()
            count += len(window) - 1
            start += S
    return nats / count, count


def test_windows_score_every_token_but_the_first_once():
    from competesmoe.launcher.evaluate import windows

    for n in (2, 5, 32, 33, 34, 65, 100):
        tokens = np.arange(n, dtype=np.int64) * 7 % 251
        targets = []
        for inputs, tgt in windows(tokens, 32, 3):
            assert inputs.shape == tgt.shape and inputs.shape[1] <= 32
            assert torch.equal(inputs[:, 1:], tgt[:, :-1])  # targets are the inputs shifted by one
            targets += tgt.reshape(-1).tolist()
        assert sorted(targets) == sorted(tokens[1:].tolist()), n


def test_split_rules_are_prepare_s(run_dir):
    from competesmoe.data.loader import split_tokens
    from competesmoe.data.tokenizer import ByteTokenizer
    from competesmoe.launcher.evaluate import load_run, read_text

    run, corpus, text = run_dir
    data_dir = load_run(run).data_dir
    for split in ("train", "valid", "test"):
        ours = ByteTokenizer().encode(read_text(corpus, split))
        assert np.array_equal(ours, split_tokens(data_dir, split)), split
    assert read_text(corpus, "all") == text


def test_eval_cli_equals_an_independent_loop_on_unseen_text(run_dir, tmp_path):
    run, _, _ = run_dir
    unseen = tmp_path / "unseen.txt"
    unseen.write_bytes((ROOT / "moe" / "routing.py").read_bytes()[:3000])
    got = eval_json(str(run), "--text", str(unseen))
    want, count = reference_loss(run, np.frombuffer(unseen.read_bytes(), dtype=np.uint8).astype(np.int64))
    assert got["predicted"] == count == 2999 and got["bytes"] == 3000
    assert got["loss"] == pytest.approx(want, rel=1e-5)
    assert got["bpc"] == pytest.approx(want / math.log(2), rel=1e-5)
    assert 0 < got["bpc"] < 9


def test_eval_of_a_sentencepiece_run_reports_perplexity(tmp_path):
    """A subword run: the file is encoded with the run's own sentencepiece model, ppl = exp(loss/token), and
    bits per byte counts the same nats over the file's bytes."""
    from competesmoe.data.tokenizer import load_tokenizer
    from competesmoe.launcher.evaluate import load_run

    run = tmp_path / "sp"
    result = competesmoe("train", TINY, *SMALL, "moe.router=smoe", "data.tokenizer=sentencepiece",
                         "data.vocab_size=1000", f"output_dir={run}")
    assert result.returncode == 0, result.stderr[-3000:]
    unseen = tmp_path / "unseen.txt"
    unseen.write_bytes((ROOT / "moe" / "routing.py").read_bytes()[:3000])
    got = eval_json(str(run), "--text", str(unseen))
    tokens = load_tokenizer(load_run(run).data_dir).encode(unseen.read_bytes())
    assert 100 < len(tokens) < 3000  # subwords: fewer tokens than bytes
    want, count = reference_loss(run, np.asarray(tokens, dtype=np.int64))
    assert got["tokens"] == len(tokens) and got["predicted"] == count == len(tokens) - 1
    assert got["loss"] == pytest.approx(want, rel=1e-5) and "bpc" not in got
    assert got["ppl"] == pytest.approx(math.exp(want), rel=1e-5)
    assert got["bits_per_byte"] == pytest.approx(want * count / math.log(2) / 3000, rel=1e-5)


def test_eval_top_k_override_and_checkpoint_folder(run_dir, tmp_path):
    run, corpus, _ = run_dir
    k1 = eval_json(str(run), "--text", str(corpus), "--split", "test", "--top-k", "1")
    default = eval_json(str(run / "checkpoints"), "--text", str(corpus), "--split", "test")
    k2 = eval_json(str(run), "--text", str(corpus), "--split", "test", "--top-k", "2")
    assert default["loss"] == k2["loss"] and default["top_k"] == 2
    assert k1["loss"] != k2["loss"]
    from competesmoe.data.loader import split_tokens
    from competesmoe.launcher.evaluate import load_run

    want, _ = reference_loss(run, split_tokens(load_run(run).data_dir, "test").astype(np.int64), top_k=1)
    assert k1["loss"] == pytest.approx(want, rel=1e-5)


def test_eval_human_output(run_dir, tmp_path):
    run, corpus, _ = run_dir
    result = competesmoe("eval", str(run), "--text", str(corpus), "--split", "valid")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "[valid]" in result.stdout and "bpc" in result.stdout


@pytest.mark.parametrize("args,needle", [
    (["--text", "/nonexistent/file.txt"], "--text /nonexistent/file.txt does not exist"),
    (["--text", "README.md", "--top-k", "9"], "--top-k (9)"),
])
def test_bad_input_gets_one_line(run_dir, args, needle):
    run, _, _ = run_dir
    result = competesmoe("eval", str(run), *args)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and needle in errors[0], result.stderr


def test_not_a_checkpoint_gets_one_line(tmp_path):
    result = competesmoe("eval", str(tmp_path), "--text", "README.md")
    assert result.returncode == 2 and "holds no checkpoint" in result.stderr and "Traceback" not in result.stderr
