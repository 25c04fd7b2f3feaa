"""Smoke test of `python -m competesmoe.launcher.bench moe-layer --quick`: it runs on 2 gloo ranks,
exits 0 and prints every table with a ours/DeepSpeed ratio for EP 1 and EP 2. No timing assertions."""

import argparse
import os
import re
import subprocess
import sys

import pytest

from support import ROOT

pytestmark = pytest.mark.slow  # real training runs / launchers: see tests/conftest.py

HEADERS = [
    "1. router step forward+backward throughput",
    "2. expert work efficiency",
    "3. competition step vs router step and vs its floor",
    "4. bytes sent to other ranks per fwd+bwd step",
    "5. peak memory of one fwd+bwd step",
    "targets:",
]


def test_quick_benchmark_prints_every_table_and_a_ratio_per_ep_size():
    result = subprocess.run([sys.executable, "-m", "competesmoe.launcher.bench", "moe-layer", "--quick"],
                            cwd=ROOT, capture_output=True, text=True, timeout=180,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
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
    for target in ("DeepSpeed tokens/s at K 1", "DeepSpeed tokens/s at K 2", "of the dense matmul rate",
                   "its floor", "peak memory <="):
        assert re.search(re.escape(target) + r".*-> (not )?reached", out), target


def test_bad_options_are_a_one_line_error(capsys):
    from competesmoe.launcher import bench

    assert bench.main(["moe-layer", "--ep", "3"]) == 2
    assert "--ep 3 must divide" in capsys.readouterr().err
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)  # reusable by the `competesmoe` command
    args = parser.parse_args(["moe-layer", "--quick", "--top-k", "2"])
    assert args.bench_target == "moe-layer" and args.quick and args.top_k == [2]
