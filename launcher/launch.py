"""`competesmoe launch`: start `competesmoe train` on N local ranks with the deepspeed launcher
(default) or torchrun, printing the exact command first."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

import torch

from competesmoe.launcher.train import free_port

TRAIN_MODULE = "competesmoe.launcher.cli"


def launch_command(launcher: str, nproc: int, port: int, train_args: list[str]) -> list[str]:
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", TRAIN_MODULE, "train", *train_args]
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(port), "--no_local_rank",
            "--module", TRAIN_MODULE, "train", *train_args]


def launch(launcher: str, nproc: int, port: int | None, threads: int, train_args: list[str], dry_run: bool) -> int:
    command = launch_command(launcher, nproc, port or free_port(), train_args)
    print("+ " + shlex.join(command), flush=True)
    if dry_run:
        return 0
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    if "DS_ACCELERATOR" not in env and not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"  # silences DeepSpeed's accelerator probing on CPU machines
    return subprocess.call(command, env=env)
