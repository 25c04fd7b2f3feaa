"""Preparation from `data.inputs`: many .txt/.jsonl files streamed into one megatron-core dataset of documents.

The main process reads the files in order (decompressing), cuts them into batches of about BATCH_BYTES
of text and hands them to `workers` processes that parse and tokenize; their results come back in order
and are appended to `text_document.bin/.idx` (IndexedDatasetWriter, constant memory). At most
2 x workers batches are in flight, so memory does not grow with the corpus, and the output does not
depend on the worker count.

Documents: one per JSONL line (its "text" field, Megatron's preprocess_data convention; blank lines and
empty texts are skipped), one per .txt file, stored as sequences of about BATCH_BYTES of text cut at
newlines (as preprocess_data stores a document's sentences). Every document ends with the tokenizer's
end-of-document id. SentencePiece trains on a bounded sample: the first data.spm_sample_bytes / n_files
bytes of text of every file.

Bad input, in one line: a file that is empty, unreadable or corrupt (found before any work, or while
reading it) and a JSONL line that is not JSON, not an object, or lacks a string "text" (file and line).
By default it is refused and out_dir stays as it was; with skip_bad_input (`--skip-bad-input`) it is
skipped with a warning and recorded in meta.json's "skipped".
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import sys
import tempfile
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import NamedTuple

import numpy as np

from competesmoe.common.errors import UserError
from competesmoe.common.files import sha256_file
from competesmoe.data import sources
from competesmoe.data.meta import DOCUMENTS, is_documents, read_meta
from competesmoe.data.prepare import (
    FORMAT_VERSION,
    TMP_PREFIX,
    complete,
    finished,
    prepare_lock,
    publish,
    tokenizer_settings,
    train_sentencepiece,
)
from competesmoe.data.tokenizer import SPM_MODEL_FILE, ByteTokenizer, SentencePieceTokenizer

BATCH_BYTES = 1 << 20
IN_FLIGHT_PER_WORKER = 2
SKIPPED_LINES_KEPT = 100  # meta.json lists this many skipped lines (and counts them all)
WARNINGS_SHOWN = 20


class Batch(NamedTuple):
    file: int  # index into the input files
    start: int  # JSONL: line number of lines[0] (1-based); .txt: byte offset of the piece
    lines: list[bytes]  # JSONL lines, or one .txt piece
    jsonl: bool
    ends_document: bool  # .txt: the file's last piece


class Encoded(NamedTuple):
    tokens: np.ndarray
    lengths: np.ndarray  # JSONL: one per document; .txt: the piece's
    bad: list[tuple[int, str]]  # (line number, why)
    empty: int  # JSONL records with an empty text
    nbytes: int


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)))


# ---------------------------------------------------------------------------------------------
# Worker side: parse and tokenize one batch (no torch, no megatron: a worker starts in well under a second).

_tokenizer = None


def _init_worker(kind: str, model_file: str | None) -> None:
    global _tokenizer
    _tokenizer = ByteTokenizer(with_eod=True) if kind == "byte" else SentencePieceTokenizer(model_file, with_eod=True)


def _texts_to_ids(texts: list[str]) -> list[np.ndarray]:
    tok = _tokenizer
    if isinstance(tok, ByteTokenizer):
        return [tok.encode(t.encode("utf-8", errors="replace")) for t in texts]
    try:
        ids = tok.encode_lines(texts, num_threads=1)
    except (UnicodeEncodeError, RuntimeError, TypeError):  # a lone surrogate: encode each text, sanitised
        ids = [tok.encode_lines([t.encode("utf-8", errors="replace").decode("utf-8")], num_threads=1)[0]
               for t in texts]
    return [np.asarray(i, dtype=np.int64) for i in ids]


def _parse_line(line: bytes) -> str | tuple[str]:
    """The line's text, or (why,) when it is bad."""
    try:
        record = json.loads(line)
    except UnicodeDecodeError as err:
        return (f"is not UTF-8 (byte {err.start})",)
    except ValueError as err:
        return (f"is not JSON ({getattr(err, 'msg', err)} at column {getattr(err, 'colno', '?')})",)
    if not isinstance(record, dict):
        return ("is not a JSON object",)
    if "text" not in record:
        return ("has no 'text' field",)
    if not isinstance(record["text"], str):
        return (f"'text' is a {type(record['text']).__name__}, not a string",)
    return record["text"]


def encode_batch(batch: Batch) -> Encoded:
    eod = np.array([_tokenizer.eod], dtype=np.int64)
    if not batch.jsonl:
        piece = batch.lines[0]
        ids = _texts_to_ids([piece.decode("utf-8", errors="replace")])[0]
        if batch.ends_document:
            ids = np.concatenate([ids, eod])
        return Encoded(ids, np.array([ids.size]), [], 0, len(piece))
    texts, bad, empty = [], [], 0
    for k, line in enumerate(batch.lines):
        if not line.strip():
            continue
        parsed = _parse_line(line)
        if isinstance(parsed, tuple):
            bad.append((batch.start + k, parsed[0]))
        elif parsed:
            texts.append(parsed)
        else:
            empty += 1
    docs = [np.concatenate([ids, eod]) for ids in _texts_to_ids(texts)]
    tokens = np.concatenate(docs) if docs else np.zeros(0, dtype=np.int64)
    return Encoded(tokens, np.array([d.size for d in docs], dtype=np.int64), bad, empty,
                   sum(len(line) for line in batch.lines))


# ---------------------------------------------------------------------------------------------
# Main side: read, dispatch, write.


class BadInput:
    """Refuses (UserError) or records-and-warns each bad file or line, as skip_bad_input says."""

    def __init__(self, skip: bool):
        self.skip = skip
        self.files: list[dict] = []
        self.lines: list[dict] = []
        self.line_count = 0
        self.shown = 0

    def file(self, path: Path, why: str) -> None:
        if not self.skip:
            raise UserError(f"input {path} {why}; remove it from data.inputs, or prepare with --skip-bad-input "
                            f"to skip it")
        self.files.append({"path": str(path), "why": why})
        self._warn(f"skipping input {path}: it {why}")

    def line(self, path: Path, number: int, why: str) -> None:
        if not self.skip:
            raise UserError(f"{path}:{number}: the line {why}; fix or delete the line, or prepare with "
                            f"--skip-bad-input to skip it")
        self.line_count += 1
        if len(self.lines) < SKIPPED_LINES_KEPT:
            self.lines.append({"path": str(path), "line": number, "why": why})
        self._warn(f"skipping {path}:{number}: the line {why}")

    def _warn(self, message: str) -> None:
        self.shown += 1
        if self.shown <= WARNINGS_SHOWN:
            print(f"competesmoe: warning: {message}", file=sys.stderr, flush=True)
        elif self.shown == WARNINGS_SHOWN + 1:
            print("competesmoe: warning: more input skipped; meta.json's 'skipped' counts it all", file=sys.stderr)

    def record(self) -> dict:
        return {"files": self.files, "lines": self.lines, "line_count": self.line_count}


def _jsonl_batches(index: int, stream):
    lines, size, start = [], 0, 1
    try:
        for number, line in enumerate(stream, start=1):
            lines.append(line)
            size += len(line)
            if size >= BATCH_BYTES:
                yield Batch(index, start, lines, True, False)
                lines, size, start = [], 0, number + 1
    except sources.DECOMPRESS_ERRORS:
        if lines:  # the lines read before the file broke
            yield Batch(index, start, lines, True, False)
        raise
    if lines:
        yield Batch(index, start, lines, True, False)


def _read_piece(stream) -> bytes:
    piece = stream.read(BATCH_BYTES)
    return piece + stream.readline() if piece and not piece.endswith(b"\n") else piece


def _txt_batches(index: int, stream, state: dict):
    piece, offset = _read_piece(stream), 0
    while piece:
        following = _read_piece(stream)
        state["open"] = bool(following)
        yield Batch(index, offset, [piece], False, not following)
        offset += len(piece)
        piece = following


def _batches(files: list[sources.InputFile], bad: BadInput):
    """Every input's batches in order; a file that breaks while read is reported (its documents so far stay)."""
    for index, f in enumerate(files):
        state = {"open": False}
        try:
            with sources.open_binary(f.path) as stream:
                yield from _jsonl_batches(index, stream) if f.format == ".jsonl" else _txt_batches(index, stream, state)
        except sources.DECOMPRESS_ERRORS as err:
            bad.file(f.path, f"could not be read to the end ({err})")
            if state["open"]:  # close the .txt document read so far
                yield Batch(index, 0, [b""], False, True)


def _spm_sample(files: list[sources.InputFile], budget: int) -> list[str]:
    """The first budget / len(files) bytes of text of every file, as lines (SentencePiece's sentences)."""
    share = max(1, budget // max(1, len(files)))
    sentences = []
    for f in files:
        try:
            text = _head_text(f, share)
        except sources.DECOMPRESS_ERRORS:
            continue  # the main pass reports the file
        sentences += [line for line in text.split("\n") if line]
    return sentences


def _head_text(f: sources.InputFile, share: int) -> str:
    with sources.open_binary(f.path) as stream:
        if f.format != ".jsonl":
            head = stream.read(share)
            return head[:head.rfind(b"\n") + 1 or len(head)].decode("utf-8", errors="replace")
        texts, taken = [], 0
        for line in stream:
            parsed = _parse_line(line) if line.strip() else ""
            if isinstance(parsed, str) and parsed:
                texts.append(parsed)
                taken += len(line)
            if taken >= share:
                break
        return "\n".join(texts)


def _readable_files(files: list[sources.InputFile], bad: BadInput) -> list[sources.InputFile]:
    good = []
    for f in files:
        why = sources.check_readable(f.path)
        if why is None:
            good.append(f)
        else:
            bad.file(f.path, why)
    if not good:
        raise UserError("data.inputs: no readable input file is left to prepare; check the files named above")
    return good


def _settings(data_cfg) -> dict:
    if data_cfg.tokenizer_model is not None:
        model = Path(data_cfg.tokenizer_model).expanduser()
        if not model.is_file():
            raise UserError(f"data.tokenizer_model: {model} does not exist; point it at a SentencePiece .model file "
                            f"(e.g. another preparation's {SPM_MODEL_FILE})")
        return {"tokenizer": "sentencepiece", "tokenizer_model_sha256": sha256_file(model)}
    settings = tokenizer_settings(data_cfg)
    if settings["tokenizer"] == "sentencepiece":
        settings["spm_sample_bytes"] = int(data_cfg.spm_sample_bytes)
    return settings


def _difference(meta: dict, settings: dict, files: list[sources.InputFile]) -> str | None:
    """Why `meta` is not a preparation of `files` with `settings` (None when it is)."""
    if meta.get("format") != FORMAT_VERSION or not is_documents(meta):
        return "it is a 90/5/5 preparation of data.path" if "splits" in meta else "another format"
    if meta.get("settings") != settings:
        return "other tokenizer settings"
    return sources.fingerprint_difference(meta["source"]["inputs"], [f.path for f in files])


def check_documents(data_cfg, out_dir: Path) -> dict:
    """The finished, current preparation of data.inputs in out_dir (by fingerprint), else UserError saying
    to run `competesmoe prepare`. What `train` does instead of preparing."""
    run_prepare = "run `competesmoe prepare` with this config first (a step of its own, before training)"
    meta = read_meta(out_dir)
    if meta is None:
        raise UserError(f"{out_dir} holds no finished preparation of data.inputs; {run_prepare}")
    why = _difference(meta, _settings(data_cfg), sources.resolve_inputs(data_cfg.inputs))
    if why is not None:
        raise UserError(f"{out_dir} is not a preparation of data.inputs as configured now ({why}); {run_prepare}, "
                        f"into a new data.prepared_dir (or delete {out_dir})")
    if not complete(out_dir, meta):
        raise UserError(f"{out_dir} is incomplete (a file is missing or truncated); {run_prepare}")
    return meta


def _tokenizer_for(data_cfg, settings: dict, files, tmp: Path, progress: bool):
    """(tokenizer, its spec for the workers, the files it adds to the preparation)."""
    if settings["tokenizer"] == "byte":
        return ByteTokenizer(with_eod=True), ("byte", None), []
    if data_cfg.tokenizer_model is not None:
        shutil.copyfile(Path(data_cfg.tokenizer_model).expanduser(), tmp / SPM_MODEL_FILE)
    else:
        sample = _spm_sample(files, int(data_cfg.spm_sample_bytes))
        if not sample:
            raise UserError("data.inputs: the files hold no text to train SentencePiece on; check data.inputs")
        what = f"a {sum(map(len, sample)) / 1e6:.1f} MB sample of {len(files)} input file(s)"
        train_sentencepiece(sample, data_cfg, tmp / SPM_MODEL_FILE, what, progress)
        del sample
    tok = SentencePieceTokenizer(tmp / SPM_MODEL_FILE, with_eod=True)
    return tok, ("sentencepiece", str(tmp / SPM_MODEL_FILE)), [SPM_MODEL_FILE]


def _write_all(files, writer, bad: BadInput, spec, workers: int, progress: bool) -> dict:
    """Stream every file through the workers into writer; returns the counts for meta.json."""
    from tqdm.auto import tqdm

    counts = {"input_bytes": 0, "empty_records": 0}
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that may hold threads and locks
    bar = tqdm(unit="B", unit_scale=True, desc="prepare", disable=not progress, file=sys.stderr)
    with bar, ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=spec) as pool:
        pending = deque()

        def write_oldest():
            batch, future = pending.popleft()
            out = future.result()
            for number, why in out.bad:
                bad.line(files[batch.file].path, number, why)
            if batch.jsonl:
                writer.add_documents(out.tokens, out.lengths)
            else:
                writer.add_sequence(out.tokens)
                if batch.ends_document:
                    writer.end_document()
            counts["input_bytes"] += out.nbytes
            counts["empty_records"] += out.empty
            bar.update(out.nbytes)

        try:
            for batch in _batches(files, bad):
                pending.append((batch, pool.submit(encode_batch, batch)))
                if len(pending) >= IN_FLIGHT_PER_WORKER * workers:
                    write_oldest()
            while pending:
                write_oldest()
        except BrokenProcessPool:
            raise UserError(f"a tokenizing worker process died (out of memory?); prepare again with fewer --workers "
                            f"(now {workers})") from None
    return counts


def prepare_documents(data_cfg, out_dir: Path, progress: bool = True, workers: int | None = None,
                      skip_bad_input: bool = False) -> dict:
    """Prepare data.inputs into out_dir/text_document.bin/.idx (idempotent: a current preparation is returned)."""
    from competesmoe.data.megatron import IndexedDatasetWriter, token_dtype

    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise UserError(f"--workers ({workers}) must be at least 1")
    settings = _settings(data_cfg)
    files = sources.resolve_inputs(data_cfg.inputs)
    with prepare_lock(out_dir):
        done = finished(out_dir, lambda meta: _difference(meta, settings, files))
        if done is not None:
            return done
        bad = BadInput(skip_bad_input)
        fingerprints = [sources.fingerprint(f.path) for f in files]
        readable = _readable_files(files, bad)
        tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=out_dir))
        try:
            tok, spec, extra = _tokenizer_for(data_cfg, settings, readable, tmp, progress)
            dtype = token_dtype(tok.vocab_size)
            writer = IndexedDatasetWriter(tmp / DOCUMENTS, dtype)
            try:
                counts = _write_all(readable, writer, bad, spec, workers, progress)
            except BaseException:
                writer.abort()
                raise
            writer.finalize()
            if writer.n_documents == 0:
                raise UserError("data.inputs: the input files hold no document (every text empty or skipped); "
                                "check data.inputs")
            meta = {
                "format": FORMAT_VERSION,
                "source": {"inputs": fingerprints},
                "settings": settings,
                "tokenizer": tok.identity(),
                "dtype": dtype.name,
                "datasets": {DOCUMENTS: {"documents": writer.n_documents, "sequences": writer.n_sequences,
                                         "tokens": writer.n_tokens, **counts}},
                "skipped": bad.record(),
            }
            if extra:
                meta["tokenizer_file"] = SPM_MODEL_FILE
            return publish(tmp, out_dir, [*extra, f"{DOCUMENTS}.bin", f"{DOCUMENTS}.idx"], meta)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

