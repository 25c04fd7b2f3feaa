"""Deterministic, resumable batches from a prepared split (megatron-core IndexedDataset, mmap).

A split is one flat token stream. Window i is tokens[i*S : i*S + S + 1] (S = seq_len): windows start at
multiples of S, do not overlap in their inputs, and a last partial window is dropped. Inputs are the
first S tokens of a window and targets the last S, so targets are inputs shifted by one.

Training order: epoch e visits the windows in the permutation `np.random.default_rng([seed, e])`; the
epochs' permutations are concatenated into one global stream and every call of `next_batch` consumes the
next GLOBAL micro-batch of B * dp_size windows from it, rank r taking [r*B, (r+1)*B). Which windows a rank
sees therefore depends only on (seed, global position, B * dp_size, rank); the state is global, so a run
can resume with a different dp_size as long as B * dp_size stays the same.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from competesmoe.common.errors import UserError
from competesmoe.data.meta import corpus_name


def indexed_dataset_module():
    """megatron.core.datasets.indexed_dataset, imported on first use (importing megatron.core takes seconds)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Transformer Engine.*")
        warnings.filterwarnings("ignore", message=".*Apex.*")
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


class _Split:
    """One prepared split as a flat token array (a view of the mmapped .bin) plus its window geometry."""

    def __init__(self, prefix_dir: str | Path, split: str, seq_len: int):
        if seq_len < 1:
            raise UserError(f"model.seq_len ({seq_len}) must be at least 1")
        self.prefix_dir = Path(prefix_dir)
        self.split = split
        self.seq_len = int(seq_len)
        prefix = str(self.prefix_dir / split)
        mod = indexed_dataset_module()
        if not mod.IndexedDataset.exists(prefix):
            raise UserError(f"prepared split {prefix}.bin/.idx does not exist; run the prepare step into "
                            f"{self.prefix_dir} (data.prepared_dir) first")
        self._ds = mod.IndexedDataset(prefix, mmap=True)
        lengths = self._ds.sequence_lengths.astype(np.int64)
        pointers = self._ds.index.sequence_pointers
        itemsize = np.dtype(self._ds.index.dtype).itemsize
        self.n_tokens = int(lengths.sum())
        expected = np.concatenate([[0], np.cumsum(lengths)[:-1]]) * itemsize if lengths.size else lengths
        if lengths.size and not np.array_equal(pointers, expected):
            raise UserError(f"{prefix}.idx does not describe one contiguous token stream; delete "
                            f"{self.prefix_dir} and prepare again")
        # One flat view of every token (the split's documents are contiguous in the .bin file). It points
        # into the dataset's mmap, which the dataset's destructor closes: never let it outlive self._ds.
        self._tokens = self._ds.bin_reader.read(dtype=self._ds.index.dtype, count=self.n_tokens, offset=0)
        self.n_windows = max(0, (self.n_tokens - 1) // self.seq_len)
        self._offsets = np.arange(self.seq_len + 1, dtype=np.int64)

    def gather(self, windows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        starts = np.asarray(windows, dtype=np.int64) * self.seq_len
        x = torch.from_numpy(self._tokens[starts[:, None] + self._offsets].astype(np.int64))
        return x[:, :-1].contiguous(), x[:, 1:].contiguous()

    def close(self) -> None:
        # Drop our view before the dataset, whose destructor closes the mmap.
        self._tokens = None
        self._ds = None

    def __del__(self) -> None:
        self.close()

    def copy_tokens(self) -> np.ndarray:
        return np.array(self._tokens)


def _check_rank(micro_batch_size: int, dp_rank: int, dp_size: int) -> None:
    if micro_batch_size < 1:
        raise UserError(f"train.micro_batch_size ({micro_batch_size}) must be at least 1")
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank {dp_rank} is not within a data-parallel group of size {dp_size}")


def split_tokens(prefix_dir: str | Path, split: str) -> np.ndarray:
    """A copy of a prepared split's whole token stream (uint16)."""
    data = _Split(prefix_dir, split, 1)
    try:
        return data.copy_tokens()
    finally:
        data.close()


class TrainSampler:
    """Shuffled training micro-batches for one data-parallel rank; see the module docstring for the order."""

    def __init__(self, prefix_dir: str | Path, split: str, seq_len: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int, seed: int):
        _check_rank(micro_batch_size, dp_rank, dp_size)
        self._split = _Split(prefix_dir, split, seq_len)
        self.micro_batch_size = int(micro_batch_size)
        self.dp_rank = int(dp_rank)
        self.dp_size = int(dp_size)
        self.seed = int(seed)
        self.global_batch = self.micro_batch_size * self.dp_size
        self.num_windows = self._split.n_windows
        if self.num_windows < self.global_batch:
            raise UserError(
                f"the {split} split of corpus {corpus_name(self._split.prefix_dir)} has {self._split.n_tokens} tokens = "
                f"{self.num_windows} windows of model.seq_len+1 = {seq_len + 1}, fewer than one global micro-batch "
                f"(train.micro_batch_size {micro_batch_size} x {dp_size} data-parallel ranks); lower "
                f"train.micro_batch_size or model.seq_len, or use a larger corpus (data.path)")
        self.epoch = 0
        self.position = 0  # windows of the current epoch's permutation already consumed (globally)
        self._perm_epoch = -1
        self._perm = None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
            self._perm_epoch = epoch
        return self._perm

    def _take_global(self) -> np.ndarray:
        """The next global micro-batch's window indices; advances the state."""
        parts, need = [], self.global_batch
        while need > 0:
            perm = self._permutation(self.epoch)
            take = min(need, self.num_windows - self.position)
            parts.append(perm[self.position:self.position + take])
            self.position += take
            need -= take
            if self.position == self.num_windows:
                self.epoch += 1
                self.position = 0
        return np.concatenate(parts)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), int64, shape (micro_batch_size, seq_len): this rank's slice of the next global micro-batch."""
        windows = self._take_global()
        b = self.micro_batch_size
        return self._split.gather(windows[self.dp_rank * b:(self.dp_rank + 1) * b])

    def state_dict(self) -> dict:
        return {"epoch": int(self.epoch), "position": int(self.position)}

    def load_state_dict(self, d: dict) -> None:
        try:
            epoch, position = int(d["epoch"]), int(d["position"])
        except (KeyError, TypeError, ValueError):
            raise UserError(f"data sampler state {d!r} lacks integer 'epoch' and 'position'; the checkpoint is "
                            f"not from this trainer") from None
        if epoch < 0 or not 0 <= position < self.num_windows:
            raise UserError(f"data sampler state (epoch {epoch}, position {position}) does not fit the {self._split.split} "
                            f"split's {self.num_windows} windows: the checkpoint was made with other data or "
                            f"model.seq_len; resume with the same data settings")
        self.epoch, self.position = epoch, position

    def close(self) -> None:
        self._split.close()


def eval_batches(prefix_dir: str | Path, split: str, seq_len: int, micro_batch_size: int, dp_rank: int,
                 dp_size: int, max_batches: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The first max_batches global micro-batches of windows, in order (no shuffle); rank r takes its slice.

    Every rank yields the same number of batches of the same shapes (computed from the global count). When
    the split holds fewer than max_batches full global micro-batches, a final smaller batch takes the
    remaining windows that divide evenly over the ranks (fewer than dp_size windows are dropped).
    """
    _check_rank(micro_batch_size, dp_rank, dp_size)
    data = _Split(prefix_dir, split, seq_len)
    b, g = int(micro_batch_size), int(micro_batch_size) * int(dp_size)
    if data.n_windows < dp_size:
        raise UserError(f"the {split} split of corpus {corpus_name(data.prefix_dir)} has {data.n_windows} windows of "
                        f"model.seq_len+1 = {seq_len + 1} tokens, fewer than the {dp_size} data-parallel ranks; "
                        f"lower model.seq_len or use a larger corpus (data.path)")
    full = min(int(max_batches), data.n_windows // g)
    sizes = [b] * full
    if full < max_batches:
        tail = (data.n_windows - full * g) // dp_size
        if tail > 0:
            sizes.append(tail)

    def generate():
        try:
            start = 0
            for size in sizes:
                lo = start + dp_rank * size
                yield data.gather(np.arange(lo, lo + size))
                start += size * dp_size
        finally:
            data.close()

    return generate()
