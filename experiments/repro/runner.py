"""Running the grid: each unfinished run is `competesmoe train` in a child process, `jobs` at a time,
with one progress bar over all their steps; a finished run is analysed at once (result.json)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from competesmoe.common.errors import UserError
from competesmoe.experiments.repro.analysis import analyse
from competesmoe.experiments.repro.grid import Grid, Run
from competesmoe.launcher.config import load_config


def run_grid(grid: Grid, jobs: int, progress: bool = True) -> None:
    """Run every unfinished run of the grid; raise UserError naming the runs that failed (the others are kept)."""
    from tqdm import tqdm

    from competesmoe.data.prepare import prepare

    todo = [r for r in grid.runs if not r.finished()]
    finished = len(grid.runs) - len(todo)
    print(f"repro: {len(grid.runs)} runs ({finished} already finished, {len(todo)} to run) in {grid.runs_dir}; "
          f"results to {grid.out_dir}", flush=True)
    if not todo:
        return
    import torch

    torch.set_num_threads(grid.threads)  # the analyses here: no more threads than a run gets
    prepare(load_config(grid.base_config, todo[0].overrides).data, grid.data_dir, progress=False)
    bar = tqdm(total=sum(r.max_steps for r in todo), unit="step", disable=not progress, dynamic_ncols=True,
               desc="grid")
    queue, running, failures = list(todo), [], {}
    try:
        while queue or running:
            for run in [r for r in queue if r.needs is not None and r.needs.name in failures]:
                queue.remove(run)  # its first phase failed: nothing to start from
                bar.update(run.max_steps)
                failures[run.name] = f"{run.name}: not started, {run.needs.name} failed"
            while len(running) < jobs and (run := _next_ready(queue)) is not None:
                queue.remove(run)
                running.append(_Child(run, grid))
            time.sleep(0.5)
            for child in list(running):
                bar.update(child.poll_steps())
                if child.proc.poll() is None:
                    continue
                running.remove(child)
                failure = _finish(child, bar, f"[{finished + 1}/{len(grid.runs)}]")
                if failure:
                    failures[child.run.name] = failure
                else:
                    finished += 1
            names = ", ".join(c.run.name for c in running)
            bar.set_description(f"grid {finished}/{len(grid.runs)} [{names}]" if names else "grid")
    except KeyboardInterrupt:
        for child in running:
            child.proc.terminate()
        raise
    finally:
        bar.close()
    if failures:
        raise UserError(f"{len(failures)} run(s) failed; the others are kept and a re-run resumes the grid: "
                        + "; ".join(failures.values()))


def _next_ready(queue: list[Run]) -> Run | None:
    """The first queued run whose first phase (if any) has finished."""
    return next((r for r in queue if r.needs is None or r.needs.finished()), None)


class _Child:
    """One run's `competesmoe train` process, its log, and how far its metrics.jsonl has got."""

    def __init__(self, run: Run, grid: Grid):
        if run.run_dir.exists():
            shutil.rmtree(run.run_dir)  # an unfinished or outdated run of ours: start it over
        run.run_dir.mkdir(parents=True)
        self.run = run
        self.log = open(run.run_dir / "train.log", "w")
        env = {**os.environ, "OMP_NUM_THREADS": str(grid.threads), "MKL_NUM_THREADS": str(grid.threads),
               "PYTHONUNBUFFERED": "1"}
        command = [sys.executable, "-m", "competesmoe.launcher.cli", "train", str(grid.base_config),
                   *run.overrides, f"parallel.threads_per_rank={grid.threads}"]
        (run.run_dir / "command.txt").write_text(" ".join(command) + "\n")
        self.start = time.perf_counter()
        self.proc = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.step = 0
        self.offset = 0

    def poll_steps(self) -> int:
        """Steps done since the last call."""
        step, self.offset = _last_step(self.run.run_dir / "metrics.jsonl", self.offset)
        if step is None or step <= self.step:
            return 0
        done, self.step = step - self.step, step
        return done


def _finish(child: _Child, bar, position: str) -> str | None:
    """After a child exited: analyse its run and report it on the bar; the failure's line when it failed."""
    child.log.close()
    wall = time.perf_counter() - child.start
    run = child.run
    bar.update(max(0, run.max_steps - child.step))
    if child.proc.returncode != 0:
        tail = (run.run_dir / "train.log").read_text(errors="replace").strip().splitlines()[-3:]
        bar.write(f"FAILED {run.name} (see {run.run_dir / 'train.log'})")
        sys.stdout.flush()
        return f"{run.name}: exit {child.proc.returncode}: {' | '.join(tail)}"
    result = analyse(run, wall)
    bar.write(f"{position} {run.name}: valid {result['valid_bpc']:.4f} test {result['test_bpc']:.4f} BPC, "
              f"{wall:.0f} s train + {result['analysis_s']:.0f} s analysis")
    sys.stdout.flush()  # a grid left running under nohup shows its progress in its log
    return None


def _last_step(metrics: Path, offset: int) -> tuple[int | None, int]:
    """The newest train step in metrics.jsonl past byte `offset`, and the new offset."""
    if not metrics.is_file():
        return None, offset
    with open(metrics, "rb") as f:
        f.seek(offset)
        chunk = f.read()
    end = chunk.rfind(b"\n")
    if end < 0:
        return None, offset
    step = None
    for line in chunk[:end].splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("split") == "train":
            step = record["step"]
    return step, offset + end + 1
