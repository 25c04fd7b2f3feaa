"""`competesmoe eval`: a trained checkpoint on any raw text.

    competesmoe eval RUN_DIR --text FILE [--split all|train|valid|test] [--top-k K] [--batch-size N]

RUN_DIR is a run's output_dir (its newest checkpoint that verifies), its checkpoints/ folder, one
checkpoint folder (checkpoints/step00000300) or an exported .safetensors model. The text is read like
`prepare` reads a corpus (.txt, .xml, or .bz2/.gz of one) and tokenized with the run's own tokenizer;
`--split` takes the same 90/5/5 byte ranges as `prepare` (default: the whole file). Every token but the
first is predicted once, in non-overlapping windows of model.seq_len (the training windows; the last one
may be shorter). Byte-level runs report bits per character (BPC = bits per byte); SentencePiece runs
report perplexity per token and bits per byte of the text.

The model is rebuilt in this process on the CPU (no DeepSpeed engine, any EP size of the saved run) by
launcher.checkpoint, which verifies the checkpoint first and takes its config from run_state.json.
Evaluation never competes; routing policies get the step the checkpoint was taken at (StableMoE's stage)
and `--top-k` overrides K.

Shape legend: B batch, S sequence, V vocabulary.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from competesmoe.common.errors import UserError
from competesmoe.common.options import integer
from competesmoe.launcher.config import Config
from competesmoe.moe.model import TransformerLM
from competesmoe.moe.routing import RoutingContext

SPLITS = ("all", "train", "valid", "test")


@dataclass
class LoadedRun:
    model: TransformerLM
    cfg: Config
    step: int
    """Optimizer steps the checkpoint was taken after."""
    run_dir: Path
    tag_dir: Path
    """The checkpoint folder, or the exported .safetensors file."""
    data_dir: Path
    """The run's prepared data (its tokenizer and splits)."""

    def context(self, top_k: int | None = None) -> RoutingContext:
        return RoutingContext(step=self.step, total_steps=self.cfg.train.max_steps, top_k=top_k)


def load_run(path: str | Path) -> LoadedRun:
    """Rebuild the model of a checkpoint (a run's output_dir, its checkpoints/ folder, one checkpoint folder or
    an exported .safetensors file) in this process (CPU, eval mode), verified first."""
    from competesmoe.launcher.checkpoint import load_model, prepared_data

    saved, model = load_model(path)
    return LoadedRun(model=model, cfg=saved.cfg, step=saved.step, run_dir=saved.run_dir, tag_dir=saved.path,
                     data_dir=prepared_data(saved))


# ---------------------------------------------------------------------------------------------
# Scoring a token stream.


def windows(tokens: np.ndarray, seq_len: int, batch_size: int):
    """(inputs_BS, targets_BS) over non-overlapping windows: starts at multiples of seq_len, the
    training convention; the last, shorter window covers the tail so every token but the first is a target."""
    n = len(tokens)
    starts = list(range(0, max(n - 1, 0), seq_len))
    full = [s for s in starts if s + seq_len + 1 <= n]
    for i in range(0, len(full), batch_size):
        rows = np.stack([tokens[s:s + seq_len + 1] for s in full[i:i + batch_size]]).astype(np.int64)
        x = torch.from_numpy(rows)
        yield x[:, :-1], x[:, 1:]
    tail = [s for s in starts if s + seq_len + 1 > n]
    for s in tail:
        x = torch.from_numpy(tokens[s:].astype(np.int64)).unsqueeze(0)
        yield x[:, :-1], x[:, 1:]


@torch.no_grad()
def score(model: TransformerLM, batches, ctx: RoutingContext) -> tuple[float, int]:
    """Summed next-token loss (nats) and the number of predicted tokens."""
    model.eval()
    nats, count = 0.0, 0
    for inputs_BS, targets_BS in batches:
        out = model(inputs_BS, routing=ctx)
        nats += F.cross_entropy(out.logits_BSV.float().flatten(0, 1), targets_BS.flatten(), reduction="sum").item()
        count += targets_BS.numel()
    return nats, count


def read_text(path: str | Path, split: str) -> bytes:
    """The raw bytes of a text file (or one of prepare's 90/5/5 splits of it)."""
    from competesmoe.data.prepare import read_corpus, resolve_corpus, split_bounds

    if split not in SPLITS:
        raise UserError(f"--split {split!r} is not one of {', '.join(SPLITS)}")
    try:
        source = resolve_corpus(str(path))
    except UserError as err:
        raise UserError(str(err).replace("data.path: corpus", "--text").replace("set data.path to", "pass")) from None
    raw = read_corpus(source)
    if split != "all":
        a, b = split_bounds(len(raw))[split]
        raw = raw[a:b]
    return raw


def evaluate_text(run: LoadedRun, text: str | Path, split: str = "all", top_k: int | None = None,
                  batch_size: int = 8) -> dict:
    from competesmoe.data.tokenizer import load_tokenizer, quality

    raw = read_text(text, split)
    tokenizer = load_tokenizer(run.data_dir)
    tokens = np.asarray(tokenizer.encode(raw))
    if len(tokens) < 2:
        raise UserError(f"--text {text} ({split}) holds {len(tokens)} token(s); at least 2 are needed to score anything")
    if top_k is not None and not 1 <= top_k <= run.cfg.moe.num_experts:
        raise UserError(f"--top-k ({top_k}) must be within [1, moe.num_experts ({run.cfg.moe.num_experts})]")
    nats, count = score(run.model, windows(tokens, run.cfg.model.seq_len, batch_size), run.context(top_k))
    loss = nats / count
    result = {"text": str(text), "split": split, "bytes": len(raw), "tokens": int(len(tokens)),
              "predicted": count, "loss": loss, "checkpoint": str(run.tag_dir), "step": run.step,
              "top_k": top_k or run.cfg.moe.top_k}
    result.update(quality(loss, tokenizer.kind))
    if tokenizer.kind != "byte":
        result["bits_per_byte"] = nats / math.log(2) / max(len(raw), 1)
    return result


def format_result(r: dict) -> str:
    figure = f"bpc {r['bpc']:.4f}" if "bpc" in r else f"ppl {r['ppl']:.3f} (bits per byte {r['bits_per_byte']:.4f})"
    return (f"{r['text']} [{r['split']}]: {r['bytes']:,} bytes, {r['tokens']:,} tokens, {r['predicted']:,} predicted; "
            f"checkpoint step {r['step']}, K {r['top_k']}: loss {r['loss']:.4f} nats/token, {figure}")


# ---------------------------------------------------------------------------------------------


def main(args) -> int:
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "2"))))
    run = load_run(args.checkpoint)
    result = evaluate_text(run, args.text, args.split, args.top_k, args.batch_size)
    print(json.dumps(result) if args.json else format_result(result))
    return 0


def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", help="a run's output_dir, its checkpoints/ folder, one checkpoint folder, or "
                                           "an exported .safetensors model")
    parser.add_argument("--text", required=True, help="raw text file (.txt/.xml, or .bz2/.gz of one)")
    parser.add_argument("--split", default="all", choices=SPLITS,
                        help="score the whole file (default) or one of prepare's 90/5/5 byte splits of it")
    parser.add_argument("--top-k", type=integer(1), default=None,
                        help="experts per token at evaluation (default moe.top_k; at most moe.num_experts)")
    parser.add_argument("--batch-size", type=integer(1), default=8, help="windows per forward")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
