"""competesmoe.data: tokenizers, prepare (splits, meta, idempotence, refusals), sampler and eval batches."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import json
import shutil
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
        [".competesmoe-prepared", ".prepare.lock", "meta.json"] + [f"{s}.{e}" for s in SPLITS for e in ("bin", "idx")])  # no temp dir left


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
    (out / ".prepare.lock").touch()  # which had taken the lock first (and, since the marker, left the marker)
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


# ---------------------------------------------------------------------------------------------
# data.inputs: streaming preparation of many files into one megatron-core dataset of documents.


def _records(corpus_bytes: bytes, start: int, count: int) -> list[str]:
    """`count` real documents: runs of 1..6 lines of the Wikipedia fragment from line `start` on."""
    lines = corpus_bytes.decode("utf-8").split("\n")[start:]
    docs, i = [], 0
    while len(docs) < count:
        n = 1 + (len(docs) * 7) % 6
        text = "\n".join(lines[i:i + n])
        if text:  # an empty text is no document (tested on its own)
            docs.append(text)
        i += n
    return docs


def _write_jsonl(path: Path, texts: list[str], extra: list[bytes] = ()) -> None:
    data = b"".join(json.dumps({"text": t, "id": k}).encode() + b"\n" for k, t in enumerate(texts)) + b"".join(extra)
    if path.suffix == ".gz":
        data = gzip.compress(data)
    elif path.suffix == ".bz2":
        data = bz2.compress(data)
    elif path.suffix == ".zst":
        import zstandard

        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)


@pytest.fixture(scope="module")
def inputs_dir(tmp_path_factory, corpus_bytes) -> tuple[Path, dict[str, list[str]]]:
    """A small pretraining corpus of real text: JSONL (plain, gzip, zstd, in a subdirectory) and .txt (plain, bzip2)."""
    root = tmp_path_factory.mktemp("inputs")
    (root / "sub").mkdir()
    docs = {"a.jsonl": _records(corpus_bytes, 0, 120), "b.jsonl.gz": _records(corpus_bytes, 2000, 90),
            "sub/c.jsonl.zst": _records(corpus_bytes, 4000, 60)}
    for name, texts in docs.items():
        _write_jsonl(root / name, texts)
    text = corpus_bytes.decode("utf-8").split("\n")
    big = corpus_bytes[2_000_000:3_600_000]  # over 1 MiB: stored in two pieces
    (root / "d.txt").write_bytes(big[big.find(b"\n") + 1:big.rfind(b"\n") + 1])
    (root / "sub" / "e.txt.bz2").write_bytes(bz2.compress(("\n".join(text[9000:12000]) + "\n").encode()))
    (root / "notes.md").write_text("not an input\n")  # ignored in a directory: not .txt/.jsonl
    return root, docs


def inputs_cfg(*inputs, **kw) -> DataConfig:
    cfg = DataConfig(inputs=[str(p) for p in inputs], sampler="gpt", **kw)
    cfg.validate()
    return cfg


def expected_documents(root: Path, docs: dict[str, list[str]], tok) -> list[np.ndarray]:
    """The documents a preparation of `root` must hold, in order (files sorted by path), each ending with eod."""
    out = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix != ".md"):
        name = str(path.relative_to(root))
        texts = docs.get(name)
        if texts is None:
            raw = bz2.decompress(path.read_bytes()) if name.endswith(".bz2") else path.read_bytes()
            texts = [raw.decode("utf-8")]
        out += [np.append(tok.encode(t.encode()).astype(np.int64), tok.eod) for t in texts]
    return out


def documents_of(prefix: Path) -> list[np.ndarray]:
    """Every document of a megatron-core indexed dataset, read with megatron-core's own reader."""
    from competesmoe.data.megatron import open_indexed

    ds = open_indexed(prefix)
    bounds = ds.document_indices
    return [np.concatenate([ds[s] for s in range(bounds[d], bounds[d + 1])]).astype(np.int64)
            for d in range(len(bounds) - 1)]


@pytest.fixture(scope="module")
def documents_prep(tmp_path_factory, inputs_dir) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("prep") / "docs"
    return out, prepare(inputs_cfg(inputs_dir[0]), out, progress=False, workers=2)


def test_indexed_writer_matches_megatron_builder(tmp_path):
    """Same bytes as megatron-core's IndexedDatasetBuilder (which keeps its index in Python lists)."""
    from competesmoe.data.megatron import IndexedDatasetWriter, indexed_dataset_module

    mod = indexed_dataset_module()
    rng = np.random.default_rng(0)
    for dtype in (np.uint16, np.int32):
        docs = [[rng.integers(0, 60000, rng.integers(0, 50)) for _ in range(rng.integers(1, 4))] for _ in range(200)]
        ours = IndexedDatasetWriter(tmp_path / f"ours{dtype.__name__}", dtype)
        theirs = mod.IndexedDatasetBuilder(str(tmp_path / f"theirs{dtype.__name__}.bin"), dtype=dtype)
        for k, doc in enumerate(docs):
            if k % 3 == 0 and len(doc) == 1:
                ours.add_documents(doc[0], [len(doc[0])])
            else:
                for seq in doc:
                    ours.add_sequence(seq)
                ours.end_document()
            theirs.add_document(np.concatenate(doc), [len(s) for s in doc])
        ours.add_documents(np.arange(30), [10, 20])  # two one-sequence documents at once
        theirs.add_document(np.arange(10), [10])
        theirs.add_document(np.arange(10, 30), [20])
        ours.finalize()
        theirs.finalize(str(tmp_path / f"theirs{dtype.__name__}.idx"))
        for ext in ("bin", "idx"):
            assert (tmp_path / f"ours{dtype.__name__}.{ext}").read_bytes() == \
                (tmp_path / f"theirs{dtype.__name__}.{ext}").read_bytes(), (dtype, ext)
    assert not list(tmp_path.glob("*.tmp"))  # the side files are gone


def test_token_dtype_follows_the_vocabulary():
    from competesmoe.data.megatron import token_dtype

    assert [token_dtype(v) for v in (256, 257, 8000, 65499)] == [np.dtype(np.uint16)] * 4
    assert [token_dtype(v) for v in (65500, 100_000, 256_000)] == [np.dtype(np.int32)] * 3
    assert ByteTokenizer(with_eod=True).identity() == {"kind": "byte", "vocab_size": 257, "eod": 256}


def test_prepare_inputs_holds_every_document_in_order(documents_prep, inputs_dir):
    out, meta = documents_prep
    root, docs = inputs_dir
    tok = load_tokenizer(out)
    assert tok.identity() == meta["tokenizer"] == {"kind": "byte", "vocab_size": 257, "eod": 256}
    got = documents_of(out / "text_document")
    expected = expected_documents(root, docs, tok)
    assert len(got) == len(expected) == 120 + 90 + 60 + 2
    assert all(np.array_equal(g, e) for g, e in zip(got, expected))
    info = meta["datasets"]["text_document"]
    assert info["documents"] == len(expected) and info["tokens"] == sum(map(len, expected))
    assert meta["dtype"] == "uint16" and (out / "text_document.bin").stat().st_size == 2 * info["tokens"]
    # a .txt file is one document stored in pieces of about 1 MiB cut after a newline
    from competesmoe.data.megatron import open_indexed

    ds = open_indexed(out / "text_document")
    assert len(ds) == info["sequences"] == info["documents"] + 1
    d_txt = int(np.flatnonzero(np.diff(ds.document_indices) == 2)[0])
    first = ds[int(ds.document_indices[d_txt])]
    assert len(first) >= 1 << 20 and first[-1] == ord("\n")
    assert [Path(f["path"]).name for f in meta["source"]["inputs"]] == \
        ["a.jsonl", "b.jsonl.gz", "d.txt", "c.jsonl.zst", "e.txt.bz2"]
    assert meta["skipped"] == {"files": [], "lines": [], "line_count": 0}


def test_prepare_inputs_output_does_not_depend_on_workers(documents_prep, inputs_dir, tmp_path):
    out, meta = documents_prep
    root = inputs_dir[0]
    # files, directories and globs name the same inputs; the worker count changes nothing
    cfg = inputs_cfg(root / "*.jsonl", root / "b.jsonl.gz", root / "d.txt", root / "sub", root / "**" / "*.txt.bz2")
    other = prepare(cfg, tmp_path / "one", progress=False, workers=1)
    for ext in ("bin", "idx"):
        assert (tmp_path / "one" / f"text_document.{ext}").read_bytes() == (out / f"text_document.{ext}").read_bytes()
    assert other["datasets"] == meta["datasets"]


def test_prepare_inputs_sentencepiece_on_a_bounded_sample(inputs_dir, tmp_path):
    from competesmoe.data.pretrain import _spm_sample
    from competesmoe.data.sources import resolve_inputs

    root, docs = inputs_dir
    budget = 100_000
    sample = _spm_sample(resolve_inputs([str(root)]), budget)
    # each file gives its share, overshooting by at most a line
    assert budget / 2 < sum(len(s.encode()) for s in sample) < budget + 5 * 4096
    cfg = inputs_cfg(root, tokenizer="sentencepiece", vocab_size=600, spm_sample_bytes=budget)
    meta = prepare(cfg, tmp_path / "spm", progress=False, workers=2)
    tok = load_tokenizer(tmp_path / "spm")
    assert isinstance(tok, SentencePieceTokenizer) and tok.eod == 2 and meta["tokenizer"]["eod"] == 2
    got = documents_of(tmp_path / "spm" / "text_document")
    assert all(g[-1] == tok.eod for g in got)
    texts = [t for name in ("a.jsonl", "b.jsonl.gz") for t in docs[name]]
    assert [tok.decode(g[:-1]) for g in got[:len(texts)]] == [t.encode() for t in texts]  # lossless
    # a second source shares the first's vocabulary through data.tokenizer_model
    cfg2 = inputs_cfg(root / "d.txt", tokenizer="sentencepiece", tokenizer_model=str(tmp_path / "spm" / "spm.model"))
    meta2 = prepare(cfg2, tmp_path / "spm2", progress=False, workers=1)
    assert meta2["tokenizer"] == meta["tokenizer"]


def test_prepare_inputs_is_recognised_by_fingerprint_never_rehashed(documents_prep, inputs_dir, monkeypatch):
    from competesmoe.data import pretrain, sources
    from competesmoe.data.pretrain import check_documents

    out, meta = documents_prep
    root = inputs_dir[0]
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.iterdir()}

    def no_full_hash(*args, **kwargs):
        raise AssertionError("a whole file was hashed")

    monkeypatch.setattr(pretrain, "sha256_file", no_full_hash)
    monkeypatch.setattr("competesmoe.data.prepare.sha256_file", no_full_hash)
    assert prepare(inputs_cfg(root), out, progress=False, workers=2) == meta
    assert check_documents(inputs_cfg(root), out) == meta
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.iterdir()} == before
    # each file's fingerprint reads three blocks, not the file
    reads = []

    class Spy:
        def __init__(self, path, mode):
            self.handle = open(path, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def seek(self, offset):
            self.handle.seek(offset)

        def read(self, n):
            reads.append(n)
            return self.handle.read(n)

    monkeypatch.setattr(sources, "open", Spy, raising=False)
    sources.fingerprint(root / "d.txt")
    assert reads == [sources.FINGERPRINT_BLOCK] * sources.FINGERPRINT_BLOCKS


def test_prepare_inputs_notices_a_changed_corpus(inputs_dir, tmp_path):
    from competesmoe.data.pretrain import check_documents

    root = tmp_path / "in"
    shutil.copytree(inputs_dir[0], root)
    out = tmp_path / "prep"
    meta = prepare(inputs_cfg(root), out, progress=False, workers=1)
    with open(root / "d.txt", "a") as f:
        f.write("one more line\n")
    with pytest.raises(UserError, match=r"d\.txt changed \(its size differs\).*competesmoe prepare") as err:
        check_documents(inputs_cfg(root), out)
    assert "\n" not in str(err.value)
    (root / "new.jsonl").write_text(json.dumps({"text": "x"}) + "\n")
    with pytest.raises(UserError, match="different data preparation"):
        prepare(inputs_cfg(root), out, progress=False, workers=1)
    assert load_meta(out) == meta
    with pytest.raises(UserError, match="holds no finished preparation"):
        check_documents(inputs_cfg(root), tmp_path / "never")


def test_legacy_prepare_is_recognised_by_fingerprint(small_corpus, byte_prep, monkeypatch, tmp_path):
    out, meta = byte_prep
    monkeypatch.setattr("competesmoe.data.prepare.sha256_file", lambda *a: pytest.fail("the corpus was re-hashed"))
    assert prepare(DataConfig(path=str(small_corpus)), out, progress=False) == meta
    assert meta["source"]["fingerprint"]["size"] == small_corpus.stat().st_size
    # a copy of the corpus with a new mtime is another source: refused, nothing rewritten
    copy = tmp_path / "small.xml"
    copy.write_bytes(small_corpus.read_bytes())
    with pytest.raises(UserError, match="different data preparation"):
        prepare(DataConfig(path=str(copy)), out, progress=False)


def test_concurrent_prepares_of_one_directory_build_once(inputs_dir, tmp_path, monkeypatch):
    """Two processes (here threads, each with its own lock handle) preparing one directory: one builds."""
    import threading

    from competesmoe.data import pretrain

    builds = []
    real = pretrain._write_all
    monkeypatch.setattr(pretrain, "_write_all", lambda *a, **k: builds.append(1) or real(*a, **k))
    cfg, out, results = inputs_cfg(inputs_dir[0] / "a.jsonl"), tmp_path / "shared", []
    threads = [threading.Thread(target=lambda: results.append(prepare(cfg, out, progress=False, workers=1)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert len(results) == 2 and results[0] == results[1] and builds == [1]


# ---------------------------------------------------------------------------------------------
# Bad input: one line, nothing lost.


@pytest.mark.parametrize("kind", ["empty", "corrupt_gz", "not_json", "no_text", "text_not_string", "not_object"])
def test_bad_input_is_refused_in_one_line_or_skipped(kind, inputs_dir, tmp_path, corpus_bytes):
    from competesmoe.data.megatron import open_indexed

    root = tmp_path / "in"
    root.mkdir()
    good = _records(corpus_bytes, 100, 30)
    _write_jsonl(root / "a.jsonl", good)
    bad_lines = {"not_json": b'{"text": "unterminated\n', "no_text": b'{"body": "x"}\n',
                 "text_not_string": b'{"text": 3}\n', "not_object": b'["text"]\n'}
    if kind == "empty":
        (root / "b.jsonl").write_bytes(b"")
        needle = f"input {root / 'b.jsonl'} is empty"
    elif kind == "corrupt_gz":
        (root / "b.jsonl.gz").write_bytes(gzip.compress(b'{"text": "x"}\n' * 1000)[:40] + b"\x00" * 100)
        needle = f"input {root / 'b.jsonl.gz'} could not be read"
    else:
        tail = json.dumps({"text": "tail"}).encode() + b"\n"
        _write_jsonl(root / "b.jsonl", good[:2], extra=[bad_lines[kind], tail])
        needle = f"{root / 'b.jsonl'}:3: the line"
    out = tmp_path / "prep"
    with pytest.raises(UserError) as err:
        prepare(inputs_cfg(root), out, progress=False, workers=1)
    message = str(err.value)
    assert needle in message and "--skip-bad-input" in message and "\n" not in message, message
    assert not (out / "meta.json").exists() and sorted(p.name for p in out.iterdir()) == [".competesmoe-prepared", ".prepare.lock"]

    meta = prepare(inputs_cfg(root), out, progress=False, workers=1, skip_bad_input=True)
    skipped = meta["skipped"]
    kept = len(good) + (0 if kind in ("empty", "corrupt_gz") else 3)
    assert len(open_indexed(out / "text_document")) == kept
    if kind in ("empty", "corrupt_gz"):
        assert len(skipped["files"]) == 1 and skipped["line_count"] == 0
    else:
        assert skipped["files"] == [] and skipped["line_count"] == 1 and skipped["lines"][0]["line"] == 3


def test_vocabulary_that_does_not_fit_is_refused(inputs_dir, tmp_path):
    cfg = inputs_cfg(inputs_dir[0] / "a.jsonl", tokenizer="sentencepiece", vocab_size=60_000)
    with pytest.raises(UserError, match=r"data\.vocab_size \(60000\) does not fit") as err:
        prepare(cfg, tmp_path / "p", progress=False, workers=1)
    assert "\n" not in str(err.value) and not (tmp_path / "p" / "meta.json").exists()


@pytest.mark.parametrize("overrides, needle", [
    ({"inputs": ["x.jsonl"]}, "data.inputs needs data.sampler: gpt"),
    ({"blend": [[1.0, "x"]]}, "data.blend needs data.sampler: gpt"),
    ({"sampler": "gpt", "blend": [[0.5, "a"], ["b", 0.5]]}, "data.blend[1] = ['b', 0.5] must be [weight, path]"),
    ({"sampler": "gpt", "blend": [[0, "a"]]}, "data.blend[0] = [0, 'a'] must be [weight, path] with a positive"),
    ({"sampler": "gpt", "split": "98,2"}, "data.split = '98,2' must be three positive weights"),
    ({"path": "a.txt", "inputs": ["b.jsonl"], "sampler": "gpt"}, "data.path and data.inputs are both set"),
    ({"tokenizer_model": "m.model"}, "data.tokenizer_model needs data.tokenizer: sentencepiece"),
])
def test_data_config_errors_name_the_field(overrides, needle):
    from competesmoe.launcher.config import ConfigError, load_config

    with pytest.raises(ConfigError) as err:
        load_config(None, [f"data.{k}={json.dumps(v)}" for k, v in overrides.items()])
    assert needle in str(err.value), str(err.value)


def test_missing_inputs_and_blend_members_are_named(tmp_path, inputs_dir, documents_prep, byte_prep):
    from competesmoe.data.loader import resolve_blend
    from competesmoe.data.prepare import check_before_start

    with pytest.raises(UserError, match=r"data\.inputs\[1\] = '.*nope\*\.jsonl' matches no"):
        prepare(inputs_cfg(inputs_dir[0], tmp_path / "nope*.jsonl"), tmp_path / "p", progress=False)
    with pytest.raises(UserError, match=r"data\.inputs\[0\] = .* is a directory without \.txt/\.jsonl files"):
        prepare(inputs_cfg(documents_prep[0]), tmp_path / "p", progress=False)
    cfg = DataConfig(sampler="gpt", blend=[[0.5, str(documents_prep[0])], [0.5, str(tmp_path / "gone")]])
    with pytest.raises(UserError, match=r"data\.blend\[1\] = '.*gone' does not exist") as err:
        check_before_start(cfg)
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match=r"data\.blend\[0\] = .* is a 90/5/5 preparation"):
        resolve_blend([[1.0, str(byte_prep[0])]], documents_prep[0])


# ---------------------------------------------------------------------------------------------
# sampler: gpt -- megatron-core's GPTDataset and blends.


def gpt_data(prep: Path, tmp_path: Path, *, micro: int = 4, rank: int = 0, dp: int = 1, seed: int = 3,
             samples: int = 400, seq_len: int = 64, **cfg):
    from competesmoe.data.loader import open_train_data

    data_cfg = DataConfig(sampler="gpt", **cfg)
    data_cfg.validate()
    return open_train_data(data_cfg, prep, cache_dir=tmp_path / "cache", seq_len=seq_len, micro_batch_size=micro,
                           dp_rank=rank, dp_size=dp, seed=seed, train_samples=samples, eval_samples=micro * dp * 2)


def draw(sampler, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [sampler.next_batch() for _ in range(n)]


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))


def test_gpt_samples_are_windows_of_the_shuffled_document_stream(documents_prep, tmp_path):
    """Brute force: sample i is S+1 consecutive tokens of the documents concatenated in megatron-core's
    document order, starting at S * shuffle_index[i] (documents never padded, EODs kept)."""
    from competesmoe.data.megatron import build_gpt_datasets, open_indexed, split_bounds

    out, meta = documents_prep
    seq_len = 64
    train, valid, test = build_gpt_datasets(blend=([str(out / "text_document")], None), split="90,5,5",
                                            seq_len=seq_len, seed=9, sizes=[300, None, None], cache_dir=tmp_path,
                                            tokenizer=meta["tokenizer"])
    ds = open_indexed(out / "text_document")
    stream = np.concatenate([ds[int(d)] for d in train.document_index]).astype(np.int64)
    begin, end = split_bounds("90,5,5", len(ds))[0]
    assert set(np.unique(train.document_index)) == set(range(begin, end))  # the train split's sequences only
    for i in range(0, 300, 7):
        start = int(train.shuffle_index[i]) * seq_len
        sample = train[i]
        assert torch.equal(sample["tokens"], torch.from_numpy(stream[start:start + seq_len]))
        assert torch.equal(sample["labels"], torch.from_numpy(stream[start + 1:start + seq_len + 1]))
    assert len(train) >= 300 and len(valid) > 0 and len(test) > 0


def test_gpt_sampler_deterministic_per_seed(documents_prep, tmp_path):
    out = documents_prep[0]
    a = draw(gpt_data(out, tmp_path / "a", split="90,5,5").sampler, 6)
    b = draw(gpt_data(out, tmp_path / "b", split="90,5,5").sampler, 6)  # built afresh, not from a's cache
    c = draw(gpt_data(out, tmp_path / "c", split="90,5,5", seed=4).sampler, 6)
    assert same(a, b) and not same(a, c)
    x, y = a[0]
    assert x.shape == (4, 64) and x.dtype == torch.int64 and torch.equal(x[:, 1:], y[:, :-1])


def test_gpt_sampler_resumes_at_the_exact_sample(documents_prep, tmp_path):
    out = documents_prep[0]
    first = gpt_data(out, tmp_path, split="90,5,5").sampler
    draw(first, 5)
    state = first.state_dict()
    assert state == {"sample": 20, "num_samples": 400}
    json.dumps(state)
    expected = draw(first, 30)
    again = gpt_data(out, tmp_path, split="90,5,5").sampler
    again.load_state_dict(state)
    assert same(draw(again, 30), expected)
    other_length = gpt_data(out, tmp_path, split="90,5,5", samples=800).sampler
    with pytest.raises(UserError, match="same train.max_steps") as err:
        other_length.load_state_dict(state)
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="data.sampler: windows"):
        again.load_state_dict({"epoch": 0, "position": 3})


def test_gpt_sampler_shards_the_global_batch_over_ranks(documents_prep, tmp_path):
    out = documents_prep[0]
    one = gpt_data(out, tmp_path, micro=8, split="90,5,5")
    ranks = [gpt_data(out, tmp_path, micro=4, rank=r, dp=2, split="90,5,5") for r in range(2)]
    for _ in range(10):
        x, y = one.sampler.next_batch()
        (x0, y0), (x1, y1) = (r.sampler.next_batch() for r in ranks)
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
    assert one.sampler.state_dict() == ranks[0].sampler.state_dict() == ranks[1].sampler.state_dict()
    # evaluation: every rank the same number of batches, together the valid split's first samples in order
    per_rank = [list(r.eval_batches("valid", 2)) for r in ranks]
    whole = list(one.eval_batches("valid", 2))
    assert [len(p) for p in per_rank] == [2, 2] and len(whole) == 2
    for k in range(2):
        assert torch.equal(torch.cat([per_rank[0][k][0], per_rank[1][k][0]]), whole[k][0])


def test_gpt_blend_follows_the_weights(documents_prep, inputs_dir, tmp_path):
    out = documents_prep[0]
    other = tmp_path / "other"
    prepare(inputs_cfg(inputs_dir[0] / "b.jsonl.gz"), other, progress=False, workers=1)
    data = gpt_data(out, tmp_path, samples=2000, split="90,5,5", blend=[[0.7, str(out)], [0.3, str(other)]])
    blended = data.sampler._source.dataset
    share = np.bincount(np.asarray(blended.dataset_index), minlength=2) / len(blended)
    assert len(blended) == 2000 and abs(share[0] - 0.7) < 0.01 and abs(share[1] - 0.3) < 0.01
    x, _ = data.sampler.next_batch()
    assert x.shape == (4, 64)
    # a member tokenized another way is refused, naming it
    spm = tmp_path / "spm"
    prepare(inputs_cfg(inputs_dir[0] / "a.jsonl", tokenizer="sentencepiece", vocab_size=512), spm, progress=False,
            workers=1)
    with pytest.raises(UserError, match=r"data\.blend\[1\] = .* was tokenized with .*data\.tokenizer_model"):
        gpt_data(out, tmp_path, split="90,5,5", blend=[[0.5, str(out)], [0.5, str(spm)]])


def test_gpt_refuses_a_split_without_documents(inputs_dir, tmp_path):
    tiny = tmp_path / "tiny"
    _write_jsonl(tmp_path / "t.jsonl", ["one document", "another one", "a third"])
    prepare(inputs_cfg(tmp_path / "t.jsonl"), tiny, progress=False, workers=1)
    with pytest.raises(UserError, match=r"data\.split = '98,1,1' leaves the valid split of .* without a document"):
        gpt_data(tiny, tmp_path, split="98,1,1")


def test_gpt_sampler_over_a_90_5_5_preparation(byte_prep, tmp_path):
    out, _ = byte_prep
    data = gpt_data(out, tmp_path, seq_len=32)
    train_stream = split_tokens(out, "train")
    x, y = data.sampler.next_batch()
    for row in x:  # every sample is a stretch of the train split (the documents are its 1 MiB pieces)
        needle = row.numpy().astype(np.uint16).tobytes()
        assert needle in train_stream.tobytes()
    valid = np.concatenate([b[0].reshape(-1).numpy() for b in data.eval_batches("valid", 3)])
    assert set(np.unique(valid)) <= set(np.unique(split_tokens(out, "valid")))


def _wait_body(rank, world_size):
    import time

    from competesmoe.launcher import train

    train.PREPARE_HEARTBEAT_S = 0.5  # the wait's group times out after 10 heartbeats: 5 s, less than the work
    outcomes = []
    for work_seconds, fail in ((8.0, False), (1.0, True)):
        def work():
            time.sleep(work_seconds)
            if fail:
                raise UserError("data.path: corpus /x is empty")

        try:
            train.on_rank0_while_others_wait(work, rank)
            outcomes.append("ok")
        except UserError as err:
            outcomes.append(f"UserError: {err}")
    return outcomes


@pytest.mark.slow  # spawns two ranks that import the trainer
def test_ranks_wait_for_rank0_longer_than_any_collective_timeout():
    from competesmoe.parallel.ranks import run_on_ranks

    # 8 s of work outlasts the waiting group's 5 s timeout: only the heartbeat keeps the ranks together;
    # then rank 0's error reaches every rank
    assert run_on_ranks(_wait_body, 2, timeout=180) == [["ok", "UserError: data.path: corpus /x is empty"]] * 2


@pytest.mark.slow  # four short training runs
def test_gpt_run_needs_prepare_then_trains_and_resumes_at_the_exact_sample(tmp_path, corpus_bytes):
    from support import FAST, TINY, competesmoe, losses, records

    _write_jsonl(tmp_path / "web.jsonl", _records(corpus_bytes, 0, 1500))
    data = [f"data.inputs=[{tmp_path / 'web.jsonl'}]", "data.sampler=gpt", f"data.prepared_dir={tmp_path / 'prep'}"]
    args = [TINY, *data, "train.max_steps=8", "train.checkpoint_every=4", "moe.competition.rate=0.5", *FAST]
    refused = competesmoe("train", *args, f"output_dir={tmp_path / 'early'}")
    assert refused.returncode == 2 and "run `competesmoe prepare`" in refused.stderr, refused.stderr[-2000:]
    assert "Traceback" not in refused.stderr
    prepared = competesmoe("prepare", TINY, *data, "--workers", "2")
    assert prepared.returncode == 0 and "text_document 1,500 documents" in prepared.stdout, prepared.stderr[-2000:]

    full, part = tmp_path / "full", tmp_path / "part"
    for run in (full, part):
        result = competesmoe("train", *args, f"output_dir={run}")
        assert result.returncode == 0, result.stderr[-3000:]
    assert {r["split"] for r in map(json.loads, (full / "metrics.jsonl").read_text().splitlines())} >= {"valid", "test"}
    assert records(full, "test")[0]["bpc"] < 8.0  # byte level: below the 8 bits of a uniform guess
    # roll the second run back to its step-4 checkpoint, as if it had died there, and resume
    shutil.rmtree(part / "checkpoints" / "step00000008")
    (part / "checkpoints" / "latest").write_text("step00000004")
    (part / "metrics.jsonl").unlink()
    result = competesmoe("train", *args, f"output_dir={part}", "resume=auto")
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(losses(part)) == [5, 6, 7, 8]
    assert all(losses(part)[s] == losses(full)[s] for s in losses(part))  # bitwise on CPU: the same samples
    longer = competesmoe("train", *args, f"output_dir={part}", "resume=auto", "train.max_steps=12")
    assert longer.returncode == 2 and "same train.max_steps" in longer.stderr, longer.stderr[-2000:]
