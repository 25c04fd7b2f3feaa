"""Turn a raw text corpus into megatron-core indexed datasets: train/valid/test .bin/.idx plus meta.json.

The raw bytes (transparently .bz2 / .gz / plain) are split 90/5/5 by bytes (the enwik8 convention),
then each split is tokenized (bytes, or a SentencePiece model trained on the train split only) and
written with megatron-core's `IndexedDatasetBuilder` as uint16 tokens, in documents of about 1 MiB of
text each. Everything is built in a private temporary directory inside `out_dir` and moved into place;
meta.json is written last, so a directory without meta.json is never mistaken for a finished one.
"""

from __future__ import annotations

import bz2
import codecs
import gzip
import io
import json
import os
import re
import shutil
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np

from competesmoe.common.errors import UserError
from competesmoe.common.files import sha256_file
from competesmoe.data.meta import META_FILE, read_meta
from competesmoe.data.tokenizer import SPM_MODEL_FILE, ByteTokenizer, SentencePieceTokenizer

BUNDLED_CORPUS = "enwiki-2016-fragment.xml.bz2"
SPLITS = ("train", "valid", "test")
SPLIT_PERCENT = (90, 5, 5)
CHUNK_BYTES = 1 << 20  # one indexed-dataset document per ~1 MiB of text
HEAD_BYTES = 1 << 20  # how much of a corpus resolve_corpus inspects
FORMAT_VERSION = 1
# SentencePiece's trained model depends on its thread count (measured: 1, 2 and 4 threads give three
# different models, each reproducible), so it is fixed rather than taken from the machine.
SPM_TRAIN_THREADS = 4


def bundled_corpus() -> Path:
    return Path(__file__).parent / "corpus" / BUNDLED_CORPUS


def _compression(path: Path) -> str:
    with open(path, "rb") as f:
        magic = f.read(3)
    if magic == b"BZh":
        return "bz2"
    if magic[:2] == b"\x1f\x8b":
        return "gzip"
    return "none"


def _open_text(path: Path, compression: str):
    if compression == "bz2":
        return bz2.open(path, "rb")
    if compression == "gzip":
        return gzip.open(path, "rb")
    return open(path, "rb")


_DECOMPRESS_ERRORS = (OSError, EOFError, ValueError, zlib.error)


def resolve_corpus(path: str | None) -> Path:
    """The corpus file to prepare: `data.path`, or the bundled Wikipedia fragment when it is None.

    Refuses (UserError naming the path and data.path) a missing, empty, unreadable or binary file.
    """
    p = bundled_corpus() if path is None else Path(path).expanduser()
    fix = "set data.path to a UTF-8 text file (.txt/.xml, or .bz2/.gz of one), or to null for the bundled corpus"
    if not p.exists():
        raise UserError(f"data.path: corpus {p} does not exist; {fix}")
    if not p.is_file():
        raise UserError(f"data.path: corpus {p} is not a file; {fix}")
    if p.stat().st_size == 0:
        raise UserError(f"data.path: corpus {p} is empty; {fix}")
    compression = _compression(p)
    try:
        with _open_text(p, compression) as f:
            head = f.read(HEAD_BYTES)
    except _DECOMPRESS_ERRORS as err:
        raise UserError(f"data.path: corpus {p} could not be read as {compression} ({err}); {fix}") from None
    if not head:
        raise UserError(f"data.path: corpus {p} holds no text after decompression; {fix}")
    nul = head.find(b"\x00")
    if nul >= 0:
        raise UserError(f"data.path: corpus {p} looks binary (NUL byte at offset {nul}); {fix}")
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=len(head) < HEAD_BYTES)
    except UnicodeDecodeError as err:
        raise UserError(f"data.path: corpus {p} is not UTF-8 text (invalid byte at offset {err.start}); {fix}") from None
    return p.resolve()


def read_corpus(path: Path) -> bytes:
    """All raw bytes of the corpus, decompressed."""
    compression = _compression(path)
    try:
        data = path.read_bytes()
        if compression == "bz2":
            return bz2.decompress(data)
        if compression == "gzip":
            return gzip.decompress(data)
        return data
    except _DECOMPRESS_ERRORS as err:
        raise UserError(f"data.path: corpus {path} could not be decompressed ({compression}: {err}); "
                        f"check the file or set data.path to another corpus") from None


def split_bounds(n_bytes: int) -> dict[str, tuple[int, int]]:
    """Byte ranges [start, end) of train/valid/test: 90% / 5% / the rest (enwik8: 90M / 5M / 5M)."""
    n_train = n_bytes * SPLIT_PERCENT[0] // 100
    n_valid = n_bytes * SPLIT_PERCENT[1] // 100
    return {"train": (0, n_train), "valid": (n_train, n_train + n_valid), "test": (n_train + n_valid, n_bytes)}


def _settings(data_cfg) -> dict:
    """The preparation settings that decide its content (data.path is covered by the source hash)."""
    if data_cfg.tokenizer == "byte":
        return {"tokenizer": "byte"}
    if data_cfg.tokenizer == "sentencepiece":
        return {"tokenizer": "sentencepiece", "spm_model_type": data_cfg.spm_model_type,
                "vocab_size": int(data_cfg.vocab_size)}
    raise UserError(f"data.tokenizer = {data_cfg.tokenizer!r} is not one of 'byte', 'sentencepiece'")


def _describe(meta: dict) -> str:
    s = meta.get("settings", {})
    tok = s.get("tokenizer", "?")
    if tok == "sentencepiece":
        tok = f"sentencepiece {s.get('spm_model_type')} vocab {s.get('vocab_size')}"
    src = meta.get("source", {})
    return f"{Path(src.get('path', '?')).name} sha256 {str(src.get('sha256', '?'))[:12]}, tokenizer {tok}"


def _complete(out_dir: Path, meta: dict) -> bool:
    """Every file meta.json promises is there with the promised size."""
    try:
        for split in SPLITS:
            if (out_dir / f"{split}.bin").stat().st_size != 2 * meta["splits"][split]["tokens"]:
                return False
            if not (out_dir / f"{split}.idx").is_file():
                return False
        if meta["settings"]["tokenizer"] == "sentencepiece":
            return (out_dir / meta["tokenizer_file"]).is_file()
        return True
    except (OSError, KeyError, TypeError):
        return False


def _chunks(data: bytes, at_newline: bool):
    """Consecutive pieces of about CHUNK_BYTES; with at_newline each ends just after a b'\\n' (or at the end)."""
    start, n = 0, len(data)
    while start < n:
        end = min(start + CHUNK_BYTES, n)
        if at_newline and end < n:
            nl = data.find(b"\n", end)
            end = n if nl < 0 else nl + 1
        yield data[start:end]
        start = end


def _encode_chunk(tok, chunk: bytes) -> np.ndarray:
    if isinstance(tok, SentencePieceTokenizer):
        # Same ids as tok.encode(chunk): no piece contains "\n" (training sees one line per sentence),
        # so segmenting line by line changes nothing, and the batch call uses several threads.
        text = chunk.decode("utf-8", errors="replace")
        lines = text.split("\n")
        lines = [line + "\n" for line in lines[:-1]] + ([lines[-1]] if lines[-1] else [])
        ids = tok.encode_lines(lines, num_threads=min(4, os.cpu_count() or 1))
        flat = [i for line in ids for i in line]
        return np.array(flat, dtype=np.uint16)
    return tok.encode(chunk)


def _train_sentencepiece(train_bytes: bytes, data_cfg, model_path: Path, source: Path, progress: bool) -> None:
    import sentencepiece as spm

    vocab = int(data_cfg.vocab_size)
    if vocab > 65536:
        raise UserError(f"data.vocab_size ({vocab}) exceeds 65536, the most uint16 token storage can hold; lower data.vocab_size")
    if progress:
        print(f"training SentencePiece ({data_cfg.spm_model_type}, vocab {vocab}) on the train split "
              f"({len(train_bytes) / 1e6:.1f} MB) ...", file=sys.stderr, flush=True)
    lines = [line for line in train_bytes.decode("utf-8", errors="replace").split("\n") if line]
    writer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=writer,
            model_type=data_cfg.spm_model_type, vocab_size=vocab, byte_fallback=True,
            character_coverage=0.9995,
            # lossless on UTF-8: no normalisation, keep every space, no dummy "▁" prefix
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
            allow_whitespace_only_pieces=True, max_sentence_length=1 << 16,
            # deterministic: every sentence, in order, a fixed thread count
            input_sentence_size=0, shuffle_input_sentence=False, num_threads=SPM_TRAIN_THREADS,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
        )
    except RuntimeError as err:
        msg = str(err).strip().splitlines()[-1] if str(err).strip() else repr(err)
        msg = re.sub(r"^.*?\]\s*", "", msg).rstrip(". ")
        m = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", msg)
        if m:
            need = int(m.group(2))
            raise UserError(f"data.vocab_size ({vocab}) is too small for {source.name}: SentencePiece with byte "
                            f"fallback needs at least {need} pieces (256 bytes, special pieces and the corpus's "
                            f"characters); raise data.vocab_size (e.g. {max(512, 2 * need)})") from None
        if "too high" in msg.lower() or "vocabulary size" in msg.lower():
            raise UserError(f"data.vocab_size ({vocab}) does not fit {source.name}: {msg}; lower data.vocab_size") from None
        raise UserError(f"SentencePiece training on {source.name} failed ({msg}); check data.vocab_size and data.spm_model_type") from None
    model_path.write_bytes(writer.getvalue())


def _same(meta: dict, source_sha: str, settings: dict) -> bool:
    return (meta.get("format") == FORMAT_VERSION and meta.get("settings") == settings
            and meta.get("source", {}).get("sha256") == source_sha)


def prepare(data_cfg, out_dir: Path, progress: bool = True) -> dict:
    """Prepare `data_cfg`'s corpus into `out_dir` (idempotent); returns the meta dict also written to meta.json."""
    from tqdm.auto import tqdm

    from competesmoe.data.loader import indexed_dataset_module

    source = resolve_corpus(data_cfg.path)
    settings = _settings(data_cfg)
    source_sha = sha256_file(source)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"data.prepared_dir: {out_dir} exists and is not a directory; set data.prepared_dir to a directory path")

    existing = read_meta(out_dir)
    if existing is not None:
        if not _same(existing, source_sha, settings):
            raise UserError(f"{out_dir} already holds a different data preparation ({_describe(existing)}); "
                            f"set data.prepared_dir to a new directory or delete {out_dir}")
        if _complete(out_dir, existing):
            return existing
        # Same preparation but files missing or truncated: rebuild it (identical content) below.

    raw = read_corpus(source)
    bounds = split_bounds(len(raw))
    for split, (a, b) in bounds.items():
        if b <= a:
            raise UserError(f"data.path: corpus {source} ({len(raw)} bytes) is too small to split 90/5/5 "
                            f"(the {split} split would be empty); use a larger corpus")

    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".prepare-", dir=out_dir))
    try:
        files = []
        if settings["tokenizer"] == "sentencepiece":
            a, b = bounds["train"]
            _train_sentencepiece(raw[a:b], data_cfg, tmp / SPM_MODEL_FILE, source, progress)
            tok = SentencePieceTokenizer(tmp / SPM_MODEL_FILE)
            files.append(SPM_MODEL_FILE)
        else:
            tok = ByteTokenizer()

        idx_mod = indexed_dataset_module()
        splits_meta = {}
        bar = tqdm(total=len(raw), unit="B", unit_scale=True, desc="tokenize+write", disable=not progress,
                   file=sys.stderr)
        with bar:
            for split in SPLITS:
                a, b = bounds[split]
                bar.set_description(f"prepare {split}")
                builder = idx_mod.IndexedDatasetBuilder(str(tmp / f"{split}.bin"), dtype=np.uint16)
                n_tokens = n_docs = 0
                for chunk in _chunks(raw[a:b], at_newline=isinstance(tok, SentencePieceTokenizer)):
                    ids = _encode_chunk(tok, chunk)
                    if ids.size:
                        builder.add_document(ids, [int(ids.size)])
                        n_tokens += int(ids.size)
                        n_docs += 1
                    bar.update(len(chunk))
                builder.finalize(str(tmp / f"{split}.idx"))
                files += [f"{split}.bin", f"{split}.idx"]
                splits_meta[split] = {"bytes": b - a, "byte_offset": a, "tokens": n_tokens, "documents": n_docs}

        meta = {
            "format": FORMAT_VERSION,
            "source": {"path": str(source), "sha256": source_sha, "bytes": len(raw),
                       "compression": _compression(source)},
            "settings": settings,
            "tokenizer": tok.identity(),
            "dtype": "uint16",
            "split_percent": list(SPLIT_PERCENT),
            "splits": splits_meta,
        }
        if settings["tokenizer"] == "sentencepiece":
            meta["tokenizer_file"] = SPM_MODEL_FILE

        # Someone else (another rank) may have finished the same preparation meanwhile.
        other = read_meta(out_dir)
        if other is not None:
            if _same(other, source_sha, settings) and _complete(out_dir, other):
                return other
            if not _same(other, source_sha, settings):
                raise UserError(f"{out_dir} now holds a different data preparation ({_describe(other)}); "
                                f"set data.prepared_dir to a new directory")
        for name in files:
            os.replace(tmp / name, out_dir / name)
        meta_tmp = tmp / META_FILE
        meta_tmp.write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(meta_tmp, out_dir / META_FILE)
        return meta
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
