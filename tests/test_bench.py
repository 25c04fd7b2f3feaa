"""Smoke test of `competesmoe bench moe-layer --quick`: it runs on 2 gloo ranks, exits 0 and prints every
table with a ours/DeepSpeed ratio for EP 1 and EP 2, and a summary of measured ratios without thresholds
or verdicts (the targets live in docs/benchmarks.md). No timing assertions."""

import argparse
import re

import pytest

from support import ROOT, competesmoe

pytestmark = pytest.mark.slow  # real training runs / launchers: see tests/conftest.py

HEADERS = [
    "1. router step forward+backward throughput",
    "2. expert work efficiency",
    "3. competition step vs router step and vs its floor",
    "4. bytes sent to other ranks per fwd+bwd step",
    "4b. device-to-host transfers per fwd+bwd step",
    "5. peak memory of one fwd+bwd step",
    "summary (measured ratios",
]
RATIO = r"\d+\.\d+x"
CELLS = r"K 1 EP 1 {v}, K 2 EP 1 {v}, K 1 EP 2 {v}, K 2 EP 2 {v}"


def test_quick_benchmark_prints_every_table_and_a_ratio_per_ep_size():
    result = competesmoe("bench", "moe-layer", "--quick", timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert out.startswith("machine: ") and "torch intra-op thread" in out
    for header in HEADERS:
        assert header in out, header
    table1 = out.split(HEADERS[0], 1)[1].split(HEADERS[1], 1)[0]
    # rows: K  EP  ours ms  ours tok/s  DS ms  DS tok/s  ours/DS ...
    ratios = {(int(k), int(ep)) for k, ep in re.findall(r"^\s*(\d+)\s+(\d+)\s+[\d.]+\s+[\d,]+\s+[\d.]+\s+[\d,]+\s+"
                                                          r"\d+\.\d+x", table1, re.M)}
    assert ratios == {(1, 1), (2, 1), (1, 2), (2, 2)}, table1
    assert "errors (variant dropped)" not in out, out
    syncs = out.split(HEADERS[4], 1)[1].split(HEADERS[5], 1)[0]  # rows: K  EP  variant  rank0 / rank1
    counted = {(int(k), int(ep), name): [int(n) for n in counts.split(" / ")]
               for k, ep, name, counts in re.findall(r"^\s*(\d+)\s+(\d+)\s+(\S+)\s+(\d+(?: / \d+)*)\s*$", syncs, re.M)}
    for k, ep in ratios:
        assert max(counted[(k, ep, "ours")]) <= 1 and (k, ep, "deepspeed") in counted, syncs  # one per router step
    summary = out.split(HEADERS[-1], 1)[1]
    for line in (rf"ours / DeepSpeed tokens/s at K 1: EP 1 {RATIO}, EP 2 {RATIO}",
                 rf"ours / DeepSpeed tokens/s at K 2: EP 1 {RATIO}, EP 2 {RATIO}",
                 r"expert work / dense matmul rate: " + CELLS.format(v=r"\d+%"),
                 r"competition step / its floor: .*; best gather mode per cell: " + CELLS.format(v=RATIO),
                 r"our peak memory / DeepSpeed's: " + CELLS.format(v=RATIO),
                 r"with the experts recomputed: " + CELLS.format(v=RATIO)):
        assert re.search(line, summary), line
    # measured figures only: no thresholds, no verdicts (docs/benchmarks.md holds the targets)
    assert "reached" not in out and not re.search(r"(>=|<=)\s*\d", out), summary
    assert "docs/benchmarks.md" in summary and (ROOT / "docs" / "benchmarks.md").is_file()


def test_train_benchmark_runs_both_models_on_the_same_weights_and_data():
    result = competesmoe("bench", "train", "configs/tiny-cpu.yaml", *TINY_MODEL, "--ep", "2", "--quick", timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    rows = re.findall(r"^\s*2\s+(ours|deepspeed)\s+[\d.]+\s+[\d,]+\s+[\d.]+\s+\d+% / \d+%\s*$", out, re.M)
    assert rows == ["ours", "deepspeed"], out
    summary = re.search(r"EP 2: ours/DeepSpeed tokens/s \d+\.\d+x, peak memory \d+\.\d+x \(LM loss before the first "
                        r"step, rank 0: ours ([\d.]+), DeepSpeed ([\d.]+)\)", out)
    assert summary and abs(float(summary.group(1)) - float(summary.group(2))) < 1e-4, out


TINY_MODEL = ["model.d_model=64", "model.n_layers=2", "model.n_heads=2", "model.seq_len=64", "train.micro_batch_size=4"]


def test_bad_options_are_a_one_line_error(capsys):
    from competesmoe.experiments.bench import cli as bench

    assert bench.main(["moe-layer", "--ep", "3"]) == 2
    assert "--ep 3 must divide" in capsys.readouterr().err
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)  # reusable by the `competesmoe` command
    args = parser.parse_args(["moe-layer", "--quick", "--top-k", "2"])
    assert args.bench_target == "moe-layer" and args.quick and args.top_k == [2]
    assert bench.main(["train", "configs/tiny-cpu.yaml", "--ep", "3"]) == 2
    assert "--ep 3 must divide" in capsys.readouterr().err
    assert bench.main(["train", "configs/tiny-cpu.yaml", "moe.top_k=4"]) == 2
    assert "routes to 1 or 2 experts" in capsys.readouterr().err
