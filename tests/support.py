"""What many test modules share: the repository's paths, the tiny configs, and the command line run as users run it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]
TINY = str(ROOT / "configs" / "tiny-cpu.yaml")
FAST = ["train.eval_every=0", "train.log_every=1", "train.eval_batches=2"]
"""Overrides that keep a short run short: no evaluation until the end, a record every step."""
SMALL = ["model.d_model=64", "model.n_layers=2", "model.n_heads=2", "model.seq_len=64", "moe.expert_hidden=128",
         "train.micro_batch_size=4", "train.max_steps=30", "train.log_every=1", "train.eval_every=0",
         "train.eval_batches=2", "moe.competition.rate=0.3", "moe.competition.warmup=0.0", "train.zero_stage=1"]
"""A 2-layer model that competes often: for multi-rank runs that compare loss curves."""


def competesmoe(*args, timeout=600, env=None, cwd=ROOT, text=True) -> subprocess.CompletedProcess:
    """`competesmoe ARGS...` in a fresh process, one thread per rank, output captured (as bytes: text=False)."""
    return subprocess.run([sys.executable, "-m", "competesmoe.launcher.cli", *args], cwd=cwd, capture_output=True,
                          text=text, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """The one line a refused command printed (exit 2, no traceback)."""
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


def records(run_dir: Path, split: str) -> list[dict]:
    """The metrics.jsonl records of one split."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def losses(run_dir: Path) -> dict[int, float]:
    """Train loss per logged step."""
    return {r["step"]: r["loss"] for r in records(run_dir, "train")}
