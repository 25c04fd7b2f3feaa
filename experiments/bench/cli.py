"""`competesmoe bench moe-layer`: our MoE layer against DeepSpeed's, measured in one run.
(`competesmoe bench train`: the whole training step against the same model with DeepSpeed's MoE layers; see
experiments/bench/whole_model.py.)

    competesmoe bench moe-layer [--d-model 256 --experts 8 --hidden 1024 --tokens 4096 --top-k 1 2
                                 --ep 1 2 --iters 7 --competition-iters 3 --clock wall]

(or `python -m competesmoe.experiments.bench moe-layer ...`). Spawns `--nproc` gloo ranks
(torch.multiprocessing, one intra-op thread each) and, in those same processes, for every
(top-K, EP size):

  1. forward+backward tokens/s per rank of our MoELayer router step (dropless) and of
     `deepspeed.moe.layer.MoE` (the same experts as torch Linear-GELU-Linear modules, the same gate
     weights, dropless: drop_tokens=False, so its capacity C is the largest expert load in the EP
     group; `--ds-capacity-factor F` instead pads to C = ceil(F * K * T / E) with drop_tokens=True),
     and the ratio ours/DeepSpeed. At EP 1 the ranks are plain data-parallel replicas (every rank
     holds every expert; ours runs the LocalDispatcher).
  2. expert work efficiency: the FLOP rate of our GroupedExperts fwd+bwd on the rows the router
     step actually sent to this rank's experts, over the rate one dense matmul chain of the same
     total size (x[rows, d] @ w_in[d, h], then @ w_out[h, d], forward and both backward products,
     no activation) reaches on this machine.
  3. the competition step: its time against our router step and against its FLOP floor, the
     forward+backward of GroupedExperts.forward_all on the EP group's tokens alone (no
     communication, no top-K); for each `moe.competition.gather` mode at EP > 1.
  4. bytes each rank sends to the other ranks per step, per collective: every c10d collective of
     one step (ours and DeepSpeed's) is seen by a TorchDispatchMode; plus DeepSpeed's estimate from
     its capacity-padded dispatch tensor (E * C * d * 4 bytes per all-to-all, 2 forward, 2 backward).
  5. peak memory per rank of one step: the largest total of live tensors allocated during
     forward+backward, tracked at dispatch level by torch's MemTracker (parameters and the input,
     allocated before the step, are excluded; gradients count).

Timing: `--warmup` untimed and `--iters` timed iterations per variant (the competition step and
its floor, ~10x a router step: one warm-up and `--competition-iters`), variants interleaved
round-robin so drift hits them alike; a barrier before and after each timed call; a step's time
is the slowest rank's; the table shows medians. `--clock cpu` times each rank's process CPU time
instead of wall time, for a machine that other work shares (the first line prints the load
average). Nothing printed is a constant: every figure comes from this run; the summary at the end
gathers the ratios per cell. The targets they are read against are in docs/benchmarks.md.

For the `competesmoe` command (entry point `bench` of the group `competesmoe.commands`):
`add_command(subparsers)` adds `bench`, `add_arguments(parser)` adds the `moe-layer` sub-command
and its options to a parser, `run(args)` runs what was parsed, `main(argv)` does both.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from types import SimpleNamespace

from competesmoe.common.errors import UserError
from competesmoe.common.options import OneLineParser, integer, number

QUICK = dict(d_model=32, experts=4, hidden=64, tokens=256, iters=2, warmup=1, competition_iters=1)
_NOT_OPTIONS = ("command", "bench_target", "run_command")
"""Names argparse leaves in the namespace that are not benchmark options."""


def add_command(subparsers) -> None:
    """Entry point `competesmoe.commands: bench`: add `competesmoe bench` to the command's sub-parsers."""
    parser = subparsers.add_parser("bench", help="benchmarks: `bench moe-layer`, `bench train` (ours vs DeepSpeed-MoE)")
    add_arguments(parser)
    parser.set_defaults(run_command=run)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the benchmark sub-commands (`moe-layer`, `train`) and their options to `parser`."""
    sub = parser.add_subparsers(dest="bench_target", required=True, metavar="{moe-layer,train}")
    _add_train(sub)
    moe = sub.add_parser("moe-layer", help="our MoE layer vs deepspeed.moe.layer.MoE: speed, expert "
                                           "efficiency, competition cost, communication, memory",
                         description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    moe.add_argument("--d-model", type=integer(1), default=256)
    moe.add_argument("--experts", type=integer(1), default=8, help="global experts E")
    moe.add_argument("--hidden", type=integer(1), default=1024, help="expert hidden width")
    moe.add_argument("--tokens", type=integer(1), default=4096, help="tokens per rank")
    moe.add_argument("--top-k", type=integer(1), nargs="+", default=[1, 2], help="top-K values to measure")
    moe.add_argument("--ep", type=integer(1), nargs="+", default=[1, 2], help="expert-parallel sizes to measure")
    moe.add_argument("--iters", type=integer(1), default=7, help="timed iterations per variant (median)")
    moe.add_argument("--warmup", type=integer(0), default=2, help="untimed iterations per variant first")
    moe.add_argument("--competition-iters", type=integer(1), default=3,
                     help="timed iterations of the competition steps and their floor (median)")
    moe.add_argument("--ds-capacity-factor", type=_capacity_factor, default=None, metavar="F|E/K",
                     help="run DeepSpeed with drop_tokens=True and capacity factor F (capacity "
                          "ceil(F * K * tokens / E)), or 'E/K' (per K: capacity = tokens, nothing can be "
                          "dropped), instead of its dropless mode (drop_tokens=False)")
    moe.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                     help="wall: elapsed time (what a training step costs on a quiet machine); cpu: each "
                          "rank's process CPU time (less skewed by other work on a shared machine, but "
                          "blind to time spent waiting for the other rank)")
    moe.add_argument("--nproc", type=integer(1), default=2, help="ranks (gloo processes)")
    moe.add_argument("--threads", type=integer(1), default=1, help="intra-op threads per rank")
    moe.add_argument("--timeout", type=number(0, low_open=True), default=3600.0,
                     help="give up after this many seconds")
    moe.add_argument("--quick", action="store_true",
                     help="tiny shapes and few iterations (a smoke test; figures mean nothing): "
                          + ", ".join(f"{k} {v}" for k, v in QUICK.items()))


TRAIN_QUICK = dict(iters=2, warmup=1, comm_iters=1)


def _add_train(sub) -> None:
    from competesmoe.experiments.bench import whole_model

    train = sub.add_parser("train", help="our whole training step vs the same model with deepspeed.moe.layer.MoE: "
                                         "tokens/s, peak memory, communication share",
                           description=whole_model.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("config", help="the run's YAML config (its model, MoE and engine settings)")
    train.add_argument("overrides", nargs="*", help="key=value overrides, as for `competesmoe train`")
    train.add_argument("--ep", type=integer(1), nargs="+", default=[1, 2], help="expert-parallel sizes to measure")
    train.add_argument("--nproc", type=integer(1), default=2, help="ranks (gloo processes)")
    train.add_argument("--threads", type=integer(1), default=1, help="intra-op threads per rank")
    train.add_argument("--iters", type=integer(1), default=10, help="timed steps per model (median)")
    train.add_argument("--warmup", type=integer(0), default=2, help="untimed steps per model first")
    train.add_argument("--comm-iters", type=integer(1), default=3, help="further steps timing the communication")
    train.add_argument("--timeout", type=number(0, low_open=True), default=3600.0,
                       help="give up after this many seconds")
    train.add_argument("--quick", action="store_true", help="smoke-test settings: " +
                       ", ".join(f"{k} {v}" for k, v in TRAIN_QUICK.items()))


def _capacity_factor(text: str):
    if text.replace(" ", "").upper() == "E/K":
        return "E/K"
    return number(0, low_open=True)(text)


def _validate(opts: SimpleNamespace) -> None:
    """What the options' types cannot check alone (each option's own range: add_arguments)."""
    if opts.bench == "train":
        return _validate_train(opts)
    for k in opts.top_k:
        if not 1 <= k <= opts.experts:
            raise UserError(f"--top-k {k} must be between 1 and --experts ({opts.experts})")
    for ep in opts.ep:
        if opts.nproc % ep or opts.experts % ep:
            raise UserError(f"--ep {ep} must divide both --nproc ({opts.nproc}) and --experts ({opts.experts})")


def _validate_train(opts: SimpleNamespace) -> None:
    from competesmoe.launcher.config import load_config

    cfg = load_config(opts.config, opts.overrides)  # a bad config or override: ConfigError, one line
    for ep in opts.ep:
        if opts.nproc % ep or cfg.moe.num_experts % ep:
            raise UserError(f"--ep {ep} must divide both --nproc ({opts.nproc}) and moe.num_experts "
                            f"({cfg.moe.num_experts})")
    if cfg.moe.top_k > 2:
        raise UserError(f"moe.top_k {cfg.moe.top_k}: deepspeed.moe.layer.MoE routes to 1 or 2 experts")


def _options(args: argparse.Namespace) -> SimpleNamespace:
    opts = SimpleNamespace(**{k: v for k, v in vars(args).items() if k not in _NOT_OPTIONS})
    opts.bench = args.bench_target
    if opts.quick:
        for k, v in (TRAIN_QUICK if opts.bench == "train" else QUICK).items():
            setattr(opts, k, v)
    if opts.bench == "train":
        opts.ep = sorted(dict.fromkeys(opts.ep))
        return opts
    opts.top_k = sorted(dict.fromkeys(opts.top_k))
    opts.ep = sorted(dict.fromkeys(opts.ep))
    return opts


def run(args: argparse.Namespace) -> int:
    """Run what `add_arguments` parsed. A bad option raises UserError; a failed rank prints its
    traceback and returns 1."""
    from competesmoe.experiments.bench import moe_layer, report, whole_model
    from competesmoe.parallel.ranks import RankFailed, RankTimeout

    opts = _options(args)
    _validate(opts)
    t0, load_before = time.monotonic(), _loadavg()
    try:
        results = (whole_model if opts.bench == "train" else moe_layer).run_ranks(opts)
    except (RankFailed, RankTimeout) as err:
        print(f"competesmoe bench: failed: {err}", file=sys.stderr)
        return 1
    wall = time.monotonic() - t0
    print(whole_model.report(opts, results, wall) if opts.bench == "train" else
          report.report(opts, results, wall, (load_before, _loadavg())), flush=True)
    return 0


def _loadavg() -> str:
    try:
        return "/".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:  # pragma: no cover - not on every platform
        return "n/a"


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="competesmoe bench", description="Benchmarks.")
    add_arguments(parser)
    try:
        return run(parser.parse_args(argv))
    except UserError as err:
        print(f"competesmoe bench: error: {err}", file=sys.stderr)
        return 2
