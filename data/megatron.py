"""megatron-core's datasets, used in one place: the indexed-dataset format, GPTDataset and blending.

What we take from megatron-core: the .bin/.idx format and its reader (`IndexedDataset`), the token dtype
rule (`DType.optimal_dtype`), `GPTDataset` (document-aware samples, shuffled by seed, indices cached) and
`BlendedMegatronDatasetBuilder` (weighted blends, rank 0 builds the cache first).

Where it falls short, and what we do about it (here and nowhere else):
- `IndexedDatasetBuilder` keeps every sequence length and document boundary in Python lists (measured:
  51 bytes per document of 100 tokens; about 80 with lengths above 256, ints Python does not cache; plus
  a third list at `finalize`),
  so its memory grows with the corpus: 5-8 GB per 1e8 documents. `IndexedDatasetWriter` writes the same
  bytes (tested against the builder) with the lengths spilled to side files as they come (measured: 0
  bytes per document).
- `BlendedDataset` calls `torch.distributed.get_rank()` whenever it caches indices, so building outside a
  job (one process on a CPU: tests, benchmarks, tools) needs a process group; `process_group()` makes a
  gloo world of one for the duration when there is none.
- `GPTDataset` loops forever on a split with no documents (it adds epochs of zero tokens until it has
  enough); `check_split_not_empty` refuses that first, naming `data.split`.
- The rank that builds the index cache keeps the arrays it built in memory (per document and per sample:
  measured +80 MB on the benchmark's 2 GB corpus) while the other ranks map the cached files (+13 MB);
  every rank therefore builds twice, the second time a cache hit that maps them (`build_gpt_datasets`;
  measured after: +39 MB).
- Importing megatron.core takes seconds (it imports its whole training stack), so it happens on first use.
"""

from __future__ import annotations

import contextlib
import struct
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np

from competesmoe.common.errors import UserError

SPLITS = ("train", "valid", "test")
_SIDE_CHUNK = 1 << 20  # entries per read when the side files are copied into the .idx


def _quiet_import(name: str):
    import importlib

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Transformer Engine.*")
        warnings.filterwarnings("ignore", message=".*Apex.*")
        return importlib.import_module(name)


def indexed_dataset_module():
    """megatron.core.datasets.indexed_dataset, imported on first use."""
    return _quiet_import("megatron.core.datasets.indexed_dataset")


def token_dtype(vocab_size: int) -> np.dtype:
    """The storage dtype megatron-core picks for a vocabulary: uint16 below 65500 ids, else int32."""
    return np.dtype(indexed_dataset_module().DType.optimal_dtype(int(vocab_size)))


class IndexedDatasetWriter:
    """Writes `prefix`.bin/.idx in megatron-core's format, in constant memory (see the module docstring).

    add_sequence() appends a sequence's tokens; end_document() closes the document made of the sequences
    since the last one; finalize() writes the .idx. The files are what IndexedDatasetBuilder would write
    for the same calls, so Megatron's own tools read them.
    """

    def __init__(self, prefix: str | Path, dtype):
        self.prefix = str(prefix)
        self.dtype = np.dtype(dtype)
        self._bin = open(self.prefix + ".bin", "wb")
        self._lengths = open(self.prefix + ".lengths.tmp", "wb")
        self._doc_ends = open(self.prefix + ".docs.tmp", "wb")
        self.n_tokens = self.n_sequences = self.n_documents = 0

    def add_sequence(self, tokens) -> None:
        arr = np.asarray(tokens)
        self._write_tokens(arr)
        self._lengths.write(np.int32(arr.size).tobytes())
        self.n_sequences += 1

    def _write_tokens(self, arr: np.ndarray) -> None:
        if arr.size and (arr.min() < 0 or arr.max() > np.iinfo(self.dtype).max):
            raise ValueError(f"token ids {arr.min()}..{arr.max()} do not fit {self.dtype}")
        self._bin.write(arr.astype(self.dtype, copy=False).tobytes())
        self.n_tokens += int(arr.size)

    def add_documents(self, tokens, lengths) -> None:
        """Several one-sequence documents at once: their tokens concatenated, and their lengths."""
        lengths = np.asarray(lengths, dtype=np.int64)
        self._write_tokens(np.asarray(tokens))
        self._lengths.write(lengths.astype(np.int32).tobytes())
        self._doc_ends.write((self.n_sequences + np.arange(1, lengths.size + 1, dtype=np.int64)).tobytes())
        self.n_sequences += int(lengths.size)
        self.n_documents += int(lengths.size)

    def end_document(self) -> None:
        self._doc_ends.write(np.int64(self.n_sequences).tobytes())
        self.n_documents += 1

    def add_document(self, tokens) -> None:
        self.add_sequence(tokens)
        self.end_document()

    def finalize(self) -> None:
        mod = indexed_dataset_module()
        for f in (self._bin, self._lengths, self._doc_ends):
            f.close()
        itemsize = self.dtype.itemsize
        with open(self.prefix + ".idx", "wb") as idx:
            idx.write(mod._INDEX_HEADER)
            idx.write(struct.pack("<Q", 1))
            idx.write(struct.pack("<B", mod.DType.code_from_dtype(self.dtype.type)))
            idx.write(struct.pack("<Q", self.n_sequences))
            idx.write(struct.pack("<Q", self.n_documents + 1))
            for chunk in self._side_chunks(".lengths.tmp", np.int32):
                idx.write(chunk.tobytes())
            pointer = 0
            for chunk in self._side_chunks(".lengths.tmp", np.int32):
                bytes_ = chunk.astype(np.int64) * itemsize
                idx.write((pointer + np.cumsum(bytes_) - bytes_).tobytes())
                pointer += int(bytes_.sum())
            idx.write(np.int64(0).tobytes())
            for chunk in self._side_chunks(".docs.tmp", np.int64):
                idx.write(chunk.tobytes())
        self._remove_side_files()

    def _side_chunks(self, suffix: str, dtype):
        with open(self.prefix + suffix, "rb") as f:
            while block := f.read(_SIDE_CHUNK * np.dtype(dtype).itemsize):
                yield np.frombuffer(block, dtype=dtype)

    def _remove_side_files(self) -> None:
        for suffix in (".lengths.tmp", ".docs.tmp"):
            Path(self.prefix + suffix).unlink(missing_ok=True)

    def abort(self) -> None:
        for f in (self._bin, self._lengths, self._doc_ends):
            f.close()
        self._remove_side_files()


def open_indexed(prefix: str | Path):
    """megatron-core's IndexedDataset at `prefix` (mmap); UserError when its files are missing."""
    mod = indexed_dataset_module()
    if not mod.IndexedDataset.exists(str(prefix)):
        raise UserError(f"indexed dataset {prefix}.bin/.idx does not exist; run `competesmoe prepare` into its "
                        f"directory first (data.prepared_dir)")
    return mod.IndexedDataset(str(prefix), mmap=True)


@contextlib.contextmanager
def process_group():
    """A gloo world of one while megatron-core builds datasets outside a job (see the module docstring)."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


class _TokenizerView:
    """What GPTDatasetConfig reads of a tokenizer: vocab_size, eod, and unique_identifiers for its cache key."""

    def __init__(self, identity: dict):
        self.vocab_size = int(identity["vocab_size"])
        self.eod = identity.get("eod")
        self.unique_identifiers = OrderedDict(sorted(identity.items()))


def split_bounds(split: str, n_documents: int) -> list[tuple[int, int]]:
    """The [begin, end) document ranges megatron-core's builder gives train/valid/test for `split`."""
    cfg_mod = _quiet_import("megatron.core.datasets.blended_megatron_dataset_config")
    matrix = cfg_mod.convert_split_vector_to_split_matrix(cfg_mod.parse_and_normalize_split(split))
    return [(0, 0) if m is None else (round(m[0] * n_documents), round(m[1] * n_documents)) for m in matrix]


def check_split_not_empty(prefix: str, split: str) -> None:
    """Refuse a data.split that leaves a split of `prefix` without documents (GPTDataset would hang)."""
    n = len(open_indexed(prefix))
    for name, (begin, end) in zip(SPLITS, split_bounds(split, n)):
        if end <= begin:
            raise UserError(f"data.split = {split!r} leaves the {name} split of {prefix} ({n} documents) without a "
                            f"document; give {name} a larger weight in data.split or prepare more documents")


def build_gpt_datasets(*, blend: tuple[list[str], list[float] | None] | None = None,
                       per_split: list[str] | None = None, split: str, seq_len: int, seed: int,
                       sizes: list[int | None], cache_dir: str | Path, tokenizer: dict) -> list:
    """[train, valid, test] GPTDatasets (or BlendedDatasets) from megatron-core's builder.

    Either `blend` (prefixes and weights; every split drawn from each prefix by `split`) or `per_split`
    (one prefix per split, e.g. a 90/5/5 preparation). `sizes` are the samples wanted per split (None:
    one epoch). Collective when torch.distributed is initialized: every rank must call it.
    """
    gpt = _quiet_import("megatron.core.datasets.gpt_dataset")
    builder = _quiet_import("megatron.core.datasets.blended_megatron_dataset_builder")
    if blend is not None:
        for prefix in blend[0]:
            check_split_not_empty(prefix, split)
    options = ({"blend": blend, "split": split} if blend is not None
               else {"blend_per_split": [([prefix], None) for prefix in per_split]})
    config = gpt.GPTDatasetConfig(
        random_seed=int(seed), sequence_length=int(seq_len), path_to_cache=str(cache_dir),
        tokenizer=_TokenizerView(tokenizer), reset_position_ids=False, reset_attention_mask=False,
        eod_mask_loss=False, create_attention_mask=False, mmap_bin_files=True, **options)
    with process_group():
        build = builder.BlendedMegatronDatasetBuilder(gpt.GPTDataset, sizes, lambda: True, config).build
        build()  # rank 0 builds the cache and would keep what it built in memory; the other ranks map it
        return build()  # so every rank, rank 0 too, maps the cached indices
