"""Tokenizers: raw bytes (one token per byte) or a SentencePiece model trained by `prepare`.

Both take `bytes` and return uint16 token ids, so the prepared .bin files hold uint16 either way.
`identity()` is a small JSON-able dict that pins down the tokenizer exactly (a checkpoint or a prepared
directory can be checked against it).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from competesmoe.common.errors import UserError
from competesmoe.common.files import sha256_file
from competesmoe.data.meta import META_FILE, load_meta

SPM_MODEL_FILE = "spm.model"


class ByteTokenizer:
    """One token per byte; ids 0..255. Lossless on any input."""

    kind = "byte"
    vocab_size = 256

    def encode(self, text: bytes) -> np.ndarray:
        return np.frombuffer(bytes(text), dtype=np.uint8).astype(np.uint16)

    def decode(self, ids) -> bytes:
        arr = np.asarray(ids)
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise ValueError(f"byte tokenizer ids must be within 0..255, got {arr.min()}..{arr.max()}")
        return arr.astype(np.uint8).tobytes()

    def identity(self) -> dict:
        return {"kind": self.kind, "vocab_size": self.vocab_size}


class SentencePieceTokenizer:
    """A trained SentencePiece model (byte_fallback on, identity normalisation: lossless on valid UTF-8)."""

    kind = "sentencepiece"

    def __init__(self, model_file: str | Path):
        import sentencepiece as spm

        self.model_file = Path(model_file)
        if not self.model_file.is_file():
            raise UserError(f"SentencePiece model {self.model_file} does not exist; re-run data preparation "
                            f"(or point data.prepared_dir at a complete preparation)")
        self.sha256 = sha256_file(self.model_file)
        self._sp = spm.SentencePieceProcessor(model_file=str(self.model_file))
        self.vocab_size = int(self._sp.get_piece_size())
        if self.vocab_size > 65536:
            raise UserError(f"SentencePiece model {self.model_file} has {self.vocab_size} pieces; uint16 storage "
                            f"allows at most 65536 (lower data.vocab_size)")

    def encode(self, text: bytes) -> np.ndarray:
        return np.asarray(self._sp.encode(bytes(text).decode("utf-8", errors="replace")), dtype=np.uint16)

    def encode_lines(self, lines: list[str], num_threads: int = 2) -> list[list[int]]:
        """Batch-encode already decoded strings (used by prepare for speed)."""
        return self._sp.encode(lines, num_threads=num_threads)

    def decode(self, ids) -> bytes:
        ids = np.asarray(ids).reshape(-1).astype(np.int64).tolist()
        return self._sp.decode(ids).encode("utf-8")

    def identity(self) -> dict:
        return {"kind": self.kind, "vocab_size": self.vocab_size, "sha256": self.sha256}


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
    if ident["kind"] == "byte":
        return ByteTokenizer()
    if ident["kind"] == "sentencepiece":
        tok = SentencePieceTokenizer(prepared_dir / meta.get("tokenizer_file", SPM_MODEL_FILE))
        if tok.identity() != ident:
            raise UserError(f"{tok.model_file} (sha256 {tok.sha256[:12]}) does not match the tokenizer recorded in "
                            f"{meta_path}; delete {prepared_dir} and prepare again")
        return tok
    raise UserError(f"{meta_path} names an unknown tokenizer kind {ident['kind']!r}; delete {prepared_dir} and prepare again")
