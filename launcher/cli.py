"""The `competesmoe` command: train, prepare, launch. User errors print one line and exit 2."""

from __future__ import annotations

import argparse
import os
import sys

from competesmoe.launcher.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="competesmoe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train one process, or one rank of a launched job")
    train.add_argument("config", help="YAML config, e.g. configs/tiny-cpu.yaml")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=40")

    prepare = sub.add_parser("prepare", help="tokenize a raw text file into indexed train/valid/test splits")
    prepare.add_argument("config")
    prepare.add_argument("overrides", nargs="*")

    launch = sub.add_parser("launch", help="start `train` on N local ranks (deepspeed launcher or torchrun)")
    launch.add_argument("--nproc", type=int, default=2, help="ranks on this host")
    launch.add_argument("--launcher", choices=["deepspeed", "torchrun"], default="deepspeed")
    launch.add_argument("--master-port", type=int, default=None, help="rendezvous port (default: a free one)")
    launch.add_argument("--threads", type=int, default=1, help="OMP threads per rank")
    launch.add_argument("--dry-run", action="store_true", help="print the command, do not run it")
    launch.add_argument("config")
    launch.add_argument("overrides", nargs="*")
    return parser


def dispatch(args: argparse.Namespace) -> int:
    from competesmoe.launcher.config import load_config

    if args.command == "launch":
        from competesmoe.launcher.launch import launch

        load_config(args.config, args.overrides)  # fail here, once, rather than in every rank
        if args.nproc < 1:
            raise UserError(f"--nproc ({args.nproc}) must be at least 1")
        return launch(args.launcher, args.nproc, args.master_port, args.threads,
                      [args.config, *args.overrides], args.dry_run)
    cfg = load_config(args.config, args.overrides)
    if args.command == "prepare":
        from pathlib import Path

        from competesmoe.data.prepare import prepare

        out = Path(cfg.data.prepared_dir) if cfg.data.prepared_dir else Path(cfg.output_dir) / "data"
        meta = prepare(cfg.data, out, progress=True)
        print(f"prepared {out}: " + ", ".join(f"{k} {v}" for k, v in meta.get("tokens", {}).items()))
        return 0
    from competesmoe.launcher.train import run

    run(cfg)
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not _cuda_available() else "cuda")
    args = build_parser().parse_args(argv)
    try:
        return dispatch(args)
    except UserError as err:
        rank = os.environ.get("RANK")
        prefix = f"competesmoe: error{f' (rank {rank})' if rank not in (None, '0') else ''}: "
        print(prefix + str(err), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
