"""`competesmoe finetune`: a classification head on a pretrained checkpoint (the papers' second experiment).

    competesmoe finetune RUN_DIR --train train.tsv --valid dev.tsv [--test test.tsv] [--epochs 3]
                         [--lr 1e-4] [--batch-size 16] [--pool mean|last] [--freeze-body] [--out DIR]

Data: the SST-2 (GLUE) format, one example per line, tab separated:

    sentence<TAB>label
    a gripping , funny film .<TAB>1
    the plot is a mess .<TAB>0

The first line may be that header. Labels are integers 0..C-1 (C = the largest label + 1 over the train
file, or --num-classes); SST-2 has C = 2, SST-5 C = 5. No labelled corpus ships with the project (none
is available from an installable package here): bring SST-2's train.tsv / dev.tsv, or any file in this
format. The tests use a small synthetic set that says so.

Model: the checkpoint's TransformerLM (rebuilt on the CPU, as `competesmoe eval` does) reads the sentence
(tokenized with the run's own tokenizer, truncated to model.seq_len); its final normalised hidden states
are pooled, mean over the sentence (default) or the last token, and a linear head gives C logits. The
model is causal, so padding at the end of shorter sentences changes nothing before it. Loss = cross-entropy
+ the MoE layers' auxiliary losses. The routing policy is the run's: CompeteSMoE keeps its competition
schedule (drawn for the fine-tuning steps), StableMoE and SMoE-Dropout stay where pre-training left them
(the routing context carries the checkpoint's step). One process, plain AdamW (no DeepSpeed): fine-tuning
sets are small. `--out` (default <run>/finetune) receives metrics.jsonl (one record per epoch and the test)
and classifier.pt; it must be a new or empty folder, or one finetune wrote before.

Shape legend: B batch, S sequence, D d_model, C classes.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from competesmoe.common.errors import UserError
from competesmoe.common.files import claim_folder
from competesmoe.common.options import integer, number
from competesmoe.launcher.config import SEED_LIMIT
from competesmoe.moe.model import TransformerLM
from competesmoe.moe.routing import RoutingContext
from competesmoe.moe.schedule import CompetitionSchedule


@dataclass
class Example:
    text: str
    label: int


def read_tsv(path: str | Path) -> list[Example]:
    """SST-2 format: 'sentence<TAB>label' per line, an optional header; errors name the line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"labelled file {path} does not exist; pass a TSV of 'sentence<TAB>label' lines (SST-2 format)")
    examples = []
    with open(path, encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            line = line.rstrip("\n").rstrip("\r")
            if not line.strip():
                continue
            if "\t" not in line:
                raise UserError(f"{path}:{number}: no TAB; each line must be 'sentence<TAB>label' (SST-2 format)")
            text, label = line.rsplit("\t", 1)
            if number == 1 and label.strip().lower() == "label":
                continue  # the header
            try:
                value = int(label.strip())
            except ValueError:
                raise UserError(f"{path}:{number}: label {label!r} is not an integer class id (0, 1, ...)") from None
            if value < 0:
                raise UserError(f"{path}:{number}: label {value} is negative; class ids start at 0")
            examples.append(Example(text, value))
    if not examples:
        raise UserError(f"labelled file {path} holds no examples")
    return examples


class SequenceClassifier(nn.Module):
    """A pretrained TransformerLM body, a pooling of its final hidden states, and a linear head."""

    def __init__(self, lm: TransformerLM, num_classes: int, pool: str = "mean"):
        super().__init__()
        if pool not in ("mean", "last"):
            raise ValueError(f"pool {pool!r} must be 'mean' or 'last'")
        self.lm = lm
        self.pool = pool
        self.head = nn.Linear(lm.cfg.d_model, num_classes)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, tokens_BS: torch.Tensor, lengths_B: torch.Tensor, compete_layers=frozenset(),
                routing: RoutingContext | None = None):
        h_BSD, moe_aux = self.lm.hidden(tokens_BS, compete_layers, routing)
        positions_S = torch.arange(tokens_BS.shape[1], device=tokens_BS.device)
        if self.pool == "mean":
            mask_BS = (positions_S.unsqueeze(0) < lengths_B.unsqueeze(1)).to(h_BSD.dtype)
            pooled_BD = (h_BSD * mask_BS.unsqueeze(-1)).sum(1) / lengths_B.clamp_min(1).unsqueeze(1).to(h_BSD.dtype)
        else:
            pooled_BD = h_BSD[torch.arange(tokens_BS.shape[0]), (lengths_B - 1).clamp_min(0)]
        aux = sum((a.loss for a in moe_aux), h_BSD.new_zeros((), dtype=torch.float32))
        return self.head(pooled_BD), aux


def encode(examples: list[Example], tokenizer, max_len: int) -> list[tuple[np.ndarray, int]]:
    out = []
    for ex in examples:
        ids = np.asarray(tokenizer.encode(ex.text.encode("utf-8")), dtype=np.int64)[:max_len]
        if ids.size == 0:
            ids = np.asarray(tokenizer.encode(b" "), dtype=np.int64)[:1]
        out.append((ids, ex.label))
    return out


def batches(encoded, batch_size: int, shuffle: bool, rng: random.Random | None = None):
    order = list(range(len(encoded)))
    if shuffle:
        rng.shuffle(order)
    for i in range(0, len(order), batch_size):
        rows = [encoded[j] for j in order[i:i + batch_size]]
        width = max(len(ids) for ids, _ in rows)
        tokens = torch.zeros(len(rows), width, dtype=torch.long)
        for r, (ids, _) in enumerate(rows):
            tokens[r, :len(ids)] = torch.from_numpy(ids)
        yield tokens, torch.tensor([len(ids) for ids, _ in rows]), torch.tensor([label for _, label in rows])


@torch.no_grad()
def accuracy(model: SequenceClassifier, encoded, batch_size: int, ctx: RoutingContext) -> dict:
    model.eval()
    correct, loss, n = 0, 0.0, 0
    for tokens, lengths, labels in batches(encoded, batch_size, shuffle=False):
        logits, _ = model(tokens, lengths, routing=ctx)
        loss += F.cross_entropy(logits.float(), labels, reduction="sum").item()
        correct += (logits.argmax(-1) == labels).sum().item()
        n += len(labels)
    return {"accuracy": correct / max(n, 1), "loss": loss / max(n, 1), "examples": n}


def finetune(checkpoint: str | Path, train_file: str | Path, valid_file: str | Path, test_file: str | Path | None = None,
             epochs: int = 3, lr: float = 1e-4, batch_size: int = 16, pool: str = "mean", freeze_body: bool = False,
             num_classes: int | None = None, seed: int = 0, out_dir: str | Path | None = None,
             weight_decay: float = 0.01, progress: bool = True) -> dict:
    from competesmoe.data.tokenizer import load_tokenizer
    from competesmoe.launcher.evaluate import load_run

    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise UserError(f"--epochs ({epochs}) and --batch-size ({batch_size}) must be at least 1 and --lr ({lr}) positive")
    out = claim_out(out_dir) if out_dir is not None else None  # before any work
    run = load_run(checkpoint)
    tokenizer = load_tokenizer(run.data_dir)
    train, valid, test, classes = _labelled_sets(train_file, valid_file, test_file, num_classes)
    max_len = run.cfg.model.seq_len
    enc_train, enc_valid = encode(train, tokenizer, max_len), encode(valid, tokenizer, max_len)
    enc_test = encode(test, tokenizer, max_len) if test else None

    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = SequenceClassifier(run.model, classes, pool)
    if freeze_body:
        for p in model.lm.parameters():
            p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    total = epochs * math.ceil(len(enc_train) / batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / max(1, total // 10)) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    schedule = CompetitionSchedule(run.cfg.moe.competition, seed, total, len(run.model.moe_layers),
                                   enabled=run.cfg.moe.router == "competesmoe" and not freeze_body)
    ctx = run.context()  # the pre-training step: StableMoE stays in its stage, SMoE-Dropout at its K
    out = out or claim_out(run.run_dir / "finetune")
    records = []
    step = 0
    start = time.perf_counter()
    with open(out / "metrics.jsonl", "w") as log:
        for epoch in range(1, epochs + 1):
            model.train()
            losses = []
            for tokens, lengths, labels in batches(enc_train, batch_size, shuffle=True, rng=rng):
                logits, aux = model(tokens, lengths, schedule.layers_at(step), ctx)
                loss = F.cross_entropy(logits.float(), labels)
                (loss + aux).backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())
                step += 1
            record = {"epoch": epoch, "step": step, "split": "valid", "train_loss": float(np.mean(losses)),
                      **accuracy(model, enc_valid, batch_size, ctx), "seconds": time.perf_counter() - start}
            records.append(record)
            log.write(json.dumps(record) + "\n")
            if progress:
                print(f"epoch {epoch}: train loss {record['train_loss']:.4f}, valid accuracy {record['accuracy']:.4f} "
                      f"({record['examples']} examples)", flush=True)
        result = {"checkpoint": str(run.tag_dir), "classes": classes, "train_examples": len(train),
                  "valid": records[-1], "history": records}
        if enc_test is not None:
            result["test"] = {"split": "test", **accuracy(model, enc_test, batch_size, ctx)}
            log.write(json.dumps(result["test"]) + "\n")
            if progress:
                print(f"test accuracy {result['test']['accuracy']:.4f} ({result['test']['examples']} examples)", flush=True)
    torch.save({"state_dict": model.state_dict(), "classes": classes, "pool": pool,
                "checkpoint": str(run.tag_dir)}, out / "classifier.pt")
    result["out_dir"] = str(out)
    return result


OUT_MARKER = ".competesmoe-finetune"
OUT_FILES = ("metrics.jsonl", "classifier.pt")
"""What finetune writes into its --out folder (replaced by the next finetune there)."""


def claim_out(folder: str | Path) -> Path:
    """The --out folder, made ours; refused when it holds files finetune did not write (they are never replaced)."""
    return claim_folder(folder, OUT_MARKER, "--out",
                        made_by_us=lambda f: all(p.name in OUT_FILES for p in f.iterdir()))  # before the marker


def _labelled_sets(train_file, valid_file, test_file, num_classes: int | None):
    """The train, valid and (optional) test examples and the number of classes; a label outside the
    train file's classes is a one-line error."""
    train, valid = read_tsv(train_file), read_tsv(valid_file)
    test = read_tsv(test_file) if test_file else None
    classes = num_classes or max(ex.label for ex in train) + 1
    if classes < 2:
        raise UserError(f"{train_file} has a single class (label 0 only); a classifier needs at least 2 (--num-classes)")
    for name, data in (("valid", valid), ("test", test or [])):
        bad = [ex.label for ex in data if ex.label >= classes]
        if bad:
            raise UserError(f"the {name} file has label {bad[0]} but the train file defines {classes} classes; "
                            f"pass --num-classes")
    return train, valid, test, classes


def add_command(subparsers) -> None:
    """Entry point `competesmoe.commands: finetune`: add `competesmoe finetune` to the command's sub-parsers."""
    parser = subparsers.add_parser("finetune", help="a classification head on a checkpoint, trained on SST-2-format TSV",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.set_defaults(run_command=main)


def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", help="a run's output_dir, its checkpoints/ folder, or one checkpoint folder")
    parser.add_argument("--train", required=True, help="TSV 'sentence<TAB>label' (SST-2 format)")
    parser.add_argument("--valid", required=True, help="TSV evaluated after every epoch")
    parser.add_argument("--test", default=None, help="TSV evaluated once at the end")
    parser.add_argument("--epochs", type=integer(1), default=3)
    parser.add_argument("--lr", type=number(0, low_open=True), default=1e-4)
    parser.add_argument("--batch-size", type=integer(1), default=16)
    parser.add_argument("--pool", choices=["mean", "last"], default="mean", help="pooling of the final hidden states")
    parser.add_argument("--freeze-body", action="store_true", help="train only the head (a linear probe)")
    parser.add_argument("--num-classes", type=integer(2), default=None, help="default: largest train label + 1")
    parser.add_argument("--seed", type=integer(0, SEED_LIMIT - 1), default=0)
    parser.add_argument("--out", default=None, help="default <run>/finetune")


def main(args) -> int:
    result = finetune(args.checkpoint, args.train, args.valid, args.test, epochs=args.epochs, lr=args.lr,
                      batch_size=args.batch_size, pool=args.pool, freeze_body=args.freeze_body,
                      num_classes=args.num_classes, seed=args.seed, out_dir=args.out)
    print(f"wrote {result['out_dir']}/metrics.jsonl and classifier.pt")
    return 0
