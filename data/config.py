"""Configuration of the corpus and tokenizer: `data.*` of a run's YAML.

Two ways in. The single-file path (`data.path`, the default) is the enwik8 convention the benchmarks use:
one text file split 90/5/5 by bytes, drawn as non-overlapping windows (`sampler: windows`). The
pretraining path (`data.inputs`, opt-in) streams many .txt/.jsonl files into one megatron-core indexed
dataset of documents, drawn by megatron-core's GPTDataset (`sampler: gpt`), optionally blended with other
preparations (`data.blend`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from competesmoe.common.typed_config import check

SPLIT_PATTERN = re.compile(r"^\s*\d+(\.\d*)?\s*,\s*\d+(\.\d*)?\s*,\s*\d+(\.\d*)?\s*$")


@dataclass
class DataConfig:
    path: str | None = None
    """Raw text file (.txt, .xml, or .bz2/.gz of them), split 90/5/5 by bytes. null = the bundled Wikipedia
    fragment. Used when data.inputs is null."""
    inputs: list[str] | None = None
    """Pretraining corpus for `competesmoe prepare`: files, directories (searched recursively) and globs of
    .txt and .jsonl files, each optionally .gz/.bz2/.zst. A JSONL line is one document (its `text` field,
    Megatron's preprocess_data convention); a .txt file is one document. An end-of-document token follows
    each document. Needs sampler: gpt. null = the single-file path (data.path)."""
    tokenizer: Literal["byte", "sentencepiece"] = "byte"
    """'byte': one token per byte (bits per character, enwik8 convention; with data.inputs, id 256 ends a
    document); 'sentencepiece': trained by prepare (its </s> ends a document)."""
    spm_model_type: Literal["bpe", "unigram"] = "bpe"
    """SentencePiece model type when tokenizer = sentencepiece."""
    vocab_size: int = 8000
    """SentencePiece vocabulary size (ignored for byte level). Tokens are stored as uint16 below 65500
    pieces, int32 above (megatron-core's choice)."""
    tokenizer_model: str | None = None
    """With data.inputs: an existing SentencePiece .model to use instead of training one, e.g. another
    preparation's spm.model, so that sources prepared separately share one vocabulary (for data.blend)."""
    spm_sample_bytes: int = 100_000_000
    """With data.inputs: how much text SentencePiece trains on, taken from the start of every input file
    (an equal share each), so training memory and time do not grow with the corpus."""
    split: str = "98,1,1"
    """With sampler gpt on data.inputs or data.blend: 'train,valid,test' weights over each dataset's
    documents (Megatron's --split)."""
    sampler: Literal["windows", "gpt"] = "windows"
    """'windows': our seeded permutation of non-overlapping windows of the 90/5/5 splits (the benchmarks).
    'gpt': megatron-core's GPTDataset through BlendedMegatronDatasetBuilder (document-aware, indices cached
    under <output_dir>/gpt_index_cache), over data.blend, else data.prepared_dir."""
    blend: list[list] | None = None
    """With sampler gpt: the training mix, [[weight, path], ...] (e.g. [[0.7, prep/web], [0.3, prep/books]]);
    each path a directory written by `competesmoe prepare` from data.inputs, or a megatron-core dataset
    prefix (path.bin + path.idx, e.g. from Megatron's preprocess_data) with data.prepared_dir's tokenizer.
    null = data.prepared_dir's dataset alone."""
    prepared_dir: str | None = None
    """Where prepare writes (tokenizer, meta.json, .bin/.idx); null = <output_dir>/data. With data.blend it
    still names the run's tokenizer."""

    def prepared_path(self, output_dir: str | Path) -> Path:
        """data.prepared_dir, or <output_dir>/data when it is null."""
        return Path(self.prepared_dir) if self.prepared_dir else Path(output_dir) / "data"

    def validate(self) -> None:
        check(self.tokenizer == "byte" or self.vocab_size >= 512,
              f"data.vocab_size ({self.vocab_size}) must be at least 512 for sentencepiece "
              f"(byte fallback takes 256 pieces plus the corpus's characters)")
        check(self.path is None or self.inputs is None,
              "data.path and data.inputs are both set; set data.path for one text file split 90/5/5, or "
              "data.inputs for a pretraining corpus, not both")
        if self.inputs is not None:
            check(len(self.inputs) > 0,
                  "data.inputs is an empty list; name files, directories or globs, or set it to null")
        for field in ("inputs", "blend"):
            check(getattr(self, field) is None or self.sampler == "gpt",
                  f"data.{field} needs data.sampler: gpt (megatron-core's GPTDataset draws documents; the windows "
                  f"sampler reads only a data.path preparation)")
        check(self.tokenizer_model is None or (self.tokenizer == "sentencepiece" and self.inputs is not None),
              "data.tokenizer_model needs data.tokenizer: sentencepiece and data.inputs (it replaces training "
              "SentencePiece on the inputs)")
        check(self.spm_sample_bytes >= 1 << 16,
              f"data.spm_sample_bytes ({self.spm_sample_bytes}) must be at least 65536")
        check(bool(SPLIT_PATTERN.match(self.split)) and all(float(w) > 0 for w in self.split.split(",")),
              f"data.split = {self.split!r} must be three positive weights 'train,valid,test' (e.g. '98,1,1'): "
              f"training evaluates on valid and test")
        for i, entry in enumerate(self.blend or []):
            ok = (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], (int, float))
                  and not isinstance(entry[0], bool) and entry[0] > 0 and isinstance(entry[1], str) and entry[1])
            check(ok, f"data.blend[{i}] = {entry!r} must be [weight, path] with a positive weight, "
                      f"e.g. data.blend: [[0.7, prep/web], [0.3, prep/books]]")
        check(self.blend is None or len(self.blend) > 0,
              "data.blend is an empty list; give [[weight, path], ...] or null")
