"""Configuration of the corpus and tokenizer: `data.*` of a run's YAML."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from competesmoe.common.typed_config import check


@dataclass
class DataConfig:
    path: str | None = None
    """Raw text file (.txt, .xml, or .bz2/.gz of them). null = the bundled Wikipedia fragment."""
    tokenizer: Literal["byte", "sentencepiece"] = "byte"
    """'byte': one token per byte (bits per character, enwik8 convention); 'sentencepiece': trained by prepare."""
    spm_model_type: Literal["bpe", "unigram"] = "bpe"
    """SentencePiece model type when tokenizer = sentencepiece."""
    vocab_size: int = 8000
    """SentencePiece vocabulary size (ignored for byte level, which has 256)."""
    prepared_dir: str | None = None
    """Where prepare writes the .bin/.idx splits; null = <output_dir>/data."""

    def validate(self) -> None:
        check(self.tokenizer == "byte" or self.vocab_size >= 512,
              f"data.vocab_size ({self.vocab_size}) must be at least 512 for sentencepiece "
              f"(byte fallback takes 256 pieces plus the corpus's characters)")
