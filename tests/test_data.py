"""competesmoe.data: tokenizers, prepare (splits, meta, idempotence, refusals), sampler and eval batches."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from competesmoe.common.errors import UserError
from competesmoe.data.config import DataConfig
from competesmoe.data.loader import TrainSampler, eval_batches, split_tokens
from competesmoe.data.meta import load_meta
from competesmoe.data.prepare import bundled_corpus, prepare, read_corpus, resolve_corpus
from competesmoe.data.tokenizer import ByteTokenizer, SentencePieceTokenizer, load_tokenizer

SPLITS = ("train", "valid", "test")


# ---------------------------------------------------------------------------------------------
# Fixtures: real text from the bundled Wikipedia fragment.


@pytest.fixture(scope="module")
def corpus_bytes() -> bytes:
    return read_corpus(bundled_corpus())


@pytest.fixture(scope="module")
def small_text(corpus_bytes) -> bytes:
    """About the first 200 KB of the corpus, cut after a newline (so it is valid UTF-8)."""
    return corpus_bytes[:corpus_bytes.rfind(b"\n", 0, 200_000) + 1]


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory, small_text) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "small.xml"
    path.write_bytes(small_text)
    return path


@pytest.fixture(scope="module")
def byte_prep(tmp_path_factory, small_corpus) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("prep") / "byte"
    meta = prepare(DataConfig(path=str(small_corpus)), out, progress=False)
    return out, meta


@pytest.fixture(scope="module")
def spm_prep(tmp_path_factory, small_corpus) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("prep") / "spm"
    cfg = DataConfig(path=str(small_corpus), tokenizer="sentencepiece", spm_model_type="bpe", vocab_size=512)
    return out, prepare(cfg, out, progress=False)


def expected_bounds(n: int) -> dict[str, tuple[int, int]]:
    a, b = n * 90 // 100, n * 90 // 100 + n * 5 // 100
    return {"train": (0, a), "valid": (a, b), "test": (b, n)}


# ---------------------------------------------------------------------------------------------
# Tokenizers


def test_byte_tokenizer_round_trip(corpus_bytes):
    text = corpus_bytes[1_000_000:1_100_000]  # real text, includes multi-byte UTF-8 sequences
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids.dtype == np.uint16 and ids.shape == (len(text),)
    assert ids[:16].tolist() == list(text[:16])
    assert tok.decode(ids) == text
    assert tok.decode(torch.from_numpy(ids.astype(np.int64))) == text
    assert tok.identity() == {"kind": "byte", "vocab_size": 256}
    with pytest.raises(ValueError):
        tok.decode([65, 300])


def test_sentencepiece_round_trip(spm_prep, small_text, tmp_path, small_corpus):
    out, meta = spm_prep
    tok = load_tokenizer(out)
    assert isinstance(tok, SentencePieceTokenizer)
    assert tok.vocab_size == 512
    ident = tok.identity()
    assert ident == meta["tokenizer"]
    assert ident["sha256"] == hashlib.sha256((out / meta["tokenizer_file"]).read_bytes()).hexdigest()

    # lossless on held-out real text (identity normalisation, byte fallback)
    a, b = expected_bounds(len(small_text))["test"]
    held_out = small_text[a:b]
    ids = tok.encode(held_out)
    assert ids.dtype == np.uint16 and ids.max() < 512
    assert tok.decode(ids) == held_out
    assert len(ids) < 0.8 * len(held_out)  # merges do compress (about 0.7 at vocab 512)
    # invalid UTF-8 is decoded with replacement before encoding
    assert tok.decode(tok.encode(b"ab\xffcd")) == "ab\ufffdcd".encode()

    # the prepared splits hold exactly tok.encode(split bytes), and decode back to the source
    for split, (a, b) in expected_bounds(len(small_text)).items():
        stream = split_tokens(out, split)
        assert np.array_equal(stream, tok.encode(small_text[a:b])), split
        assert meta["splits"][split]["tokens"] == len(stream)

    # training is deterministic: a second preparation elsewhere gives the same model bytes
    cfg = DataConfig(path=str(small_corpus), tokenizer="sentencepiece", spm_model_type="bpe", vocab_size=512)
    meta2 = prepare(cfg, tmp_path / "again", progress=False)
    assert meta2["tokenizer"]["sha256"] == ident["sha256"]


def test_sentencepiece_vocab_too_small(small_corpus, tmp_path):
    cfg = DataConfig(path=str(small_corpus), tokenizer="sentencepiece", vocab_size=100)
    with pytest.raises(UserError, match=r"data\.vocab_size \(100\) is too small") as err:
        prepare(cfg, tmp_path / "p", progress=False)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "p" / "meta.json").exists()


# ---------------------------------------------------------------------------------------------
# prepare


def test_resolve_bundled_corpus():
    path = resolve_corpus(None)
    assert path == (Path(__file__).resolve().parents[1] / "data" / "corpus" / "enwiki-2016-fragment.xml.bz2").resolve()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == \
        "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d"
    assert len(read_corpus(path)) == 6_089_746


def test_prepare_splits_and_meta(byte_prep, small_corpus, small_text):
    out, meta = byte_prep
    n = len(small_text)
    bounds = expected_bounds(n)
    assert [bounds[s][1] - bounds[s][0] for s in SPLITS] == [n * 90 // 100, n * 5 // 100, n - n * 90 // 100 - n * 5 // 100]

    streams = {s: split_tokens(out, s) for s in SPLITS}
    for s in SPLITS:
        a, b = bounds[s]
        assert streams[s].dtype == np.uint16
        assert len(streams[s]) == b - a
        assert meta["splits"][s]["bytes"] == b - a and meta["splits"][s]["tokens"] == b - a
        assert meta["splits"][s]["byte_offset"] == a
        assert (out / f"{s}.bin").stat().st_size == 2 * (b - a)
    tok = load_tokenizer(out)
    assert isinstance(tok, ByteTokenizer)
    assert b"".join(tok.decode(streams[s]) for s in SPLITS) == small_text

    on_disk = json.loads((out / "meta.json").read_text())
    assert on_disk == meta == load_meta(out)
    assert meta["source"]["path"] == str(small_corpus.resolve())
    assert meta["source"]["sha256"] == hashlib.sha256(small_corpus.read_bytes()).hexdigest()
    assert meta["source"]["bytes"] == n
    assert meta["tokenizer"] == {"kind": "byte", "vocab_size": 256}
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [".prepare.lock", "meta.json"] + [f"{s}.{e}" for s in SPLITS for e in ("bin", "idx")])  # no temp dir left


def test_prepare_reads_compressed(small_corpus, small_text, byte_prep, tmp_path):
    for name, data in (("c.xml.bz2", bz2.compress(small_text)), ("c.xml.gz", gzip.compress(small_text))):
        path = tmp_path / name
        path.write_bytes(data)
        meta = prepare(DataConfig(path=str(path)), tmp_path / name.replace(".", "_"), progress=False)
        assert meta["source"]["bytes"] == len(small_text)
        assert np.array_equal(split_tokens(tmp_path / name.replace(".", "_"), "valid"), split_tokens(byte_prep[0], "valid"))


def test_prepare_is_idempotent(byte_prep, small_corpus):
    out, meta = byte_prep
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.iterdir()}
    again = prepare(DataConfig(path=str(small_corpus)), out, progress=False)
    assert again == meta
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.iterdir()} == before
    # the byte tokenizer ignores the sentencepiece-only settings
    assert prepare(DataConfig(path=str(small_corpus), vocab_size=123), out, progress=False) == meta


def test_prepare_refuses_a_different_preparation(byte_prep, small_corpus, small_text, tmp_path):
    out, meta = byte_prep
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(UserError, match="different data preparation") as err:
        prepare(DataConfig(path=str(small_corpus), tokenizer="sentencepiece", vocab_size=512), out, progress=False)
    assert str(out) in str(err.value) and "data.prepared_dir" in str(err.value)
    other = tmp_path / "other.txt"
    other.write_bytes(small_text[:50_000])
    with pytest.raises(UserError, match="different data preparation"):
        prepare(DataConfig(path=str(other)), out, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert load_meta(out) == meta


def test_prepare_finishes_a_half_done_preparation(small_corpus, byte_prep, tmp_path):
    out = tmp_path / "half"
    out.mkdir()
    (out / "train.bin").write_bytes(b"\x00" * 10)  # left by an interrupted run: no meta.json
    meta = prepare(DataConfig(path=str(small_corpus)), out, progress=False)
    assert meta == byte_prep[1]
    assert np.array_equal(split_tokens(out, "train"), split_tokens(byte_prep[0], "train"))
    # meta.json present but a split truncated: rebuilt, not returned as finished
    (out / "valid.bin").write_bytes(b"")
    assert prepare(DataConfig(path=str(small_corpus)), out, progress=False) == meta
    assert (out / "valid.bin").stat().st_size == 2 * meta["splits"]["valid"]["tokens"]


@pytest.mark.parametrize("kind", ["missing", "empty", "nul", "not_utf8", "corrupt_bz2", "directory"])
def test_corpus_errors(kind, tmp_path):
    path = tmp_path / {"corrupt_bz2": "bad.txt.bz2"}.get(kind, f"{kind}.txt")
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "nul":
        path.write_bytes(b"some text\n" * 100 + b"\x00\x00\x01\x02\x03" * 200)  # valid UTF-8, but NULs
    elif kind == "not_utf8":
        path.write_bytes("caf\u00e9 na\u00efve\n".encode("latin-1") * 100)
    elif kind == "corrupt_bz2":
        path.write_bytes(b"BZh91AY&SY" + bytes(range(200)))
    elif kind == "directory":
        path.mkdir()
    with pytest.raises(UserError) as err:
        resolve_corpus(str(path))
    msg = str(err.value)
    assert str(path) in msg and "data.path" in msg and "\n" not in msg
    with pytest.raises(UserError):
        prepare(DataConfig(path=str(path)), tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "meta.json").exists()


# ---------------------------------------------------------------------------------------------
# TrainSampler


def windows_of(stream: np.ndarray, windows, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = np.stack([stream[w * seq_len:w * seq_len + seq_len + 1] for w in windows]).astype(np.int64)
    return torch.from_numpy(rows[:, :-1]), torch.from_numpy(rows[:, 1:])


def test_sampler_windows_follow_the_seeded_permutation(byte_prep):
    out, _ = byte_prep
    seq_len, b, seed = 64, 8, 7
    stream = split_tokens(out, "train")
    n = (len(stream) - 1) // seq_len
    s = TrainSampler(out, "train", seq_len, b, 0, 1, seed)
    assert s.num_windows == n
    perm = np.random.default_rng([seed, 0]).permutation(n)
    for k in range(3):
        x, y = s.next_batch()
        assert x.dtype == torch.int64 and x.shape == (b, seq_len) and y.shape == (b, seq_len)
        ex, ey = windows_of(stream, perm[k * b:(k + 1) * b], seq_len)
        assert torch.equal(x, ex) and torch.equal(y, ey)
        assert torch.equal(x[:, 1:], y[:, :-1])  # targets are inputs shifted by one
    assert s.state_dict() == {"epoch": 0, "position": 3 * b}


def test_sampler_deterministic_and_seed_dependent(byte_prep):
    out, _ = byte_prep
    a = TrainSampler(out, "train", 64, 4, 0, 1, seed=1)
    b = TrainSampler(out, "train", 64, 4, 0, 1, seed=1)
    c = TrainSampler(out, "train", 64, 4, 0, 1, seed=2)
    batches_a = [a.next_batch()[0] for _ in range(5)]
    batches_b = [b.next_batch()[0] for _ in range(5)]
    batches_c = [c.next_batch()[0] for _ in range(5)]
    assert all(torch.equal(p, q) for p, q in zip(batches_a, batches_b))
    assert not torch.equal(torch.cat(batches_a), torch.cat(batches_c))


def test_sampler_state_round_trip(byte_prep):
    out, _ = byte_prep
    a = TrainSampler(out, "valid", 32, 4, 0, 1, seed=3)  # the valid split is small: crosses epochs
    for _ in range(7):
        a.next_batch()
    state = a.state_dict()
    assert set(state) == {"epoch", "position"}
    json.dumps(state)
    expected = [a.next_batch() for _ in range(200)]
    b = TrainSampler(out, "valid", 32, 4, 0, 1, seed=3)
    b.load_state_dict(state)
    got = [b.next_batch() for _ in range(200)]
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(expected, got))
    assert a.state_dict() == b.state_dict() and a.state_dict()["epoch"] >= 1
    with pytest.raises(UserError, match="does not fit"):
        b.load_state_dict({"epoch": 0, "position": b.num_windows})


def test_sampler_data_parallel_slices_cover_the_global_batch(byte_prep):
    out, _ = byte_prep
    one = TrainSampler(out, "valid", 32, 8, 0, 1, seed=5)
    r0 = TrainSampler(out, "valid", 32, 4, 0, 2, seed=5)
    r1 = TrainSampler(out, "valid", 32, 4, 1, 2, seed=5)
    steps = 2 * one.num_windows // 8 + 3  # more than two epochs
    for _ in range(steps):
        x, y = one.next_batch()
        (x0, y0), (x1, y1) = r0.next_batch(), r1.next_batch()
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
        assert not torch.equal(x0, x1)
    assert one.state_dict() == r0.state_dict() == r1.state_dict()


def test_sampler_epoch_wrap(byte_prep):
    out, _ = byte_prep
    seq_len, seed = 32, 11
    stream = split_tokens(out, "valid")
    n = (len(stream) - 1) // seq_len
    b = 8 if n % 8 else 7  # so that one batch straddles the epoch boundary
    assert n % b != 0
    s = TrainSampler(out, "valid", seq_len, b, 0, 1, seed)
    order = np.concatenate([np.random.default_rng([seed, e]).permutation(n) for e in range(3)])
    for k in range(n // b + 2):
        x, _ = s.next_batch()
        assert torch.equal(x, windows_of(stream, order[k * b:(k + 1) * b], seq_len)[0]), k
        assert s.state_dict() == {"epoch": (k + 1) * b // n, "position": (k + 1) * b % n}
    # epoch 0 visited every window exactly once
    assert sorted(order[:n].tolist()) == list(range(n))
    assert not np.array_equal(order[:n], order[n:2 * n])


def test_sampler_too_few_windows(byte_prep):
    out, meta = byte_prep
    with pytest.raises(UserError) as err:
        TrainSampler(out, "valid", 4096, 8, 0, 1, seed=0)
    msg = str(err.value)
    assert "train.micro_batch_size" in msg and "model.seq_len" in msg and "small.xml" in msg and "\n" not in msg
    with pytest.raises(UserError, match="does not exist"):
        TrainSampler(out, "nosuchsplit", 64, 8, 0, 1, seed=0)


# ---------------------------------------------------------------------------------------------
# eval_batches


def test_eval_batches_in_order_and_same_count_on_every_rank(byte_prep):
    out, _ = byte_prep
    seq_len, b = 32, 5
    stream = split_tokens(out, "valid")
    n = (len(stream) - 1) // seq_len
    assert any(n % (b * dp) >= dp for dp in (1, 2, 3))  # some dp has a tail batch to exercise

    per_rank = [list(eval_batches(out, "valid", seq_len, b, r, 2, max_batches=3)) for r in range(2)]
    assert [len(p) for p in per_rank] == [3, 3]
    for k in range(3):
        for r in range(2):
            x, y = per_rank[r][k]
            ex, ey = windows_of(stream, range(k * 2 * b + r * b, k * 2 * b + (r + 1) * b), seq_len)
            assert torch.equal(x, ex) and torch.equal(y, ey)

    # asking for more than there is: every rank gets the same number and shapes of batches
    for dp in (1, 2, 3):
        per_rank = [list(eval_batches(out, "valid", seq_len, b, r, dp, max_batches=10_000)) for r in range(dp)]
        counts = {len(p) for p in per_rank}
        assert len(counts) == 1
        assert len({tuple(bt[0].shape for bt in p) for p in per_rank}) == 1
        seen = [row for k in range(len(per_rank[0])) for r in range(dp) for row in per_rank[r][k][0]]
        assert n - dp < len(seen) <= n
        expect, _ = windows_of(stream, range(len(seen)), seq_len)
        assert torch.equal(torch.stack(seen), expect)  # windows in order, none repeated
