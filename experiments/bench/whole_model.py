"""`competesmoe bench train`: our whole training step against the same model whose MoE layers are
`deepspeed.moe.layer.MoE`, on the ranks of one run.

Both models come from one seed: ours is a TransformerLM of the run's config, parallelized as the trainer does
(experts sharded over EP, activation checkpointing) in a DeepSpeed engine from make_engine; the other is a copy
whose MoE layers are DeepSpeed's (its gate and Linear-GELU-Linear experts hold our router and expert weights,
dropless: drop_tokens=False), in a DeepSpeed engine over DeepSpeed's own MoE parameter groups, with the same engine
config and AdamW. Both run router steps only (DeepSpeed has no competition step) on the same random tokens: forward,
backward, optimizer step.

Per model: the median step time (slowest rank, variants interleaved), tokens/s over all ranks, the peak of live
tensors allocated in one step (torch's MemTracker), and the share of the step spent in communication: the time
inside collectives (torch.distributed's calls and the waits of functional collectives, with waiting for a slower
rank included; a collective left running asynchronously is not counted) over the step time.

Shape legend: B micro-batch, S sequence, D d_model.
"""

from __future__ import annotations

import copy
import functools
import os
import time
from contextlib import ExitStack
from types import SimpleNamespace
from unittest import mock

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from competesmoe.experiments.bench.measure import machine, peak_step_bytes, time_variants
from competesmoe.experiments.bench.moe_layer import init_deepspeed_comm

VOCAB = 256
_TIMED_COLLECTIVES = ("all_reduce", "all_to_all_single", "all_gather_into_tensor", "reduce_scatter_tensor",
                      "broadcast", "all_gather", "reduce_scatter", "barrier", "all_to_all")
"""torch.distributed calls whose time counts as communication (DeepSpeed's and ours reach them by attribute)."""


def run_ranks(opts: SimpleNamespace) -> list[dict]:
    from competesmoe.parallel.ranks import run_on_ranks

    return run_on_ranks(_bench_rank, opts.nproc, args=(opts,), timeout=opts.timeout, threads=opts.threads,
                        env={"DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")})


def _bench_rank(rank: int, world: int, opts: SimpleNamespace) -> dict:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))  # as a launcher sets them
    init_deepspeed_comm()
    return {"rank": rank, "machine": machine(), "cells": [_measure(rank, opts, ep) for ep in opts.ep]}


# ---------------------------------------------------------------------------------------------
# The two models


class DeepSpeedMoEFFN(nn.Module):
    """deepspeed.moe.layer.MoE in the place of one of our MoE layers, holding its weights. Its balance loss is kept
    in `l_aux` for the step's loss (our layers' auxiliary losses are in theirs)."""

    def __init__(self, ours, d_model: int, ep: int, ep_rank: int):
        from deepspeed.moe.layer import MoE

        super().__init__()
        cfg, e = ours.cfg, ours.num_experts // ep
        expert = nn.Sequential(nn.Linear(d_model, cfg.expert_hidden, bias=False), nn.GELU(),
                               nn.Linear(cfg.expert_hidden, d_model, bias=False))
        self.moe = MoE(hidden_size=d_model, expert=expert, num_experts=ours.num_experts, ep_size=ep, k=ours.top_k,
                       capacity_factor=1.0, eval_capacity_factor=1.0, min_capacity=0, drop_tokens=False,
                       use_rts=False, noisy_gate_policy=None, top2_2nd_expert_sampling=False)
        with torch.no_grad():
            self.moe.deepspeed_moe.gate.wg.weight.copy_(ours.router.weight_ED)
            for j, mod in enumerate(self.moe.deepspeed_moe.experts.deepspeed_experts):
                mod[0].weight.copy_(ours.experts.w_in_EDF[ep_rank * e + j].t())
                mod[2].weight.copy_(ours.experts.w_out_EFD[ep_rank * e + j].t())
        self.l_aux = None

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        y_BSD, self.l_aux, _ = self.moe(x_BSD)
        return y_BSD


def build_models(cfg, groups, opts) -> tuple[nn.Module, nn.Module]:
    """(ours, DeepSpeed's) with the same weights, each in its DeepSpeed engine."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    from competesmoe.launcher.trainer import adamw_options, deepspeed_config
    from competesmoe.moe.model import TransformerLM
    from competesmoe.parallel.deepspeed.engine import make_engine
    from competesmoe.parallel.parallelize import parallelize

    torch.manual_seed(cfg.train.seed)
    with torch.device("cpu"):
        ours = TransformerLM(cfg.model, cfg.moe, vocab_size=VOCAB)
        theirs = copy.deepcopy(ours)
        for block in theirs.blocks:
            if block.is_moe:
                block.ffn = DeepSpeedMoEFFN(block.ffn, cfg.model.d_model, groups.ep_size, groups.ep_rank)
    ours = parallelize(ours, groups, activation_checkpointing=cfg.parallel.activation_checkpointing)
    ds_config = deepspeed_config(cfg)
    device = torch.device("cpu")

    def adamw(param_groups):
        return torch.optim.AdamW(param_groups, lr=cfg.train.lr, **adamw_options(cfg.train.optimizer_impl, device))

    our_engine, _, _ = make_engine(ours, ds_config, groups.ep_size, cfg.moe.num_experts, adamw)
    import deepspeed

    param_groups = split_params_into_different_moe_groups_for_optimizer(
        {"params": [p for p in theirs.parameters()], "name": "parameters"})
    their_engine, _, _, _ = deepspeed.initialize(model=theirs, optimizer=adamw(param_groups),
                                                 config=copy.deepcopy(ds_config))
    return our_engine, their_engine


def _step(engine, inputs_BS: torch.Tensor, targets_BS: torch.Tensor, aux_coef: float):
    def step():
        out = engine(inputs_BS, targets_BS)
        loss = out.loss + aux_coef * sum(m.l_aux for m in engine.module.modules() if isinstance(m, DeepSpeedMoEFFN))
        engine.backward(loss)
        engine.step()
    return step


# ---------------------------------------------------------------------------------------------
# Measuring


class CommTime(TorchDispatchMode):
    """Seconds spent inside collectives while active: torch.distributed's calls (patched by name, so DeepSpeed's and
    ours alike) and the functional collectives' ops (their waits block there), never counted twice when nested."""

    def __init__(self):
        super().__init__()
        self.seconds = 0.0
        self._depth = 0
        self._patches = ExitStack()

    def _timed(self, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            if self._depth:
                return fn(*args, **kwargs)
            self._depth += 1
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0
                self._depth -= 1
        return timed

    def __enter__(self):
        for name in _TIMED_COLLECTIVES:
            self._patches.enter_context(mock.patch.object(dist, name, self._timed(getattr(dist, name))))
        self._patches.enter_context(mock.patch.object(funcol, "wait_tensor", self._timed(funcol.wait_tensor)))
        return super().__enter__()

    def __exit__(self, *exc):
        self._patches.close()
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "_c10d_functional":
            return self._timed(func)(*args, **kwargs)
        return func(*args, **kwargs)


def _comm_share(step, iters: int) -> float:
    """Communication seconds over step seconds, over `iters` steps of this rank."""
    timer, elapsed = CommTime(), 0.0
    for _ in range(iters):
        dist.barrier()
        t0 = time.perf_counter()
        with timer:
            step()
        elapsed += time.perf_counter() - t0
    return timer.seconds / elapsed


def _measure(rank: int, opts: SimpleNamespace, ep: int) -> dict:
    from competesmoe.launcher.config import load_config
    from competesmoe.parallel.groups import build_groups

    cfg = load_config(opts.config, [*opts.overrides, f"parallel.expert_parallel_size={ep}", "moe.capacity_factor=0"])
    groups = build_groups(ep)
    ours, theirs = build_models(cfg, groups, opts)
    gen = torch.Generator().manual_seed(100 + rank)
    B, S = cfg.train.micro_batch_size, cfg.model.seq_len
    inputs_BS, targets_BS = (torch.randint(0, VOCAB, (B, S), generator=gen) for _ in range(2))
    with torch.no_grad():  # the same weights and data: the same LM loss before any step (up to the routers' sums)
        first_loss = {n: float(e(inputs_BS, targets_BS).lm_loss) for n, e in (("ours", ours), ("deepspeed", theirs))}
    aux = cfg.moe.balance_coef
    variants = {"ours": _step(ours, inputs_BS, targets_BS, aux), "deepspeed": _step(theirs, inputs_BS, targets_BS, aux)}
    timings = time_variants(variants, {n: (opts.warmup, opts.iters) for n in variants}, "wall")
    share = {n: _comm_share(step, opts.comm_iters) for n, step in variants.items()}
    memory = {n: peak_step_bytes(step) for n, step in variants.items()}
    return {"ep": ep, "tokens_per_step": B * S * dist.get_world_size(), "timings": timings, "comm_share": share,
            "memory": memory, "first_loss": first_loss, "moe_layers": len(ours.module.moe_layers), "experts": cfg.moe.num_experts,
            "top_k": cfg.moe.top_k}


def report(opts: SimpleNamespace, results: list[dict], wall: float) -> str:
    from competesmoe.common.table import text_table

    m = results[0]["machine"]
    rows, summary = [], []
    for i, ep in enumerate(opts.ep):
        per_rank = [r["cells"][i] for r in results]
        c = per_rank[0]
        tok_s = {n: c["tokens_per_step"] / c["timings"][n]["step"] for n in ("ours", "deepspeed")}
        peak = {n: max(r["memory"][n] or 0 for r in per_rank) for n in ("ours", "deepspeed")}
        for n in ("ours", "deepspeed"):
            shares = [r["comm_share"][n] for r in per_rank]
            rows.append([str(ep), n, f"{c['timings'][n]['step'] * 1e3:.1f}", f"{tok_s[n]:,.0f}",
                         f"{peak[n] / 2**20:.1f}", " / ".join(f"{s:.0%}" for s in shares)])
        summary.append(f"EP {ep}: ours/DeepSpeed tokens/s {tok_s['ours'] / tok_s['deepspeed']:.2f}x, "
                       f"peak memory {peak['ours'] / max(peak['deepspeed'], 1):.2f}x (LM loss before the first step, "
                       f"rank 0: ours {c['first_loss']['ours']:.6f}, DeepSpeed {c['first_loss']['deepspeed']:.6f})")
    return "\n".join([
        f"machine: {m['cpu_model']}, {m['cpus']} cores, {opts.nproc} gloo ranks x {opts.threads} thread(s); torch "
        f"{m['torch']}, deepspeed {m['deepspeed']}",
        f"model: {opts.config} {' '.join(opts.overrides)}; {c['moe_layers']} MoE layers of {c['experts']} experts, "
        f"top-{c['top_k']}, router steps, dropless; random tokens; median of {opts.iters} steps after {opts.warmup} "
        f"warm-up, interleaved, slowest rank; communication share over {opts.comm_iters} further steps",
        text_table(["EP", "model", "step ms", "tokens/s (all ranks)", "peak MiB (largest rank)",
                    "communication share rank0 / rank1 ..."], rows),
        "summary:", *(f"  {line}" for line in summary),
        f"(benchmark wall time {wall:.0f} s)"])
