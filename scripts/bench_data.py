"""Measure data preparation and the gpt sampler: throughput and peak memory against corpus size.

    python scripts/bench_data.py --text /path/to/real.txt [--text more.txt] --sizes-mb 200 2000 --workers 1 2

For each size it writes a JSONL corpus of real text into --tmp (16 files; documents are runs of the
given files' lines, shuffled with a fixed seed), then times `competesmoe prepare` over it with each
worker count (data.inputs, data.tokenizer as given) and records the peak resident memory of its whole
process tree (the main process plus its workers, sampled every 0.1 s from /proc). Then it builds a
training rank's gpt sampler (megatron-core GPTDataset over the preparation, --samples samples of
--seq-len) in a fresh process, draws --batches batches and records that process's anonymous memory
(RssAnon) before and after, the pages of the mmapped dataset it has resident after (RssFile: page cache
the kernel reads ahead around each sample and may drop at will), and its peak RSS (VmHWM); once as the
rank that builds megatron-core's index cache, once more as a rank that loads it. Prints a Markdown
table; deletes what it wrote unless --keep. Linux only.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

FILES = 16
CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "tiny-cpu.yaml")  # only its data.* is overridden

SAMPLER_SNIPPET = """
import json, sys, resource
from pathlib import Path
from competesmoe.data.config import DataConfig
from competesmoe.data.loader import open_train_data
from competesmoe.data.megatron import indexed_dataset_module

def status():
    return {l.split(":")[0]: int(l.split()[1]) * 1024 for l in open("/proc/self/status")
            if l.startswith(("VmHWM", "RssAnon", "RssFile"))}

indexed_dataset_module()  # imports (torch, megatron-core) before the baseline
prep, cache, seq_len, samples, batches = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
before = status()
data = open_train_data(DataConfig(sampler="gpt", split="98,1,1"), prep, cache_dir=cache, seq_len=seq_len,
                       micro_batch_size=8, dp_rank=0, dp_size=1, seed=1234, train_samples=samples, eval_samples=64)
for _ in range(batches):
    data.sampler.next_batch()
print(json.dumps({"before": before, "after": status()}))
"""


def write_corpus(texts: list[Path], target_bytes: int, out: Path, seed: int = 0) -> int:
    """JSONL files of about target_bytes in all: documents of 2..40 consecutive lines, lines shuffled in blocks."""
    lines = [line for t in texts for line in t.read_text(encoding="utf-8", errors="replace").split("\n")]
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    handles = [open(out / f"part{k:02d}.jsonl", "w") for k in range(FILES)]
    written = doc = 0
    try:
        while written < target_bytes:
            start = rng.randrange(len(lines))
            text = "\n".join(lines[start:start + rng.randint(2, 40)])
            if not text.strip():
                continue
            record = json.dumps({"text": text}) + "\n"
            handles[doc % FILES].write(record)
            written += len(record)
            doc += 1
    finally:
        for h in handles:
            h.close()
    return written


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
            tree.setdefault(ppid, []).append(int(entry))
    return tree


def _rss(pid: int) -> int:
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_measured(cmd: list[str]) -> tuple[float, int, int]:
    """(seconds, peak RSS of the process tree summed, peak RSS of its largest process)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak_sum = peak_one = 0
    while proc.poll() is None:
        tree, pids, todo = _children(), [], [proc.pid]
        while todo:
            pid = todo.pop()
            pids.append(pid)
            todo += tree.get(pid, [])
        sizes = [_rss(p) for p in pids]
        peak_sum, peak_one = max(peak_sum, sum(sizes)), max(peak_one, max(sizes))
        time.sleep(0.1)
    seconds = time.perf_counter() - start
    out, err = proc.communicate()
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
    return seconds, peak_sum, peak_one


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", type=Path, action="append", required=True,
                        help="real text file(s) to build corpora from")
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[200, 2000])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--tokenizer", default="byte", choices=["byte", "sentencepiece"])
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--spm-sample-mb", type=int, default=20)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--samples", type=int, default=200_000, help="the sampler's run length (samples)")
    parser.add_argument("--batches", type=int, default=500)
    parser.add_argument("--tmp", type=Path, default=Path("/tmp/competesmoe-bench-data"))
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()

    mb = 1e6
    rows = []
    try:
        for size in args.sizes_mb:
            corpus = args.tmp / f"corpus{size}"
            written = write_corpus(args.text, size * 1_000_000, corpus)
            for workers in args.workers:
                prep = args.tmp / f"prep{size}w{workers}"
                cmd = [sys.executable, "-m", "competesmoe.launcher.cli", "prepare", "--workers", str(workers), CONFIG,
                       f"data.inputs=[{corpus}]", "data.sampler=gpt", f"data.prepared_dir={prep}",
                       f"data.tokenizer={args.tokenizer}", f"data.vocab_size={args.vocab_size}",
                       f"data.spm_sample_bytes={args.spm_sample_mb * 1_000_000}"]
                seconds, peak_sum, peak_one = run_measured(cmd)
                again, _, _ = run_measured(cmd)  # finished: start-up plus the fingerprint check only
                rows.append({"size_mb": written / mb, "workers": workers, "seconds": seconds, "recheck_s": again,
                             "mb_s": written / mb / seconds, "mb_s_net": written / mb / max(seconds - again, 1e-9),
                             "prepare_tree_mb": peak_sum / mb, "prepare_main_mb": peak_one / mb})
                print(json.dumps(rows[-1]), flush=True)
            # twice on one index cache: the rank that builds megatron-core's indices, then one that loads them
            for role in ("builds", "loads"):
                sampler = subprocess.run([sys.executable, "-c", SAMPLER_SNIPPET, str(prep),
                                          str(args.tmp / f"cache{size}"), str(args.seq_len), str(args.samples),
                                          str(args.batches)], capture_output=True, text=True, check=True)
                peaks = json.loads(sampler.stdout.strip().splitlines()[-1])
                print(json.dumps({role: peaks}), flush=True)
                for row in rows[-len(args.workers):]:
                    row[role] = (peaks["before"]["RssAnon"] / mb, peaks["after"]["RssAnon"] / mb,
                                 peaks["after"]["RssFile"] / mb, peaks["after"]["VmHWM"] / mb)
            shutil.rmtree(corpus, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(args.tmp, ignore_errors=True)
    print(f"\ntokenizer {args.tokenizer}; sampler: seq_len {args.seq_len}, {args.samples} samples, "
          f"{args.batches} batches of 8")
    print("| corpus MB | workers | prepare s | re-run s (finished: start-up + fingerprint) | MB/s (wall) "
          "| MB/s (wall - re-run) | prepare peak RSS, all processes (MB) | largest process (MB) "
          "| sampler that builds the indices: anonymous RSS before / after, mapped file pages, peak RSS (MB) "
          "| sampler that loads them: the same (MB) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['size_mb']:.0f} | {r['workers']} | {r['seconds']:.1f} | {r['recheck_s']:.1f} | {r['mb_s']:.1f} "
              f"| {r['mb_s_net']:.1f} | {r['prepare_tree_mb']:.0f} | {r['prepare_main_mb']:.0f} "
              + "".join("| {:.0f} / {:.0f}, {:.0f}, {:.0f} ".format(*r[role]) for role in ("builds", "loads")) + "|")


if __name__ == "__main__":
    main()
