"""`competesmoe tensorboard RUN_DIR...`: serve the TensorBoard of one or more runs, on loopback by default.

Each RUN_DIR is a run's output_dir (its `tensorboard/` folder is used) or a tensorboard folder itself;
the runs appear under their folder names. Scalars (`train/*`, `valid/*`, `moe/layerN/*`), per-layer
expert-load histograms and heatmap images (`moe/layerN/expert_load_heatmap`) are all there.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from competesmoe.common.errors import UserError
from competesmoe.launcher.process import run_child


def event_dir(run_dir: str) -> Path:
    path = Path(run_dir)
    if not path.is_dir():
        raise UserError(f"run directory {run_dir} does not exist")
    board = path / "tensorboard"
    return board if board.is_dir() else path


def tensorboard_command(run_dirs: list[str], host: str = "127.0.0.1", port: int = 6006) -> list[str]:
    dirs = [event_dir(d) for d in run_dirs]
    for d in dirs:
        if not any(d.rglob("events.out.tfevents.*")):
            raise UserError(f"{d} holds no TensorBoard event files (is it a run's output_dir?)")
    base = [sys.executable, "-m", "tensorboard.main", "--host", host, "--port", str(port)]
    if len(dirs) == 1:
        return base + ["--logdir", str(dirs[0])]
    names: dict[str, Path] = {}
    for d in dirs:
        name = (d.parent if d.name == "tensorboard" else d).name or "run"
        unique, n = name, 1
        while unique in names:
            n += 1
            unique = f"{name}-{n}"
        names[unique] = d
    for name, d in names.items():
        if "," in str(d) or ":" in name:
            raise UserError(f"{d}: TensorBoard's --logdir_spec cannot take ',' in a path or ':' in a run name")
    return base + ["--logdir_spec", ",".join(f"{name}:{d}" for name, d in names.items())]


def serve(run_dirs: list[str], host: str = "127.0.0.1", port: int = 6006, dry_run: bool = False) -> int:
    command = tensorboard_command(run_dirs, host, port)
    print("+ " + shlex.join(command), flush=True)
    if dry_run:
        return 0
    print(f"TensorBoard at http://{host}:{port}/ (Ctrl-C stops it)", flush=True)
    return run_child(command)
