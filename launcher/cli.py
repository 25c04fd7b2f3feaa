"""The `competesmoe` command: train, prepare, launch, tensorboard, eval, generate, export, plan, and the commands registered
under the `competesmoe.commands` entry points (the experiments: bench, repro, finetune). User errors print one line and
exit 2."""

from __future__ import annotations

import argparse
import os
import sys
from importlib.metadata import entry_points

from competesmoe.common.errors import UserError
from competesmoe.common.options import OneLineParser, integer, matching, port

COMMANDS_GROUP = "competesmoe.commands"
"""Entry-point group of the sub-commands other packages add (pyproject.toml). Each entry is a function
`add_command(subparsers)` that adds one sub-parser and sets its default `run_command` to the function that
runs the parsed arguments and returns the exit status. `pip install -e .` refreshes the entries."""


def build_parser() -> argparse.ArgumentParser:
    from competesmoe.launcher.launch import HOSTNAME, IFNAME

    host = matching(HOSTNAME, "a host name or address (letters, digits, '.', '-', '_', ':')")
    parser = OneLineParser(prog="competesmoe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train one process, or one rank of a launched job")
    train.add_argument("config", help="YAML config, e.g. configs/tiny-cpu.yaml")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=40")

    remote = sub.add_parser("remote-train", help=argparse.SUPPRESS)  # what `launch --hostfile` runs on each host
    remote.add_argument("token", help="the train arguments and working directory, as `competesmoe launch` encoded them")

    prepare = sub.add_parser("prepare", help="tokenize data.path (90/5/5 splits) or data.inputs (documents) into "
                                             "megatron-core indexed datasets, once, before training")
    prepare.add_argument("config")
    prepare.add_argument("overrides", nargs="*")
    prepare.add_argument("--workers", type=integer(1), default=None,
                         help="data.inputs: tokenizing processes (default: the CPUs available)")
    prepare.add_argument("--skip-bad-input", action="store_true",
                         help="data.inputs: skip (and record) empty or unreadable files and bad JSONL lines "
                              "instead of refusing them")

    launch = sub.add_parser("launch", help="start `train` on this host or on several (deepspeed launcher or torchrun)",
                            description="One host: --nproc N. Over ssh: --hostfile F (deepspeed, pdsh). Per node: "
                                        "--no-ssh --node-rank R --master-addr A (deepspeed) or --launcher torchrun "
                                        "--nnodes K --node-rank R --master-addr A (c10d rendezvous).")
    launch.add_argument("--nproc", type=integer(1), default=None,
                        help="ranks per host (default 2; with --hostfile, each host's slots)")
    launch.add_argument("--launcher", choices=["deepspeed", "torchrun"], default="deepspeed")
    launch.add_argument("--nnodes", type=integer(1), default=None, help="number of hosts (default: the hostfile's, else 1)")
    launch.add_argument("--node-rank", type=integer(0), default=None,
                        help="this host's rank, 0 on the master (per-node starts: --no-ssh, torchrun)")
    launch.add_argument("--master-addr", type=host, default=None,
                        help="address of node 0, reachable from every node (default: 127.0.0.1 on one host, "
                             "the hostfile's first host over ssh)")
    launch.add_argument("--master-port", type=port, default=None,
                        help="rendezvous port (default: a free one on one host, 29500 across hosts)")
    launch.add_argument("--hostfile", default=None, help="DeepSpeed hostfile: one 'HOSTNAME slots=N' per line")
    launch.add_argument("--no-ssh", action="store_true",
                        help="deepspeed launcher without ssh: run this on every node with its --node-rank")
    launch.add_argument("--ifname", type=matching(IFNAME, "a network interface name"), default=None,
                        help="network interface the ranks talk over (sets GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME)")
    launch.add_argument("--local-addr", type=host, default=None,
                        help="torchrun: this node's address as the others reach it (default: --ifname's address)")
    launch.add_argument("--rdzv-id", default="competesmoe", help="torchrun: rendezvous id, the same on every node")
    launch.add_argument("--threads", type=integer(1), default=1, help="OMP threads per rank")
    launch.add_argument("--dry-run", action="store_true", help="print the command, do not run it")
    launch.add_argument("config")
    launch.add_argument("overrides", nargs="*")

    board = sub.add_parser("tensorboard", help="serve the TensorBoard of one or more runs on 127.0.0.1")
    board.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="output_dir of a run (or its tensorboard/)")
    board.add_argument("--host", type=host, default="127.0.0.1", help="address to bind (default loopback only)")
    board.add_argument("--port", type=port, default=6006)
    board.add_argument("--dry-run", action="store_true", help="print the command, do not run it")

    from competesmoe.launcher import evaluate

    eval_parser = sub.add_parser("eval", help="BPC / perplexity of a checkpoint on any raw text file",
                                 description=evaluate.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    evaluate.add_arguments(eval_parser)

    from competesmoe.launcher import generate

    generate_parser = sub.add_parser("generate", help="continue a prompt with a trained model",
                                     description=generate.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    generate.add_arguments(generate_parser)

    export = sub.add_parser("export", help="a checkpoint (any EP layout) as one consolidated safetensors file, or "
                                           "as a Hugging Face model folder (--format hf)")
    export.add_argument("checkpoint", help="a checkpoint folder, e.g. runs/tiny-cpu/checkpoints/step00000500, a run's "
                                           "output_dir (its newest checkpoint) or an exported .safetensors model")
    export.add_argument("out", help="output: a .safetensors file (must not exist), or with --format hf a folder "
                                    "(new or empty)")
    export.add_argument("--format", choices=["safetensors", "hf"], default="safetensors",
                        help="safetensors: our names, one file, loadable by eval/generate/finetune; hf: a Hugging "
                             "Face folder that transformers loads as MixtralForCausalLM (needs pip install -e '.[hf]')")

    from competesmoe.launcher import plan

    plan_parser = sub.add_parser("plan", help="memory, bytes, FLOPs and step time of every layout on N GPUs",
                                 description=plan.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    plan.add_arguments(plan_parser)
    add_registered_commands(sub)
    return parser


def add_registered_commands(sub) -> None:
    """The sub-commands of the `competesmoe.commands` entry points, by name. One that fails to load is left
    out with a warning: the built-in commands (a training rank among them) must not depend on it."""
    for entry in sorted(entry_points(group=COMMANDS_GROUP), key=lambda e: e.name):
        try:
            add_command = entry.load()
        except Exception as err:  # a stale or broken install: say so, keep the rest usable
            print(f"competesmoe: warning: command {entry.name!r} ({entry.value}) did not load: {err}; "
                  f"reinstall the package (pip install -e .)", file=sys.stderr)
            continue
        add_command(sub)


def dispatch(args: argparse.Namespace) -> int:
    from competesmoe.launcher.config import load_config

    if args.command == "launch":
        from competesmoe.launcher.config import validate_world
        from competesmoe.launcher.launch import LaunchOptions, launch

        cfg = load_config(args.config, args.overrides)  # fail here, once, rather than in every rank
        opts = LaunchOptions(launcher=args.launcher, nproc=args.nproc, nnodes=args.nnodes, node_rank=args.node_rank,
                             master_addr=args.master_addr, master_port=args.master_port, hostfile=args.hostfile,
                             no_ssh=args.no_ssh, ifname=args.ifname, local_addr=args.local_addr,
                             rdzv_id=args.rdzv_id, threads=args.threads, dry_run=args.dry_run)
        return launch(opts, [args.config, *args.overrides], validate=lambda world: validate_world(cfg, world))
    if args.command == "remote-train":
        from competesmoe.launcher.launch import decode_train_args

        cwd, train_args = decode_train_args(args.token)
        try:
            os.chdir(cwd)
        except OSError as err:
            raise UserError(f"working directory {cwd} does not exist on this host ({err.strerror}); `launch "
                            f"--hostfile` needs the same paths on every host (a shared file system)") from None
        args = build_parser().parse_args(["train", *train_args])
    if args.command == "tensorboard":
        from competesmoe.launcher.tensorboard import serve

        return serve(args.run_dirs, host=args.host, port=args.port, dry_run=args.dry_run)
    if getattr(args, "run_command", None) is not None:  # a registered command (add_registered_commands)
        return args.run_command(args)
    if args.command == "eval":
        from competesmoe.launcher import evaluate

        return evaluate.main(args)
    if args.command == "generate":
        from competesmoe.launcher import generate

        return generate.main(args)
    if args.command == "export":
        return export_checkpoint(args.checkpoint, args.out, args.format)
    if args.command == "plan":
        from competesmoe.launcher import plan

        return plan.run(args)
    cfg = load_config(args.config, args.overrides)
    if args.command == "prepare":
        from competesmoe.data.prepare import prepare, summary

        out = cfg.data.prepared_path(cfg.output_dir)
        meta = prepare(cfg.data, out, progress=True, workers=args.workers, skip_bad_input=args.skip_bad_input)
        print(f"prepared {out}: {summary(meta)}")
        return 0
    from competesmoe.launcher.train import run

    run(cfg)
    return 0


def export_checkpoint(checkpoint_dir: str, out: str, fmt: str = "safetensors") -> int:
    from pathlib import Path

    if fmt == "hf":
        from competesmoe.launcher.hf_export import export_hf

        print(f"wrote {export_hf(Path(checkpoint_dir), Path(out))}")
        return 0
    from competesmoe.launcher.export import export_safetensors

    if Path(out).exists():
        raise UserError(f"{out} already exists; choose a new output file (nothing is overwritten)")
    if not Path(out).parent.is_dir():
        raise UserError(f"{out}: folder {Path(out).parent} does not exist; create it or choose another output file")
    print(f"wrote {export_safetensors(Path(checkpoint_dir), Path(out))}")
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not _cuda_available() else "cuda")
    try:
        return dispatch(build_parser().parse_args(argv))
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
