"""`competesmoe bench moe-layer`: our MoE layer against DeepSpeed's, measured in one run.

    python -m competesmoe.launcher.bench moe-layer [--d-model 256 --experts 8 --hidden 1024
                                                    --tokens 4096 --top-k 1 2 --ep 1 2 --iters 7
                                                    --competition-iters 3 --clock wall]

Spawns `--nproc` gloo ranks (torch.multiprocessing, one intra-op thread each) and, in those same
processes, for every (top-K, EP size):

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
average). Nothing printed is a constant: every figure comes from this run; the targets at the end
are the issue's thresholds, each marked reached or not with the measured figures.

For the `competesmoe` command: `add_arguments(parser)` adds the `moe-layer` sub-command and its
options to a parser, `run(args)` runs what was parsed, `main(argv)` does both.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from types import SimpleNamespace

TARGET_SPEEDUP = 1.5
TARGET_EXPERT_EFFICIENCY = 0.85
TARGET_COMPETITION_OVER_FLOOR = 1.1
TARGET_MEMORY_RATIO = 0.5
QUICK = dict(d_model=32, experts=4, hidden=64, tokens=256, iters=2, warmup=1, competition_iters=1)


# ------------------------------------------------------------------------------------ arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the benchmark sub-commands (`moe-layer`) and their options to `parser`."""
    sub = parser.add_subparsers(dest="bench_target", required=True, metavar="{moe-layer}")
    moe = sub.add_parser("moe-layer", help="our MoE layer vs deepspeed.moe.layer.MoE: speed, expert "
                                           "efficiency, competition cost, communication, memory",
                         description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    moe.add_argument("--d-model", type=int, default=256)
    moe.add_argument("--experts", type=int, default=8, help="global experts E")
    moe.add_argument("--hidden", type=int, default=1024, help="expert hidden width")
    moe.add_argument("--tokens", type=int, default=4096, help="tokens per rank")
    moe.add_argument("--top-k", type=int, nargs="+", default=[1, 2], help="top-K values to measure")
    moe.add_argument("--ep", type=int, nargs="+", default=[1, 2], help="expert-parallel sizes to measure")
    moe.add_argument("--iters", type=int, default=7, help="timed iterations per variant (median)")
    moe.add_argument("--warmup", type=int, default=2, help="untimed iterations per variant first")
    moe.add_argument("--competition-iters", type=int, default=3,
                     help="timed iterations of the competition steps and their floor (median)")
    moe.add_argument("--ds-capacity-factor", type=_capacity_factor, default=None, metavar="F|E/K",
                     help="run DeepSpeed with drop_tokens=True and capacity factor F (capacity "
                          "ceil(F * K * tokens / E)), or 'E/K' (per K: capacity = tokens, nothing can be "
                          "dropped), instead of its dropless mode (drop_tokens=False)")
    moe.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                     help="wall: elapsed time (what a training step costs on a quiet machine); cpu: each "
                          "rank's process CPU time (less skewed by other work on a shared machine, but "
                          "blind to time spent waiting for the other rank)")
    moe.add_argument("--nproc", type=int, default=2, help="ranks (gloo processes)")
    moe.add_argument("--threads", type=int, default=1, help="intra-op threads per rank")
    moe.add_argument("--timeout", type=float, default=3600.0, help="give up after this many seconds")
    moe.add_argument("--quick", action="store_true",
                     help="tiny shapes and few iterations (a smoke test; figures mean nothing): "
                          + ", ".join(f"{k} {v}" for k, v in QUICK.items()))


def _capacity_factor(text: str):
    if text.replace(" ", "").upper() == "E/K":
        return "E/K"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a number nor E/K") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def _validate(opts: SimpleNamespace) -> None:
    from competesmoe.common.errors import UserError

    for name in ("d_model", "experts", "hidden", "tokens", "iters", "competition_iters", "nproc", "threads"):
        if getattr(opts, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    if opts.warmup < 0:
        raise UserError("--warmup must be at least 0")
    for k in opts.top_k:
        if not 1 <= k <= opts.experts:
            raise UserError(f"--top-k {k} must be between 1 and --experts ({opts.experts})")
    for ep in opts.ep:
        if ep < 1 or opts.nproc % ep or opts.experts % ep:
            raise UserError(f"--ep {ep} must divide both --nproc ({opts.nproc}) and --experts ({opts.experts})")


def _options(args: argparse.Namespace) -> SimpleNamespace:
    opts = SimpleNamespace(**{k: v for k, v in vars(args).items() if k not in ("command", "bench_target")})
    if opts.quick:
        for k, v in QUICK.items():
            setattr(opts, k, v)
    opts.top_k = sorted(dict.fromkeys(opts.top_k))
    opts.ep = sorted(dict.fromkeys(opts.ep))
    return opts


def run(args: argparse.Namespace) -> int:
    """Run what `add_arguments` parsed. A bad option raises UserError; a failed rank prints its
    traceback and returns 1."""
    opts = _options(args)
    _validate(opts)
    t0, load_before = time.monotonic(), _loadavg()
    from competesmoe.parallel.ranks import RankFailed, RankTimeout

    try:
        results = _spawn(opts)
    except (RankFailed, RankTimeout) as err:
        print(f"competesmoe bench: failed: {err}", file=sys.stderr)
        return 1
    print(_report(opts, results, time.monotonic() - t0, (load_before, _loadavg())), flush=True)
    return 0


def _loadavg() -> str:
    try:
        return "/".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:  # pragma: no cover - not on every platform
        return "n/a"


def main(argv: list[str] | None = None) -> int:
    from competesmoe.common.errors import UserError

    parser = argparse.ArgumentParser(prog="competesmoe bench", description="Benchmarks.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except UserError as err:
        print(f"competesmoe bench: error: {err}", file=sys.stderr)
        return 2


# ------------------------------------------------------------------------------------ spawning


def _spawn(opts: SimpleNamespace) -> list[dict]:
    from competesmoe.parallel.ranks import run_on_ranks

    # DeepSpeed's CPU accelerator, without its warning.
    return run_on_ranks(_bench_rank, opts.nproc, args=(opts,), timeout=opts.timeout, threads=opts.threads,
                        env={"DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")})


def _bench_rank(rank: int, world: int, opts: SimpleNamespace) -> dict:
    _init_deepspeed_comm()
    return _RankBench(rank, world, opts).run()


def _init_deepspeed_comm() -> None:
    """deepspeed.comm on the gloo group we already made (DeepSpeed's expert groups need it).

    DeepSpeed's torch backend JIT-compiles a shared-memory op at init (g++, ~30 s when not cached)
    that serves only `inference_all_reduce`, which neither MoE layer calls: skip building it."""
    import importlib
    import logging
    from unittest import mock

    import deepspeed
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    ds_torch = importlib.import_module("deepspeed.comm.torch")  # `deepspeed.comm.torch` the attribute is torch
    with mock.patch.object(ds_torch, "build_shm_op", lambda: None):
        deepspeed.init_distributed(dist_backend="gloo", verbose=False)


# ------------------------------------------------------------------------------------ measuring


def _make_comm_counter():
    """A TorchDispatchMode that records every c10d collective of the ranks' steps (however the
    caller reached it: torch.distributed, an early-bound alias, deepspeed.comm) with the bytes this
    rank sends to the other ranks of the group; the self chunk never crosses the wire.
    all_reduce is counted as a ring: 2 (P-1)/P of the tensor."""
    import torch
    import torch.distributed as dist
    from torch.utils._python_dispatch import TorchDispatchMode

    def nbytes(t):
        return t.numel() * t.element_size()

    def flat(ts):
        for t in ts:
            if isinstance(t, (list, tuple)):
                yield from flat(t)
            else:
                yield t

    class CommCounter(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls: list[tuple[str, int]] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func.namespace == "c10d":
                name = func._schema.name.split("::")[-1]
                if name != "barrier":
                    self.calls.append((name, self._bytes(name, args)))
            return func(*args, **kwargs)

        @staticmethod
        def _bytes(name, args) -> int:
            pg = next((a for a in args if isinstance(a, torch.ScriptObject)), None)
            if pg is None:
                return 0
            pg = dist.ProcessGroup.unbox(pg)
            size, rank = pg.size(), pg.rank()
            if size <= 1:
                return 0
            if name == "alltoall_base_":
                x, splits = args[1], list(args[4])
                if not splits:
                    return nbytes(x) * (size - 1) // size
                row = nbytes(x) // x.shape[0] if x.dim() and x.shape[0] else 0
                return (sum(splits) - splits[rank]) * row
            if name == "alltoall_":
                return sum(nbytes(t) for i, t in enumerate(args[1]) if i != rank)
            if name in ("_allgather_base_", "allgather_into_tensor_coalesced_", "allgather_"):
                return sum(nbytes(t) for t in flat([args[1]])) * (size - 1)
            if name in ("_reduce_scatter_base_", "reduce_scatter_tensor_coalesced_"):
                return sum(nbytes(t) for t in flat([args[1]])) - sum(nbytes(t) for t in flat([args[0]]))
            if name == "allreduce_":
                return 2 * (size - 1) * sum(nbytes(t) for t in args[0]) // size
            if name == "broadcast_":
                return sum(nbytes(t) for t in args[0]) * (size - 1) if args[2] == rank else 0
            return 0

        def total(self) -> int:
            return sum(b for _, b in self.calls)

        def summary(self) -> dict[str, tuple[int, int]]:
            """collective -> (calls, bytes)"""
            out: dict[str, tuple[int, int]] = {}
            for name, b in self.calls:
                n, t = out.get(name, (0, 0))
                out[name] = (n + 1, t + b)
            return out

    return CommCounter()


def peak_step_bytes(step) -> int | None:
    """Peak total of live tensors allocated during `step()` (torch MemTracker, dispatch level)."""
    try:
        from torch.distributed._tools.mem_tracker import MemTracker
    except ImportError:  # pragma: no cover - private torch API
        return None
    tracker = MemTracker()
    with tracker:
        step()
    snapshot = tracker.get_tracker_snapshot("peak")
    return int(sum(dev.get("Total", 0) for dev in snapshot.values()))


class _RankBench:
    def __init__(self, rank: int, world: int, opts: SimpleNamespace):
        self.rank, self.world, self.opts = rank, world, opts

    # timing ------------------------------------------------------------------------------
    def time_variants(self, variants: dict, plan: dict[str, tuple[int, int]]) -> dict[str, dict]:
        """Interleaved timing; plan[name] = (warm-up, timed iterations). Returns name ->
        {'step': median over iterations of the slowest rank's time, 'own': median of this rank's
        own times, 'n': iterations}."""
        import torch
        import torch.distributed as dist

        clock = time.process_time if self.opts.clock == "cpu" else time.perf_counter
        names = list(variants)
        own = {n: [] for n in names}
        for it in range(max(sum(plan[n]) for n in names)):
            for name in names:
                warmup, iters = plan[name]
                if it >= warmup + iters:
                    continue
                dist.barrier()
                t0 = clock()
                variants[name]()
                elapsed = clock() - t0
                dist.barrier()
                if it >= warmup:
                    own[name].append(elapsed)
        out = {}
        for name in names:  # the same order and lengths on every rank
            mine = torch.tensor(own[name], dtype=torch.float64)
            slowest = mine.clone()
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
            out[name] = {"step": statistics.median(slowest.tolist()), "own": statistics.median(mine.tolist()),
                         "n": len(own[name])}
        return out

    def agree(self, ok: bool) -> bool:
        """True when every rank says ok (keeps all ranks on the same collectives after a failure)."""
        import torch
        import torch.distributed as dist

        flag = torch.tensor([1 if ok else 0])
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    # the run -------------------------------------------------------------------------------
    def run(self) -> dict:
        import deepspeed
        import torch

        result = {
            "rank": self.rank,
            "machine": {
                "cpus": os.cpu_count(),
                "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
                "cpu_model": _cpu_model(),
                "torch_threads": torch.get_num_threads(),
                "interop_threads": torch.get_num_interop_threads(),
                "torch": torch.__version__,
                "deepspeed": deepspeed.__version__,
                "python": platform.python_version(),
            },
            "cells": [],
        }
        for ep in self.opts.ep:
            for k in self.opts.top_k:
                result["cells"].append(self.cell(ep, k))
        return result

    @staticmethod
    def our_layer(cfg, d_model: int, groups, ep: int, activation_checkpointing: str):
        """Our layer as the parallelize step leaves it in a model: built from one seed (the same weights on every
        rank, as the model is built), its experts sharded over EP, activation checkpointing applied."""
        import torch

        from competesmoe.moe.layer import MoELayer
        from competesmoe.parallel.parallelize import shard_experts

        torch.manual_seed(1234)
        layer = MoELayer(cfg, d_model).train()
        if ep > 1:
            shard_experts(layer, groups, cfg.competition.gather)
        layer.experts.recompute_hidden = activation_checkpointing == "experts"
        return layer

    def cell(self, ep: int, k: int) -> dict:
        import torch
        import torch.distributed as dist
        import torch.nn.functional as F
        from torch import nn

        from competesmoe.moe.config import MoEConfig
        from competesmoe.parallel.groups import build_groups

        o = self.opts
        D, E, H, T = o.d_model, o.experts, o.hidden, o.tokens
        groups = build_groups(ep)
        e_local = E // ep

        # Our layer, dropless router step; a twin with the same weights recomputes the experts' hidden layers.
        cfg = MoEConfig(num_experts=E, top_k=k, expert_hidden=H, activation="gelu", router="competesmoe",
                        capacity_factor=0.0)
        cfg.competition.gather = "scores"
        ours = self.our_layer(cfg, D, groups, ep, "none")
        ours_recompute = self.our_layer(cfg, D, groups, ep, "experts")
        dispatchers = {"local": ours.dispatcher}
        if ep > 1:
            from competesmoe.parallel.expert_parallel import AllToAllDispatcher

            dispatchers = {"scores": ours.dispatcher, "outputs": AllToAllDispatcher(E, groups, "outputs")}
        router_dispatcher = next(iter(dispatchers.values()))

        # DeepSpeed's layer with the same gate and experts (its local experts are global
        # [ep_rank * e, (ep_rank + 1) * e), as ours).
        from deepspeed.moe.layer import MoE

        expert = nn.Sequential(nn.Linear(D, H, bias=False), nn.GELU(), nn.Linear(H, D, bias=False))
        padded = o.ds_capacity_factor is not None
        factor = (E / k if o.ds_capacity_factor == "E/K" else o.ds_capacity_factor) if padded else 1.0
        ds = MoE(hidden_size=D, expert=expert, num_experts=E, ep_size=ep, k=k, capacity_factor=factor,
                 eval_capacity_factor=factor, min_capacity=0, drop_tokens=padded, use_rts=False,
                 noisy_gate_policy=None, top2_2nd_expert_sampling=False).train()
        ds.set_deepspeed_parallelism()
        with torch.no_grad():
            ds.deepspeed_moe.gate.wg.weight.copy_(ours.router.weight_ED)
            for j, mod in enumerate(ds.deepspeed_moe.experts.deepspeed_experts):
                mod[0].weight.copy_(ours.experts.w_in_EDF[j].t())
                mod[2].weight.copy_(ours.experts.w_out_EFD[j].t())

        gen = torch.Generator().manual_seed(100 + self.rank)
        x = torch.randn(1, T, D, generator=gen).requires_grad_(True)
        probe = torch.randn(1, T, D, generator=gen)

        def ours_router():
            ours.dispatcher = router_dispatcher
            ours.zero_grad(set_to_none=True)
            x.grad = None
            y, aux = ours(x)
            ((y * probe).sum() + aux.loss).backward()
            return y

        def ours_recomputing():
            ours_recompute.zero_grad(set_to_none=True)
            x.grad = None
            y, aux = ours_recompute(x)
            ((y * probe).sum() + aux.loss).backward()
            return y

        def deepspeed_step():
            ds.zero_grad(set_to_none=True)
            x.grad = None
            y, l_aux, _ = ds(x)
            ((y * probe).sum() + 0.01 * l_aux).backward()
            return y

        def competition(mode):
            def step():
                ours.dispatcher = dispatchers[mode]
                ours.zero_grad(set_to_none=True)
                x.grad = None
                y, aux = ours(x, compete=True)
                ((y * probe).sum() + aux.loss).backward()
                return y
            return step

        # The floor: local experts on the EP group's tokens, fwd+bwd, nothing else.
        experts = ours.experts
        x_GD = torch.randn(ep * T, D, generator=gen).requires_grad_(True)
        probe_eGD = torch.randn(e_local, ep * T, D, generator=gen)

        def floor():
            experts.zero_grad(set_to_none=True)
            x_GD.grad = None
            (experts.forward_all(x_GD) * probe_eGD).sum().backward()

        # The expert block alone on the rows the router step sends to this rank's experts.
        with torch.no_grad():
            from competesmoe.moe import routing

            probs = torch.softmax(ours.router(x.detach().reshape(T, D)), dim=-1)
            _, experts_TK = routing.topk_renormalised(probs, k)
            token_A = torch.arange(T).repeat_interleave(k)
            x_ND, meta = router_dispatcher.dispatch(x.detach().reshape(T, D), token_A, experts_TK.reshape(-1))
        counts = list(meta.counts)
        rows = int(sum(counts))
        x_ND = x_ND.clone().requires_grad_(True)
        probe_ND = torch.randn(rows, D, generator=gen)

        def expert_block():
            experts.zero_grad(set_to_none=True)
            x_ND.grad = None
            (experts(x_ND, counts) * probe_ND).sum().backward()

        # Dense references of the same total size: one "expert" holding all `rows` rows.
        dense_rows = max(rows, 1)
        a = torch.randn(dense_rows, D, generator=gen)
        w1, w2 = torch.randn(D, H, generator=gen) / math.sqrt(D), torch.randn(H, D, generator=gen) / math.sqrt(H)
        g1, g2 = torch.randn(dense_rows, H, generator=gen), torch.randn(dense_rows, D, generator=gen)
        hmid = torch.randn(dense_rows, H, generator=gen)

        def dense_matmul():
            # forward x@w1, h@w2; backward dx = g1 @ w1^T, dw1 = x^T @ g1, dh = g2 @ w2^T, dw2 = h^T @ g2
            a @ w1
            hmid @ w2
            g1 @ w1.t()
            a.t() @ g1
            g2 @ w2.t()
            hmid.t() @ g2

        ffn_w1, ffn_w2 = w1.clone().requires_grad_(True), w2.clone().requires_grad_(True)
        a_req = a.clone().requires_grad_(True)

        def dense_ffn():
            ffn_w1.grad = ffn_w2.grad = a_req.grad = None
            ((F.gelu(a_req @ ffn_w1) @ ffn_w2) * g2).sum().backward()

        variants = {"ours": ours_router, "ours:recompute": ours_recomputing, "deepspeed": deepspeed_step}
        for mode in dispatchers:
            variants[f"competition:{mode}"] = competition(mode)
        recompute_mode = f"{next(iter(dispatchers))}+recompute"  # the twin competes with the default gather

        def competition_recomputing():
            ours_recompute.zero_grad(set_to_none=True)
            x.grad = None
            y, aux = ours_recompute(x, compete=True)
            ((y * probe).sum() + aux.loss).backward()
            return y

        variants[f"competition:{recompute_mode}"] = competition_recomputing
        variants.update(floor=floor, expert_block=expert_block, dense_matmul=dense_matmul, dense_ffn=dense_ffn)

        # One trial step each (all ranks agree to drop a variant that failed anywhere), with the
        # communication counted and ours checked against DeepSpeed's output.
        errors, comm, outputs = {}, {}, {}
        for name in list(variants):
            if not name.startswith(("ours", "deepspeed", "competition")):
                continue
            counter = _make_comm_counter()
            for d in dispatchers.values():
                if hasattr(d, "comm_bytes"):
                    d.comm_bytes.clear()
            try:
                with counter:
                    y = variants[name]()
                outputs[name] = y.detach()
                ok, err = True, None
            except Exception as exc:  # reported, not raised: the other variants still run
                ok, err = False, f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            if not self.agree(ok):
                errors[name] = err or "failed on another rank"
                del variants[name]
                continue
            own_counters = {}
            for d in dispatchers.values():
                own_counters.update({key: v for key, v in getattr(d, "comm_bytes", {}).items() if v})
            comm[name] = {"total": counter.total(), "by_collective": counter.summary(),
                          "dispatcher_counters": own_counters}

        # DeepSpeed's capacity (dropless: the largest expert load in the EP group; padded: its
        # formula, sharded_moe._capacity with factor F * K) and the assignments it dropped.
        counts_ds = ds.deepspeed_moe.exp_counts.detach().clone().to(torch.int64)
        if padded:
            capacity = max(math.ceil(T / E * factor * k), 0)
        else:
            group_max = counts_ds.clone()
            if ep > 1:
                dist.all_reduce(group_max, op=dist.ReduceOp.MAX, group=groups.ep)
            capacity = int(group_max.max())
            if k == 1:
                capacity = min(capacity, T)
        dropped = int((counts_ds - capacity).clamp_min(0).sum())
        ds_estimate = 4 * E * capacity * D * 4 * (ep - 1) // ep

        match = match_scale = None
        if "ours" in outputs and "deepspeed" in outputs:
            match = float((outputs["ours"] - outputs["deepspeed"]).abs().max())
            match_scale = float(outputs["deepspeed"].abs().max())
        if "ours" in outputs and "ours:recompute" in outputs and not torch.equal(outputs["ours"],
                                                                                 outputs["ours:recompute"]):
            errors["ours:recompute"] = "its output differs from ours without recomputation"

        expensive = ("competition", "floor")
        plan = {n: (min(o.warmup, 1), o.competition_iters) if n.startswith(expensive) else (o.warmup, o.iters)
                for n in variants}
        timings = self.time_variants(variants, plan)

        memory = {}
        for name in variants:
            if name.startswith(("ours", "deepspeed", "competition")):
                try:
                    memory[name], err = peak_step_bytes(variants[name]), None
                except Exception as exc:
                    memory[name], err = None, f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
                if not self.agree(err is None):
                    memory[name] = None
                    errors[f"memory:{name}"] = err or "failed on another rank"

        expert_flops = 6 * rows * 2 * D * H  # fwd + 2 bwd products of both expert matmuls
        floor_flops = 6 * e_local * ep * T * 2 * D * H
        return {"rank": self.rank, "ep": ep, "k": k, "rows": rows, "counts": counts, "capacity": capacity,
                "ds_dropped": dropped, "ds_estimate": ds_estimate, "timings": timings, "comm": comm, "memory": memory,
                "errors": errors, "expert_flops": expert_flops, "floor_flops": floor_flops,
                "match": match, "match_scale": match_scale, "modes": [*dispatchers, recompute_mode]}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown cpu"


# ------------------------------------------------------------------------------------ reporting


def _mb(n) -> str:
    return "n/a" if n is None else f"{n / 2**20:.2f}"


def _fmt_ratio(x) -> str:
    return "n/a" if x is None else f"{x:.2f}x"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def _report(opts: SimpleNamespace, results: list[dict], wall: float, load: tuple[str, str]) -> str:
    m = results[0]["machine"]
    out = []
    threads = sorted({r["machine"]["torch_threads"] for r in results})
    out.append(f"machine: {m['cpu_model']}, {m['cpus']} cores (this process may use {m['affinity']}), "
               f"{opts.nproc} gloo ranks x {'/'.join(map(str, threads))} torch intra-op thread(s) per rank; "
               f"torch {m['torch']}, deepspeed {m['deepspeed']}, python {m['python']}; load average "
               f"(1/5/15 min) {load[0]} at start, {load[1]} at end (other work on the cores skews timings)")
    out.append(f"shape: d_model {opts.d_model}, experts {opts.experts}, expert hidden {opts.hidden}, GELU, fp32, "
               f"{opts.tokens} tokens per rank; top-K {opts.top_k}; EP {opts.ep}"
               + ("  [--quick: smoke-test shapes, figures are not meaningful]" if opts.quick else ""))
    out.append(f"timing: median of {opts.iters} iterations after {opts.warmup} warm-up (competition steps and "
               f"floor: {opts.competition_iters} after {min(opts.warmup, 1)}), variants interleaved, barrier "
               f"before and after each, step = slowest rank; clock: "
               + ("wall (elapsed)" if opts.clock == "wall" else "process CPU time of each rank (not wall time)")
               + "; fwd+bwd with loss = sum(y * probe) + aux")
    out.append("ours: MoELayer router step, capacity_factor 0 (dropless); EP 1 = data-parallel replicas with "
               "LocalDispatcher, EP > 1 = apply_expert_parallel + AllToAllDispatcher")
    capacity_text = ("drop_tokens=False (dropless: capacity = largest expert load in the EP group)"
                     if opts.ds_capacity_factor is None else
                     f"drop_tokens=True, capacity_factor {opts.ds_capacity_factor} "
                     f"(capacity = ceil({opts.ds_capacity_factor} x K x tokens / E))")
    out.append("DeepSpeed: deepspeed.moe.layer.MoE, experts Linear-GELU-Linear (no bias), same gate and expert "
               f"weights, {capacity_text}, min_capacity 0, use_rts=False, noisy_gate_policy=None, "
               "top2_2nd_expert_sampling=False")

    cells = [[r["cells"][i] for r in results] for i in range(len(results[0]["cells"]))]

    # 1. throughput
    rows, speedups = [], {}
    for per_rank in cells:
        c = per_rank[0]
        t = c["timings"]
        ours = t.get("ours", {}).get("step")
        recompute = t.get("ours:recompute", {}).get("step")
        dsp = t.get("deepspeed", {}).get("step")
        ratio = dsp / ours if ours and dsp else None
        speedups[(c["k"], c["ep"])] = ratio
        check = "n/a"
        if c["match"] is not None:
            rel = c["match"] / max(c["match_scale"], 1e-30)
            check = f"max|dy| {c['match']:.1e}" if c["k"] > 1 else "(K=1: DS weights by gate prob)"
            if c["k"] > 1 and rel > 1e-3:
                check += " MISMATCH"
        rows.append([str(c["k"]), str(c["ep"]),
                     "n/a" if ours is None else f"{ours * 1e3:.1f}",
                     "n/a" if ours is None else f"{opts.tokens / ours:,.0f}",
                     "n/a" if dsp is None else f"{dsp * 1e3:.1f}",
                     "n/a" if dsp is None else f"{opts.tokens / dsp:,.0f}",
                     _fmt_ratio(ratio), "n/a" if recompute is None else f"{recompute * 1e3:.1f}",
                     _fmt_ratio(dsp / recompute if recompute and dsp else None), str(c["capacity"]),
                     str(sum(r["ds_dropped"] for r in per_rank)), check])
    out.append("\n1. router step forward+backward throughput (per rank)")
    out.append(_table(["K", "EP", "ours ms", "ours tok/s", "DS ms", "DS tok/s", "ours/DS", "recompute ms",
                       "recompute/DS", "DS capacity", "DS dropped", "ours vs DS output"], rows))
    out.append("   recompute = ours with parallel.activation_checkpointing=experts (the experts' hidden layer "
               "recomputed in backward); tok/s ratios are DS time / our time")

    # 2. expert work efficiency
    rows, efficiencies = [], {}
    for per_rank in cells:
        c = per_rank[0]
        per = []
        for r in per_rank:
            t = r["timings"]
            if "expert_block" not in t or not r["rows"]:
                continue
            block = r["expert_flops"] / t["expert_block"]["own"]
            dense = r["expert_flops"] / t["dense_matmul"]["own"]
            ffn = r["expert_flops"] / t["dense_ffn"]["own"]
            layer = r["expert_flops"] / t["ours"]["step"] if "ours" in t else None
            per.append((block / dense, r["rank"], r["rows"], block, dense, ffn, layer, t["expert_block"]["own"]))
        if not per:
            continue
        worst = min(per)
        efficiencies[(c["k"], c["ep"])] = worst[0]
        eff, rank, nrows, block, dense, ffn, layer, tblock = worst
        rows.append([str(c["k"]), str(c["ep"]), str(rank), str(nrows), f"{tblock * 1e3:.1f}",
                     f"{block / 1e9:.1f}", f"{dense / 1e9:.1f}", f"{eff:.0%}", f"{ffn / 1e9:.1f}",
                     f"{block / ffn:.0%}", "n/a" if layer is None else f"{layer / dense:.0%}"])
    out.append("\n2. expert work efficiency (worst rank; FLOPs = 3 x 2 x rows x 2 x d x hidden)")
    out.append(_table(["K", "EP", "rank", "rows", "experts ms", "experts GF/s", "dense mm GF/s", "efficiency",
                       "dense FFN GF/s", "vs FFN", "whole layer"], rows))
    out.append("   experts = GroupedExperts fwd+bwd on the rows the router step sent to this rank's experts;\n"
               "   dense mm = the same six matmuls on one dense [rows, d] x [d, hidden] / [rows, hidden] x "
               "[hidden, d] pair, no activation;\n"
               "   dense FFN = one dense GELU FFN of the same size through autograd; whole layer = expert "
               "FLOPs / router step time, as a share of dense mm")

    # 3. competition
    rows, comp_ratios = [], {}
    for per_rank in cells:
        c = per_rank[0]
        t = c["timings"]
        floor_t = t.get("floor", {}).get("step")
        for mode in c["modes"]:
            name = f"competition:{mode}"
            if name not in t:
                rows.append([str(c["k"]), str(c["ep"]), mode, "failed", "", "", "", "",
                             c["errors"].get(name, "")[:120]])
                comp_ratios[(c["k"], c["ep"], mode)] = None
                continue
            ct = t[name]["step"]
            rt = t.get("ours", {}).get("step")
            ratio = ct / floor_t if floor_t else None
            comp_ratios[(c["k"], c["ep"], mode)] = ratio
            rows.append([str(c["k"]), str(c["ep"]), mode, f"{ct * 1e3:.1f}",
                         "n/a" if rt is None else f"{rt * 1e3:.1f}", _fmt_ratio(ct / rt if rt else None),
                         "n/a" if floor_t is None else f"{floor_t * 1e3:.1f}", _fmt_ratio(ratio), ""])
    out.append("\n3. competition step vs router step and vs its floor (forward_all fwd+bwd on the EP group's "
               "tokens, no communication, no top-K)")
    out.append(_table(["K", "EP", "gather", "comp ms", "router ms", "comp/router", "floor ms", "comp/floor",
                       "note"], rows))

    # 4. bytes
    rows = []
    for per_rank in cells:
        c = per_rank[0]
        for name in sorted({n for r in per_rank for n in r["comm"]}, key=lambda n: (n != "ours", n)):
            totals = [r["comm"].get(name, {}).get("total") for r in per_rank]
            detail = per_rank[0]["comm"][name]["by_collective"]
            parts = ", ".join(f"{k} x{n} {b / 2**20:.2f}" for k, (n, b) in detail.items()) or "none"
            own = per_rank[0]["comm"][name]["dispatcher_counters"]
            own_total = sum(own.values()) if own else None
            est = f"{c['ds_estimate'] / 2**20:.2f}" if name == "deepspeed" else ""
            rows.append([str(c["k"]), str(c["ep"]), name, " / ".join(_mb(x) for x in totals),
                         "" if own_total is None else _mb(own_total), est, parts])
    out.append("\n4. bytes sent to other ranks per fwd+bwd step, MiB (measured: every c10d collective of one step "
               "seen by a TorchDispatchMode; per rank)")
    out.append(_table(["K", "EP", "variant", "rank0 / rank1 ...", "dispatcher counter", "DS estimate",
                       "rank 0 by collective (calls, MiB)"], rows))
    out.append("   DS estimate = 4 all-to-alls x E x C x d x 4 B x (P-1)/P (its capacity-padded dispatch tensor)")

    # 5. memory
    rows, mem_ratios, recompute_mem_ratios = [], {}, {}
    for per_rank in cells:
        c = per_rank[0]
        names = ["ours", "ours:recompute", "deepspeed"] + [f"competition:{m}" for m in c["modes"]]
        worst = {n: max((r["memory"].get(n) or 0 for r in per_rank), default=0) or None for n in names}
        ratio = worst["ours"] / worst["deepspeed"] if worst["ours"] and worst["deepspeed"] else None
        mem_ratios[(c["k"], c["ep"])] = ratio
        recompute_ratio = (worst["ours:recompute"] / worst["deepspeed"]
                           if worst["ours:recompute"] and worst["deepspeed"] else None)
        recompute_mem_ratios[(c["k"], c["ep"])] = recompute_ratio
        rows.append([str(c["k"]), str(c["ep"]), _mb(worst["ours"]), _mb(worst["ours:recompute"]),
                     _mb(worst["deepspeed"]), _fmt_ratio(ratio), _fmt_ratio(recompute_ratio),
                     "  ".join(f"{m} {_mb(worst[f'competition:{m}'])}" for m in c["modes"])])
    out.append("\n5. peak memory of one fwd+bwd step, MiB, largest rank (live tensors allocated during the step, "
               "incl. gradients; tracked by torch.distributed._tools.mem_tracker.MemTracker; parameters and "
               "input excluded; gloo buffers not seen)")
    out.append(_table(["K", "EP", "ours", "ours recompute", "DeepSpeed", "ours/DS", "recompute/DS",
                       "competition step"], rows))

    errors = {(c["k"], c["ep"], n): e for r in results for c in r["cells"] for n, e in c["errors"].items()}
    if errors:
        out.append("\nerrors (variant dropped):")
        for (k, ep, name), e in sorted(errors.items()):
            out.append(f"  K {k} EP {ep} {name}: {e}")

    # summary
    def verdict(values, ok):
        vals = [v for v in values if v is not None]
        if not vals or len(vals) < len(values):
            return "not reached (not all measured)" if vals else "not measured"
        return "reached" if all(ok(v) for v in vals) else "not reached"

    out.append("\ntargets:")
    for k in opts.top_k:
        vals = [speedups.get((k, ep)) for ep in opts.ep]
        figs = ", ".join(f"EP {ep} {_fmt_ratio(v)}" for ep, v in zip(opts.ep, vals))
        out.append(f"  ours >= {TARGET_SPEEDUP}x DeepSpeed tokens/s at K {k}: {figs} -> "
                   f"{verdict(vals, lambda v: v >= TARGET_SPEEDUP)}")
    vals = [efficiencies.get((k, ep)) for ep in opts.ep for k in opts.top_k]
    figs = ", ".join(f"K {k} EP {ep} {'n/a' if efficiencies.get((k, ep)) is None else f'{efficiencies[(k, ep)]:.0%}'}"
                     for ep in opts.ep for k in opts.top_k)
    out.append(f"  expert work >= {TARGET_EXPERT_EFFICIENCY:.0%} of the dense matmul rate: {figs} -> "
               f"{verdict(vals, lambda v: v >= TARGET_EXPERT_EFFICIENCY)}")
    keys = sorted((key for key in comp_ratios if not key[2].endswith("+recompute")),  # the floor keeps its hidden
                  key=lambda key: (key[1], key[0], key[2]))
    figs = ", ".join(f"K {k} EP {ep} {mode} {_fmt_ratio(comp_ratios[(k, ep, mode)])}" for k, ep, mode in keys)
    best = []
    for ep in opts.ep:
        for k in opts.top_k:
            cands = [comp_ratios[key] for key in keys if key[:2] == (k, ep) and comp_ratios[key] is not None]
            best.append(min(cands) if cands else None)
    out.append(f"  competition step <= {TARGET_COMPETITION_OVER_FLOOR}x its floor: {figs} -> "
               f"{verdict(best, lambda v: v <= TARGET_COMPETITION_OVER_FLOOR)} (best gather mode per cell)")
    vals = [mem_ratios.get((k, ep)) for ep in opts.ep for k in opts.top_k]
    figs = ", ".join(f"K {k} EP {ep} {_fmt_ratio(mem_ratios.get((k, ep)))}" for ep in opts.ep for k in opts.top_k)
    out.append(f"  our peak memory <= {TARGET_MEMORY_RATIO}x DeepSpeed's: {figs} -> "
               f"{verdict(vals, lambda v: v <= TARGET_MEMORY_RATIO)}")
    vals = [recompute_mem_ratios.get((k, ep)) for ep in opts.ep for k in opts.top_k]
    figs = ", ".join(f"K {k} EP {ep} {_fmt_ratio(recompute_mem_ratios.get((k, ep)))}"
                     for ep in opts.ep for k in opts.top_k)
    out.append(f"    with the experts recomputed: {figs} -> {verdict(vals, lambda v: v <= TARGET_MEMORY_RATIO)}")
    for ep in opts.ep:
        if ep < 2:
            continue
        for k in opts.top_k:
            s, o_ = comp_ratios.get((k, ep, "scores")), comp_ratios.get((k, ep, "outputs"))
            if s is not None and o_ is not None:
                out.append(f"  cheaper competition gather at K {k} EP {ep}: {'scores' if s <= o_ else 'outputs'} "
                           f"({_fmt_ratio(s)} vs {_fmt_ratio(o_)} of the floor)")
    out.append(f"(benchmark wall time {wall:.0f} s)")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
