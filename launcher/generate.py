"""`competesmoe generate`: a trained model continues a prompt.

    competesmoe generate RUN_OR_CHECKPOINT --prompt TEXT [--max-new-tokens N] [--temperature T] [--top-k K]
                         [--seed S] [--device DEVICE]

RUN_OR_CHECKPOINT is a run's output_dir (its newest checkpoint that verifies), its checkpoints/ folder, one
checkpoint folder or an exported .safetensors model. The prompt is encoded with the run's own tokenizer (a
byte-level run takes any bytes; a SentencePiece run takes UTF-8 text) and printed, followed by the continuation:
tokens drawn one at a time (moe/generate.py: the router's top-K routing, a KV cache, the model's training context
as a sliding window) until --max-new-tokens or the end of a document. The same seed, model and prompt print the
same text.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

from competesmoe.common.errors import UserError
from competesmoe.common.options import integer, number

TORCH_SEED_MAX = 2**64 - 1
"""The largest seed torch.Generator.manual_seed takes."""


def torch_device(text: str) -> torch.device:
    """An argparse type: a torch device this machine has (cpu, cuda, cuda:N)."""
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device (cpu, cuda, cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: this machine has no CUDA device")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text}: only cpu and cuda devices are supported")
    return dev


def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", metavar="RUN_OR_CHECKPOINT",
                        help="a run's output_dir, a checkpoint folder or an exported .safetensors model")
    parser.add_argument("--prompt", required=True, help="the text to continue")
    parser.add_argument("--max-new-tokens", type=integer(0), default=200, help="tokens to add at most (default 200)")
    parser.add_argument("--temperature", type=number(0), default=0.8,
                        help="softmax temperature (default 0.8); 0 = always the most likely token")
    parser.add_argument("--top-k", type=integer(1), default=None, help="sample among the K most likely tokens only")
    parser.add_argument("--seed", type=integer(0, TORCH_SEED_MAX), default=0, help="seed of the sampling (default 0)")
    parser.add_argument("--device", type=torch_device, default=None,
                        help="torch device (default: cuda when available, else cpu)")


def main(args) -> int:
    from competesmoe.launcher.checkpoint import load_model
    from competesmoe.launcher.checkpoint.reading import run_tokenizer
    from competesmoe.moe.generate import Sampling, generate
    from competesmoe.moe.routing import RoutingContext

    sampling = _sampling(args, Sampling)
    prompt = os.fsencode(args.prompt)  # the bytes as given: undecodable ones come back from surrogateescape
    saved, model = load_model(args.checkpoint)
    tokenizer = run_tokenizer(saved)
    ids = encode_prompt(tokenizer, prompt)
    device = args.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    routing = RoutingContext(step=saved.step, total_steps=saved.cfg.train.max_steps)  # StableMoE's stage
    new = generate(model, torch.as_tensor(ids, dtype=torch.long, device=device), sampling,
                   stop_id=tokenizer.eod, routing=routing)
    sys.stdout.buffer.write(prompt + tokenizer.decode(new) + b"\n")
    sys.stdout.buffer.flush()
    return 0


def _sampling(args, sampling_class):
    try:
        return sampling_class(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                              seed=args.seed)
    except ValueError as err:  # Sampling's messages start with the field's name: name the flag instead
        field, rest = str(err).split(" ", 1)
        raise UserError(f"--{field.replace('_', '-')} {rest}") from None


def encode_prompt(tokenizer, prompt: bytes) -> np.ndarray:
    """The prompt's ids, or a one-line refusal of what the tokenizer cannot encode faithfully."""
    if not prompt:
        raise UserError("--prompt is empty; give the text to continue")
    if tokenizer.kind == "byte":
        return tokenizer.encode(prompt)
    try:
        text = prompt.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"--prompt is not UTF-8 text (byte 0x{prompt[err.start]:02x} at offset {err.start}); the "
                        f"run's SentencePiece tokenizer encodes UTF-8 text only") from None
    ids = tokenizer.encode(text.encode("utf-8"))
    if tokenizer.unk_id in ids:
        raise UserError(f"--prompt has characters the run's SentencePiece tokenizer has no piece for (it has no "
                        f"byte fallback): {_unknown_characters(tokenizer, text)!r}; leave them out")
    return ids


def _unknown_characters(tokenizer, text: str) -> str:
    return "".join(dict.fromkeys(ch for ch in text if tokenizer.unk_id in tokenizer.encode(ch.encode("utf-8"))))
