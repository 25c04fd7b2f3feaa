"""Deterministic, resumable, data-parallel batches: the windows sampler (below) or megatron-core's GPTDataset.

data.sampler: windows (the benchmarks' default) reads a 90/5/5 preparation as follows.

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

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from competesmoe.common.errors import UserError
from competesmoe.data.megatron import open_indexed
from competesmoe.data.meta import DOCUMENTS, corpus_name, is_documents, load_meta, read_meta
from competesmoe.data.tokenizer import SPM_MODEL_FILE


class _Split:
    """One prepared split as a flat token array (a view of the mmapped .bin) plus its window geometry."""

    def __init__(self, prefix_dir: str | Path, split: str, seq_len: int):
        if seq_len < 1:
            raise UserError(f"model.seq_len ({seq_len}) must be at least 1")
        self.prefix_dir = Path(prefix_dir)
        self.split = split
        self.seq_len = int(seq_len)
        prefix = str(self.prefix_dir / split)
        self._ds = open_indexed(prefix)
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
        self.n_windows = _window_count(self.n_tokens, self.seq_len)
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


def _window_count(n_tokens: int, seq_len: int) -> int:
    """Non-overlapping windows of seq_len + 1 tokens (inputs and their next-token targets) in n_tokens."""
    return max(0, (n_tokens - 1) // seq_len)


def _check_windows(prefix_dir: Path, split: str, n_tokens: int, seq_len: int, micro_batch_size: int,
                   dp_size: int, sampled: bool) -> None:
    """A sampled split (train's) must fill one global micro-batch; one read in order (valid, test) one window per
    data-parallel rank."""
    windows = _window_count(n_tokens, seq_len)
    if sampled and windows < micro_batch_size * dp_size:
        short = (f"one global micro-batch (train.micro_batch_size {micro_batch_size} x {dp_size} data-parallel "
                 f"ranks)")
        fix = "lower train.micro_batch_size or model.seq_len"
    elif windows < dp_size:
        short, fix = f"the {dp_size} data-parallel rank(s) that evaluate it", "lower model.seq_len"
    else:
        return
    raise UserError(f"the {split} split of corpus {corpus_name(prefix_dir)} has {n_tokens} tokens = {windows} windows of "
                    f"model.seq_len+1 = {seq_len + 1} tokens, fewer than {short}; {fix}, or use a larger corpus "
                    f"(data.path)")


def check_splits(data_dir: str | Path, seq_len: int, micro_batch_size: int, dp_size: int) -> None:
    """Before a run builds anything: every split of a data.path preparation (from meta.json's token counts) holds
    what the windows sampler will draw, so that no run trains to its end and only then finds its valid or test
    split shorter than one window."""
    for split, info in load_meta(data_dir)["splits"].items():
        _check_windows(Path(data_dir), split, int(info["tokens"]), seq_len, micro_batch_size, dp_size,
                       sampled=split == "train")


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
        _check_windows(self._split.prefix_dir, split, self._split.n_tokens, seq_len, micro_batch_size, dp_size,
                       sampled=True)
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
    try:
        _check_windows(data.prefix_dir, split, data.n_tokens, seq_len, micro_batch_size, dp_size, sampled=False)
    except UserError:
        data.close()
        raise
    return _in_order(data.gather, data.n_windows, micro_batch_size, dp_rank, dp_size, max_batches, data.close)


def _in_order(gather, n: int, micro_batch_size: int, dp_rank: int, dp_size: int, max_batches: int, close=None):
    """eval_batches' order over any indexed source of n samples (see eval_batches)."""
    b, g = int(micro_batch_size), int(micro_batch_size) * int(dp_size)
    full = min(int(max_batches), n // g)
    sizes = [b] * full
    if full < max_batches:
        tail = (n - full * g) // dp_size
        if tail > 0:
            sizes.append(tail)

    def generate():
        try:
            start = 0
            for size in sizes:
                lo = start + dp_rank * size
                yield gather(np.arange(lo, lo + size))
                start += size * dp_size
        finally:
            if close is not None:
                close()

    return generate()


# ---------------------------------------------------------------------------------------------
# sampler: gpt -- megatron-core's GPTDataset / BlendedDataset (competesmoe.data.megatron).


def resolve_blend(blend: list[list], prepared_dir: str | Path) -> tuple[list[str], list[float]]:
    """data.blend's dataset prefixes and weights; each member must exist and use data.prepared_dir's tokenizer.

    A member is a directory written by `competesmoe prepare` from data.inputs (its text_document) or a
    megatron-core dataset prefix (PATH.bin and PATH.idx). Refusals name data.blend[i].
    """
    from competesmoe.data.prepare import complete

    run_tokenizer = load_meta(prepared_dir)["tokenizer"]
    prefixes, weights = [], []
    for i, (weight, path) in enumerate(blend):
        where = f"data.blend[{i}] = {path!r}"
        prefix, meta = blend_member(i, path)
        if meta is not None:
            if not is_documents(meta):
                raise UserError(f"{where} is a 90/5/5 preparation of data.path; blend directories prepared from "
                                f"data.inputs")
            if meta["tokenizer"] != run_tokenizer:
                raise UserError(f"{where} was tokenized with {meta['tokenizer']}, but data.prepared_dir "
                                f"{prepared_dir} with {run_tokenizer}; prepare every member with one vocabulary "
                                f"(data.tokenizer_model: {Path(prepared_dir) / SPM_MODEL_FILE})")
            if not complete(prefix.parent, meta):
                raise UserError(f"{where} is incomplete (a file is missing or truncated); run `competesmoe "
                                f"prepare` for it again")
        prefixes.append(str(prefix.resolve()))
        weights.append(float(weight))
    return prefixes, weights


def blend_member(i: int, path: str) -> tuple[Path, dict | None]:
    """data.blend[i]'s dataset prefix and, for a directory written by `competesmoe prepare`, its meta.json."""
    p = Path(path).expanduser()
    meta = read_meta(p) if p.is_dir() else None
    if meta is not None:
        return p / DOCUMENTS, meta
    if Path(f"{p}.bin").is_file() and Path(f"{p}.idx").is_file():
        return p, None
    raise UserError(f"data.blend[{i}] = {path!r} does not exist: name a directory written by `competesmoe prepare` "
                    f"or a megatron-core dataset prefix ({p}.bin and {p}.idx)")


class _GPTSource:
    """A megatron-core GPTDataset or BlendedDataset read as (inputs, targets) batches."""

    def __init__(self, dataset):
        self.dataset = dataset
        self.n = len(dataset) if dataset is not None else 0

    def gather(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self.dataset[int(i)] for i in indices]
        return torch.stack([r["tokens"] for r in rows]), torch.stack([r["labels"] for r in rows])


class GPTSampler:
    """Training micro-batches from megatron-core's GPTDataset (or a blend of them) for one data-parallel rank.

    megatron-core already orders the samples by train.seed (documents shuffled per epoch, samples
    shuffled); this consumes that order B * dp_size samples at a time, rank r taking [r*B, (r+1)*B). The
    state is the global position, so a resume continues at the exact sample, with any dp_size that keeps
    B * dp_size. The order depends on the run's sample count (megatron-core sizes its epochs and blend by
    it), which the state records: a resume must keep train.max_steps and the batch size.
    """

    def __init__(self, dataset, micro_batch_size: int, dp_rank: int, dp_size: int, num_samples: int):
        _check_rank(micro_batch_size, dp_rank, dp_size)
        self._source = _GPTSource(dataset)
        self.micro_batch_size, self.dp_rank = int(micro_batch_size), int(dp_rank)
        self.global_batch = self.micro_batch_size * int(dp_size)
        self.num_samples = int(num_samples)
        self.position = 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), int64, (micro_batch_size, seq_len): this rank's slice of the next global micro-batch."""
        lo = self.position + self.dp_rank * self.micro_batch_size
        self.position += self.global_batch
        return self._source.gather(np.arange(lo, lo + self.micro_batch_size))

    def state_dict(self) -> dict:
        return {"sample": int(self.position), "num_samples": self.num_samples}

    def load_state_dict(self, d: dict) -> None:
        try:
            sample, num_samples = int(d["sample"]), int(d["num_samples"])
        except (KeyError, TypeError, ValueError):
            raise UserError(f"data sampler state {d!r} is not the gpt sampler's (integer 'sample' and 'num_samples'): "
                            f"the checkpoint was made with data.sampler: windows; resume with it") from None
        if num_samples != self.num_samples:
            raise UserError(f"the checkpoint's run drew {num_samples} samples in all, this one {self.num_samples}: "
                            f"megatron-core's GPTDataset orders samples by the run's total, so resume with the "
                            f"same train.max_steps, train.grad_accum and global batch")
        if not 0 <= sample <= self.num_samples - self.global_batch:
            raise UserError(f"data sampler state (sample {sample}) does not fit this run's {self.num_samples} samples; "
                            f"resume with the same data settings")
        self.position = sample

    def close(self) -> None:
        self._source = None


class TrainData:
    """A run's training sampler and evaluation batches, from data.sampler's source (see open_train_data)."""

    def __init__(self, sampler, eval_batches):
        self.sampler = sampler
        self._eval_batches = eval_batches

    def eval_batches(self, split: str, max_batches: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The split's first max_batches global micro-batches, in order, this rank's slice of each."""
        return self._eval_batches(split, max_batches)


def open_train_data(data_cfg, data_dir: str | Path, *, cache_dir: str | Path, seq_len: int, micro_batch_size: int,
                    dp_rank: int, dp_size: int, seed: int, train_samples: int, eval_samples: int) -> TrainData:
    """The training data of a run. windows: TrainSampler and eval_batches over the 90/5/5 splits. gpt:
    megatron-core's datasets over data.blend, a data.inputs preparation (split by data.split) or the 90/5/5
    splits, built once per run into cache_dir (collective: every rank calls this)."""
    if data_cfg.sampler == "windows":
        sampler = TrainSampler(data_dir, "train", seq_len, micro_batch_size, dp_rank, dp_size, seed)
        return TrainData(sampler, lambda split, k: eval_batches(data_dir, split, seq_len, micro_batch_size, dp_rank,
                                                                dp_size, k))
    from competesmoe.data.megatron import SPLITS, build_gpt_datasets

    _check_rank(micro_batch_size, dp_rank, dp_size)
    meta = load_meta(data_dir)
    sizes = [train_samples, None, None]
    if data_cfg.blend is not None:
        members = {"blend": resolve_blend(data_cfg.blend, data_dir)}
        sizes = [train_samples, eval_samples, eval_samples]  # weighted blends need a size per split
    elif is_documents(meta):
        members = {"blend": ([str(Path(data_dir).resolve() / DOCUMENTS)], None)}
    else:
        members = {"per_split": [str(Path(data_dir).resolve() / split) for split in SPLITS]}
    datasets = build_gpt_datasets(**members, split=data_cfg.split, seq_len=seq_len, seed=seed, sizes=sizes,
                                  cache_dir=cache_dir, tokenizer=meta["tokenizer"])
    sources = dict(zip(SPLITS, (_GPTSource(d) for d in datasets)))
    for split in ("valid", "test"):  # now, not at the end of training
        if sources[split].n < dp_size:
            raise UserError(f"the {split} split of {data_dir} has {sources[split].n} samples of model.seq_len+1 = "
                            f"{seq_len + 1} tokens, fewer than the {dp_size} data-parallel ranks; lower "
                            f"model.seq_len, or give {split} a larger weight in data.split")

    def gpt_eval_batches(split: str, max_batches: int):
        source = sources[split]
        return _in_order(source.gather, source.n, micro_batch_size, dp_rank, dp_size, max_batches)

    return TrainData(GPTSampler(datasets[0], micro_batch_size, dp_rank, dp_size, train_samples), gpt_eval_batches)
