"""Tokenizers: raw bytes (one token per byte) or a SentencePiece model trained by `prepare`.

Both take `bytes` and return token ids in the smallest unsigned dtype that holds the vocabulary (uint16 up
to 65536 pieces). With `with_eod` (preparations from `data.inputs`) a tokenizer also has an end-of-document
id, `eod`: 256 for bytes (so 257 ids), SentencePiece's </s>. `identity()` is a small JSON-able dict that pins
down the tokenizer exactly (a checkpoint or a prepared directory can be checked against it).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from competesmoe.common.errors import UserError
from competesmoe.common.files import sha256_file
from competesmoe.data.meta import META_FILE, load_meta

SPM_MODEL_FILE = "spm.model"


def ids_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds ids 0..vocab_size-1."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


class ByteTokenizer:
    """One token per byte; ids 0..255 (and 256 = end of document with_eod). Lossless on any input."""

    kind = "byte"

    def __init__(self, with_eod: bool = False):
        self.eod = 256 if with_eod else None
        self.vocab_size = 257 if with_eod else 256

    def encode(self, text: bytes) -> np.ndarray:
        return np.frombuffer(bytes(text), dtype=np.uint8).astype(np.uint16)

    def decode(self, ids) -> bytes:
        arr = np.asarray(ids).reshape(-1)
        if self.eod is not None:
            arr = arr[arr != self.eod]
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise ValueError(f"byte tokenizer ids must be within 0..255, got {arr.min()}..{arr.max()}")
        return arr.astype(np.uint8).tobytes()

    def identity(self) -> dict:
        ident = {"kind": self.kind, "vocab_size": self.vocab_size}
        return ident if self.eod is None else {**ident, "eod": self.eod}


class SentencePieceTokenizer:
    """A trained SentencePiece model (byte_fallback on, identity normalisation: lossless on valid UTF-8)."""

    kind = "sentencepiece"

    def __init__(self, model_file: str | Path, with_eod: bool = False):
        import sentencepiece as spm

        self.model_file = Path(model_file)
        if not self.model_file.is_file():
            raise UserError(f"SentencePiece model {self.model_file} does not exist; re-run data preparation "
                            f"(or point data.prepared_dir at a complete preparation)")
        self.sha256 = sha256_file(self.model_file)
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(self.model_file))
        except (RuntimeError, OSError) as err:
            raise UserError(f"{self.model_file} is not a SentencePiece model ({str(err).strip()[:120]}); "
                            f"point data.tokenizer_model at a .model file") from None
        self.vocab_size = int(self._sp.get_piece_size())
        self.unk_id = int(self._sp.unk_id())
        self.dtype = ids_dtype(self.vocab_size)
        self.eod = None
        if with_eod:
            self.eod = int(self._sp.eos_id())
            if self.eod < 0:
                raise UserError(f"SentencePiece model {self.model_file} has no </s> piece to end documents with; "
                                f"use a model with eos_id set (or let prepare train one: data.tokenizer_model: null)")

    def encode(self, text: bytes) -> np.ndarray:
        return np.asarray(self._sp.encode(bytes(text).decode("utf-8", errors="replace")), dtype=self.dtype)

    def encode_lines(self, lines: list[str], num_threads: int = 2) -> list[list[int]]:
        """Batch-encode already decoded strings (used by prepare for speed)."""
        return self._sp.encode(lines, num_threads=num_threads)

    def decode(self, ids) -> bytes:
        ids = np.asarray(ids).reshape(-1).astype(np.int64).tolist()
        return self._sp.decode(ids).encode("utf-8")

    def identity(self) -> dict:
        ident = {"kind": self.kind, "vocab_size": self.vocab_size, "sha256": self.sha256}
        return ident if self.eod is None else {**ident, "eod": self.eod}


def quality(nats_per_token: float, kind: str) -> dict:
    """The usual figure of a mean next-token loss: bits per character (= per byte) for byte-level models,
    perplexity per token for SentencePiece ones."""
    if kind == "byte":
        return {"bpc": nats_per_token / math.log(2)}
    return {"ppl": math.exp(min(nats_per_token, 50.0))}


def load_tokenizer(prepared_dir: str | Path):
    """The tokenizer a preparation used (read from its meta.json); checks the SentencePiece model's hash."""
    prepared_dir = Path(prepared_dir)
    meta_path = prepared_dir / META_FILE
    meta = load_meta(prepared_dir)
    ident = meta["tokenizer"]
    with_eod = "eod" in ident
    if ident["kind"] == "byte":
        return ByteTokenizer(with_eod)
    if ident["kind"] == "sentencepiece":
        tok = SentencePieceTokenizer(prepared_dir / meta.get("tokenizer_file", SPM_MODEL_FILE), with_eod)
        if tok.identity() != ident:
            raise UserError(f"{tok.model_file} (sha256 {tok.sha256[:12]}) does not match the tokenizer recorded in "
                            f"{meta_path}; delete {prepared_dir} and prepare again")
        return tok
    raise UserError(f"{meta_path} names an unknown tokenizer kind {ident['kind']!r}; delete {prepared_dir} and prepare again")
