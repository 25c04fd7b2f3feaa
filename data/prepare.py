"""Data preparation, once, as its own step: raw text into megatron-core indexed datasets plus meta.json.

Two kinds (see data/config.py):
- from `data.path` (the benchmarks' enwik8 convention): the raw bytes of one file (plain, .bz2, .gz or
  .zst) are split 90/5/5 by bytes, each split tokenized (bytes, or a SentencePiece model trained on the
  train split) and written as `train/valid/test.bin/.idx`, in documents of about 1 MiB of text each;
- from `data.inputs` (pretraining): many files streamed by worker processes into one dataset of documents,
  `text_document.bin/.idx` (competesmoe.data.pretrain).

`prepare` writes only into a folder that is new, empty or its own: it leaves a marker file (`.competesmoe-prepared`)
there first, and refuses a folder holding anything else (a user's `train.bin` or `meta.json` is never replaced).
Either way everything is built in a private temporary directory inside `out_dir` and moved into place,
meta.json last, so a directory without meta.json is never mistaken for a finished one. While it checks
and builds, `prepare` holds an exclusive lock on `out_dir/.prepare.lock`: several processes preparing the
same directory at once (one per Kubernetes pod) do the work once, the others wait as long as it takes and
then find it finished. A finished preparation is recognised by the fingerprint of its sources (size,
mtime, sampled blocks; competesmoe.data.sources), never by hashing the corpus again.
"""

from __future__ import annotations

import codecs
import contextlib
import fcntl
import io
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from competesmoe.common.errors import UserError
from competesmoe.common.files import claim_folder, sha256_file
from competesmoe.data import sources
from competesmoe.data.meta import DOCUMENTS, META_FILE, is_documents, read_meta
from competesmoe.data.tokenizer import SPM_MODEL_FILE, ByteTokenizer, SentencePieceTokenizer

BUNDLED_CORPUS = "enwiki-2016-fragment.xml.bz2"
SPLITS = ("train", "valid", "test")
SPLIT_PERCENT = (90, 5, 5)
CHUNK_BYTES = 1 << 20  # one indexed-dataset document per ~1 MiB of text
HEAD_BYTES = 1 << 20  # how much of a corpus resolve_corpus inspects
FORMAT_VERSION = 1
LOCK_FILE = ".prepare.lock"
MARKER_FILE = ".competesmoe-prepared"
"""Left in a folder `prepare` writes into: the folder is ours (see claim_out_dir)."""
TMP_PREFIX = ".prepare-"
# SentencePiece's trained model depends on its thread count (measured: 1, 2 and 4 threads give three
# different models, each reproducible), so it is fixed rather than taken from the machine.
SPM_TRAIN_THREADS = 4


def bundled_corpus() -> Path:
    return Path(__file__).parent / "corpus" / BUNDLED_CORPUS


def resolve_corpus(path: str | None) -> Path:
    """The corpus file to prepare: `data.path`, or the bundled Wikipedia fragment when it is None.

    Refuses (UserError naming the path and data.path) a missing, empty, unreadable or binary file.
    """
    p = bundled_corpus() if path is None else Path(path).expanduser()
    fix = "set data.path to a UTF-8 text file (.txt/.xml, or .bz2/.gz/.zst of one), or to null for the bundled corpus"
    if not p.exists():
        raise UserError(f"data.path: corpus {p} does not exist; {fix}")
    if not p.is_file():
        raise UserError(f"data.path: corpus {p} is not a file; {fix}")
    if p.stat().st_size == 0:
        raise UserError(f"data.path: corpus {p} is empty; {fix}")
    kind = sources.compression(p)
    try:
        with sources.open_binary(p, kind) as f:
            head = f.read(HEAD_BYTES)
    except sources.DECOMPRESS_ERRORS as err:
        raise UserError(f"data.path: corpus {p} could not be read as {kind} ({err}); {fix}") from None
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
    kind = sources.compression(path)
    try:
        with sources.open_binary(path, kind) as f:
            return f.read()
    except sources.DECOMPRESS_ERRORS as err:
        raise UserError(f"data.path: corpus {path} could not be decompressed ({kind}: {err}); "
                        f"check the file or set data.path to another corpus") from None


def split_bounds(n_bytes: int) -> dict[str, tuple[int, int]]:
    """Byte ranges [start, end) of train/valid/test: 90% / 5% / the rest (enwik8: 90M / 5M / 5M)."""
    n_train = n_bytes * SPLIT_PERCENT[0] // 100
    n_valid = n_bytes * SPLIT_PERCENT[1] // 100
    return {"train": (0, n_train), "valid": (n_train, n_train + n_valid), "test": (n_train + n_valid, n_bytes)}


def tokenizer_settings(data_cfg) -> dict:
    """The tokenizer settings that decide a preparation's content."""
    if data_cfg.tokenizer == "byte":
        return {"tokenizer": "byte"}
    if data_cfg.tokenizer == "sentencepiece":
        return {"tokenizer": "sentencepiece", "spm_model_type": data_cfg.spm_model_type,
                "vocab_size": int(data_cfg.vocab_size)}
    raise UserError(f"data.tokenizer = {data_cfg.tokenizer!r} is not one of 'byte', 'sentencepiece'")


def describe(meta: dict) -> str:
    s = meta.get("settings", {})
    tok = s.get("tokenizer", "?")
    if tok == "sentencepiece":
        tok = f"sentencepiece {s.get('spm_model_type')} vocab {s.get('vocab_size')}"
    src = meta.get("source", {})
    if is_documents(meta):
        files = src.get("inputs", [])
        what = f"{len(files)} input file(s)" + (f" from {Path(files[0]['path']).parent}" if files else "")
    else:
        what = f"{Path(src.get('path', '?')).name} sha256 {str(src.get('sha256', '?'))[:12]}"
    return f"{what}, tokenizer {tok}"


def summary(meta: dict) -> str:
    """One line on what a preparation holds."""
    if not is_documents(meta):
        return ", ".join(f"{name} {info['tokens']:,} tokens" for name, info in meta["splits"].items())
    line = ", ".join(f"{name} {info['documents']:,} documents, {info['tokens']:,} tokens ({meta['dtype']})"
                     for name, info in meta["datasets"].items())
    skipped = meta.get("skipped", {})
    if skipped.get("files") or skipped.get("line_count"):
        line += f"; skipped {len(skipped['files'])} file(s) and {skipped['line_count']} line(s) (meta.json)"
    return line


def complete(out_dir: Path, meta: dict) -> bool:
    """Every file meta.json promises is there with the promised size."""
    try:
        itemsize = np.dtype(meta.get("dtype", "uint16")).itemsize
        datasets = meta["datasets"] if is_documents(meta) else meta["splits"]
        for name, info in datasets.items():
            if (out_dir / f"{name}.bin").stat().st_size != itemsize * info["tokens"]:
                return False
            if not (out_dir / f"{name}.idx").is_file():
                return False
        if meta["tokenizer"]["kind"] == "sentencepiece":
            return (out_dir / meta["tokenizer_file"]).is_file()
        return True
    except (OSError, KeyError, TypeError):
        return False


@contextlib.contextmanager
def prepare_lock(out_dir: Path):
    """Exclusive lock on out_dir/.prepare.lock for as long as it takes (no timeout: a preparation may take hours)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / LOCK_FILE, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError:
            pass  # a file system without locks: the atomic publication below still keeps the directory whole
        yield


def publish(tmp: Path, out_dir: Path, files: list[str], meta: dict) -> dict:
    """Move the built files into out_dir, then meta.json (written last: its presence means finished)."""
    for name in files:
        os.replace(tmp / name, out_dir / name)
    meta_tmp = tmp / META_FILE
    meta_tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(meta_tmp, out_dir / META_FILE)
    return meta


def claim_out_dir(out_dir: Path) -> None:
    """Refuse (naming data.prepared_dir) a folder that holds files prepare did not write; else mark it ours."""
    claim_folder(out_dir, MARKER_FILE, "data.prepared_dir", made_by_us=_unmarked_preparation)


def _unmarked_preparation(out_dir: Path) -> bool:
    """A preparation made before the marker: nothing but the files prepare writes, and its lock file (taken before
    anything else, so an interrupted one has it too) or a preparation's meta.json."""
    ours = {META_FILE, LOCK_FILE, SPM_MODEL_FILE, *(f"{name}.{ext}" for name in (*SPLITS, DOCUMENTS)
                                                   for ext in ("bin", "idx"))}
    names = [p.name for p in out_dir.iterdir()]
    if not all(name in ours or name.startswith(TMP_PREFIX) for name in names):
        return False
    if LOCK_FILE in names:
        return True
    try:
        meta = json.loads((out_dir / META_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and {"format", "tokenizer", "settings"} <= meta.keys()


def finished(out_dir: Path, why_not) -> dict | None:
    """out_dir's finished preparation when it is the one wanted (why_not(meta) is None); None when there is
    none or it is incomplete (rebuilt then, with identical content); another preparation is refused."""
    existing = read_meta(out_dir)
    if existing is None:
        return None
    why = why_not(existing)
    if why is not None:
        raise UserError(f"{out_dir} already holds a different data preparation ({describe(existing)}; {why}); "
                        f"set data.prepared_dir to a new directory or delete {out_dir}")
    return existing if complete(out_dir, existing) else None


def train_sentencepiece(sentences, data_cfg, model_path: Path, what: str, progress: bool) -> None:
    """Train data_cfg's SentencePiece model on `sentences` (a list of str) into model_path.

    Refuses a vocabulary that does not fit the text (too small for its characters, too large for its
    pieces) in one line naming data.vocab_size.
    """
    import sentencepiece as spm

    vocab = int(data_cfg.vocab_size)
    if progress:
        print(f"training SentencePiece ({data_cfg.spm_model_type}, vocab {vocab}) on {what} ...", file=sys.stderr,
              flush=True)
    writer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_writer=writer,
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
            raise UserError(f"data.vocab_size ({vocab}) is too small for {what}: SentencePiece with byte "
                            f"fallback needs at least {need} pieces (256 bytes, special pieces and the corpus's "
                            f"characters); raise data.vocab_size (e.g. {max(512, 2 * need)})") from None
        if "too high" in msg.lower() or "vocabulary size" in msg.lower():
            raise UserError(f"data.vocab_size ({vocab}) does not fit {what}: {msg}; lower data.vocab_size") from None
        raise UserError(f"SentencePiece training on {what} failed ({msg}); check data.vocab_size and data.spm_model_type") from None
    model_path.write_bytes(writer.getvalue())


def prepare(data_cfg, out_dir: Path, progress: bool = True, workers: int | None = None,
            skip_bad_input: bool = False) -> dict:
    """Prepare data_cfg's corpus into out_dir (idempotent); returns the meta dict also written to meta.json.

    `workers` and `skip_bad_input` concern data.inputs (competesmoe.data.pretrain.prepare_documents).
    """
    out_dir = Path(out_dir)
    claim_out_dir(out_dir)
    if data_cfg.inputs is not None:
        from competesmoe.data.pretrain import prepare_documents

        return prepare_documents(data_cfg, out_dir, progress=progress, workers=workers, skip_bad_input=skip_bad_input)
    return _prepare_splits(data_cfg, out_dir, progress)


def check_before_start(data_cfg) -> None:
    """The cheap checks every rank of `train` makes before any collective, so that all fail alike and at once:
    the data.path corpus is readable text; data.blend's members exist."""
    from competesmoe.data.loader import blend_member

    if data_cfg.inputs is None:
        resolve_corpus(data_cfg.path)
    for i, (_, path) in enumerate(data_cfg.blend or []):
        blend_member(i, path)


def ensure_prepared(data_cfg, out_dir: Path) -> None:
    """What `train` does before it starts (rank 0): prepare a data.path corpus when needed (cheap when
    done); check that a data.inputs preparation is finished and current (never prepares one: that is
    `competesmoe prepare`, a step of its own); check data.blend's members."""
    out_dir = Path(out_dir)
    if data_cfg.inputs is None:
        prepare(data_cfg, out_dir)
    else:
        from competesmoe.data.pretrain import check_documents

        check_documents(data_cfg, out_dir)
    if data_cfg.blend is not None:
        from competesmoe.data.loader import resolve_blend

        resolve_blend(data_cfg.blend, out_dir)


# ---------------------------------------------------------------------------------------------
# From data.path: one file, 90/5/5 by bytes.


def _same_splits_source(meta: dict, source: Path, settings: dict) -> str | None:
    """Why `meta` is not a preparation of `source` with `settings`, or None when it is."""
    if meta.get("format") != FORMAT_VERSION or is_documents(meta) or meta.get("settings") != settings:
        return "other settings"
    recorded = meta.get("source", {})
    if "fingerprint" in recorded:
        return sources.fingerprint_difference([recorded["fingerprint"]], [source])
    # prepared before fingerprints were recorded: the full hash, once
    return None if recorded.get("sha256") == sha256_file(source) else f"{source} has other content"


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
        return np.fromiter((i for line in ids for i in line), dtype=np.int64)
    return tok.encode(chunk)


def _prepare_splits(data_cfg, out_dir: Path, progress: bool) -> dict:
    from tqdm.auto import tqdm

    from competesmoe.data.megatron import IndexedDatasetWriter, token_dtype

    source = resolve_corpus(data_cfg.path)
    settings = tokenizer_settings(data_cfg)
    with prepare_lock(out_dir):
        done = finished(out_dir, lambda meta: _same_splits_source(meta, source, settings))
        if done is not None:
            return done
        raw = read_corpus(source)
        bounds = split_bounds(len(raw))
        for split, (a, b) in bounds.items():
            if b <= a:
                raise UserError(f"data.path: corpus {source} ({len(raw)} bytes) is too small to split 90/5/5 "
                                f"(the {split} split would be empty); use a larger corpus")
        tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=out_dir))
        try:
            files = []
            if settings["tokenizer"] == "sentencepiece":
                a, b = bounds["train"]
                lines = [line for line in raw[a:b].decode("utf-8", errors="replace").split("\n") if line]
                what = f"the train split of {source.name} ({(b - a) / 1e6:.1f} MB)"
                train_sentencepiece(lines, data_cfg, tmp / SPM_MODEL_FILE, what, progress)
                del lines
                tok = SentencePieceTokenizer(tmp / SPM_MODEL_FILE)
                files.append(SPM_MODEL_FILE)
            else:
                tok = ByteTokenizer()
            dtype = token_dtype(tok.vocab_size)

            splits_meta = {}
            bar = tqdm(total=len(raw), unit="B", unit_scale=True, desc="tokenize+write", disable=not progress,
                       file=sys.stderr)
            with bar:
                for split in SPLITS:
                    a, b = bounds[split]
                    bar.set_description(f"prepare {split}")
                    writer = IndexedDatasetWriter(tmp / split, dtype)
                    for chunk in _chunks(raw[a:b], at_newline=isinstance(tok, SentencePieceTokenizer)):
                        ids = _encode_chunk(tok, chunk)
                        if ids.size:
                            writer.add_document(ids)
                        bar.update(len(chunk))
                    writer.finalize()
                    files += [f"{split}.bin", f"{split}.idx"]
                    splits_meta[split] = {"bytes": b - a, "byte_offset": a, "tokens": writer.n_tokens,
                                          "documents": writer.n_documents}

            meta = {
                "format": FORMAT_VERSION,
                "source": {"path": str(source), "sha256": sha256_file(source), "bytes": len(raw),
                           "compression": sources.compression(source),
                           "fingerprint": sources.fingerprint(source)},
                "settings": settings,
                "tokenizer": tok.identity(),
                "dtype": dtype.name,
                "split_percent": list(SPLIT_PERCENT),
                "splits": splits_meta,
            }
            if settings["tokenizer"] == "sentencepiece":
                meta["tokenizer_file"] = SPM_MODEL_FILE
            return publish(tmp, out_dir, files, meta)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
