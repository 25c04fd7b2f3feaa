"""The MoE-layer benchmark on each rank: for every (EP size, top-K) cell, our layer (and its twin that
recomputes the experts' hidden layers), DeepSpeed's layer with the same weights, the competition step,
its FLOP floor and dense references of the same size; each variant tried once (bytes counted, outputs
compared), then timed interleaved, then its peak memory taken.

Shape legend: T tokens per rank, D d_model, H expert hidden, E experts, e local experts, G the EP
group's tokens, N rows routed to this rank's experts.
"""

from __future__ import annotations

import math
import os
from types import SimpleNamespace
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from competesmoe.experiments.bench.comm_counter import CommCounter
from competesmoe.experiments.bench.host_syncs import HostSyncCounter
from competesmoe.experiments.bench.measure import agree, first_error_line, machine, peak_step_bytes, time_variants

_TRIED = ("ours", "deepspeed", "competition")
"""Variants of a whole layer step: tried once (bytes, outputs), their memory measured."""
_EXPENSIVE = ("competition", "floor")
"""Variants ~10x a router step: one warm-up and --competition-iters."""


def run_ranks(opts: SimpleNamespace) -> list[dict]:
    """Every rank's measurements, in rank order (raises RankFailed / RankTimeout)."""
    from competesmoe.parallel.ranks import run_on_ranks

    # DeepSpeed's CPU accelerator, without its warning.
    return run_on_ranks(_bench_rank, opts.nproc, args=(opts,), timeout=opts.timeout, threads=opts.threads,
                        env={"DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")})


def _bench_rank(rank: int, world: int, opts: SimpleNamespace) -> dict:
    init_deepspeed_comm()
    cells = [LayerCell(rank, opts, ep, k).measure() for ep in opts.ep for k in opts.top_k]
    return {"rank": rank, "machine": machine(), "cells": cells}


def init_deepspeed_comm() -> None:
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


def our_layer(cfg, d_model: int, groups, ep: int, activation_checkpointing: str):
    """Our layer as the parallelize step leaves it in a model: built from one seed (the same weights on every
    rank, as the model is built), its experts sharded over EP, activation checkpointing applied."""
    from competesmoe.moe.layer import MoELayer
    from competesmoe.parallel.parallelize import shard_experts

    torch.manual_seed(1234)
    layer = MoELayer(cfg, d_model).train()
    if ep > 1:
        shard_experts(layer, groups, cfg.competition.gather)
    layer.experts.recompute_hidden = activation_checkpointing == "experts"
    return layer


class LayerCell:
    """One (EP size, top-K) cell on this rank. Building it draws the weights and inputs (the same
    draws in the same order on every run); `measure()` returns the cell's figures."""

    def __init__(self, rank: int, opts: SimpleNamespace, ep: int, k: int):
        from competesmoe.parallel.groups import build_groups

        self.rank, self.opts, self.ep, self.k = rank, opts, ep, k
        self.groups = build_groups(ep)
        self.ours, self.ours_recompute, self.dispatchers = self._build_ours()
        self.padded = opts.ds_capacity_factor is not None
        self.ds_factor = 1.0 if not self.padded else \
            opts.experts / k if opts.ds_capacity_factor == "E/K" else opts.ds_capacity_factor
        self.ds = self._build_deepspeed()
        self.gen = torch.Generator().manual_seed(100 + rank)
        self.x = torch.randn(1, opts.tokens, opts.d_model, generator=self.gen).requires_grad_(True)
        self.probe = torch.randn(1, opts.tokens, opts.d_model, generator=self.gen)

    # building --------------------------------------------------------------------------------
    def _build_ours(self):
        """Our layer, dropless router step; a twin with the same weights recomputes the experts' hidden
        layers; the transports to compare (EP > 1: both competition gather modes)."""
        from competesmoe.moe.config import MoEConfig

        o = self.opts
        cfg = MoEConfig(num_experts=o.experts, top_k=self.k, expert_hidden=o.hidden, activation="gelu",
                        router="competesmoe", capacity_factor=0.0)
        cfg.competition.gather = "scores"
        ours = our_layer(cfg, o.d_model, self.groups, self.ep, "none")
        ours_recompute = our_layer(cfg, o.d_model, self.groups, self.ep, "experts")
        dispatchers = {"local": ours.dispatcher}
        if self.ep > 1:
            from competesmoe.parallel.expert_parallel import AllToAllDispatcher

            dispatchers = {"scores": ours.dispatcher, "outputs": AllToAllDispatcher(o.experts, self.groups, "outputs")}
        return ours, ours_recompute, dispatchers

    def _build_deepspeed(self):
        """DeepSpeed's layer with our gate and experts (its local experts are global
        [ep_rank * e, (ep_rank + 1) * e), as ours)."""
        from deepspeed.moe.layer import MoE

        o = self.opts
        D, H = o.d_model, o.hidden
        expert = nn.Sequential(nn.Linear(D, H, bias=False), nn.GELU(), nn.Linear(H, D, bias=False))
        ds = MoE(hidden_size=D, expert=expert, num_experts=o.experts, ep_size=self.ep, k=self.k,
                 capacity_factor=self.ds_factor, eval_capacity_factor=self.ds_factor, min_capacity=0,
                 drop_tokens=self.padded, use_rts=False, noisy_gate_policy=None,
                 top2_2nd_expert_sampling=False).train()
        ds.set_deepspeed_parallelism()
        with torch.no_grad():
            ds.deepspeed_moe.gate.wg.weight.copy_(self.ours.router.weight_ED)
            for j, mod in enumerate(ds.deepspeed_moe.experts.deepspeed_experts):
                mod[0].weight.copy_(self.ours.experts.w_in_EDF[j].t())
                mod[2].weight.copy_(self.ours.experts.w_out_EFD[j].t())
        return ds

    # the variants ----------------------------------------------------------------------------
    def _our_step(self, layer, compete: bool = False, dispatcher=None) -> Callable:
        """fwd+bwd of one of our layers (over `dispatcher` when given), loss = sum(y * probe) + aux."""
        x, probe = self.x, self.probe

        def step():
            if dispatcher is not None:
                layer.dispatcher = dispatcher
            layer.zero_grad(set_to_none=True)
            x.grad = None
            y, aux = layer(x, compete=compete)
            ((y * probe).sum() + aux.loss).backward()
            return y
        return step

    def _deepspeed_step(self) -> Callable:
        ds, x, probe = self.ds, self.x, self.probe

        def step():
            ds.zero_grad(set_to_none=True)
            x.grad = None
            y, l_aux, _ = ds(x)
            ((y * probe).sum() + 0.01 * l_aux).backward()
            return y
        return step

    @property
    def recompute_mode(self) -> str:
        return f"{next(iter(self.dispatchers))}+recompute"  # the twin competes with the default gather

    def _layer_variants(self) -> dict[str, Callable]:
        router_dispatcher = next(iter(self.dispatchers.values()))
        variants = {"ours": self._our_step(self.ours, dispatcher=router_dispatcher),
                    "ours:recompute": self._our_step(self.ours_recompute),
                    "deepspeed": self._deepspeed_step()}
        for mode, dispatcher in self.dispatchers.items():
            variants[f"competition:{mode}"] = self._our_step(self.ours, compete=True, dispatcher=dispatcher)
        variants[f"competition:{self.recompute_mode}"] = self._our_step(self.ours_recompute, compete=True)
        return variants

    def _floor(self) -> Callable:
        """The competition's floor: local experts on the EP group's tokens, fwd+bwd, nothing else."""
        o, experts = self.opts, self.ours.experts
        x_GD = torch.randn(self.ep * o.tokens, o.d_model, generator=self.gen).requires_grad_(True)
        probe_eGD = torch.randn(o.experts // self.ep, self.ep * o.tokens, o.d_model, generator=self.gen)

        def floor():
            experts.zero_grad(set_to_none=True)
            x_GD.grad = None
            (experts.forward_all(x_GD) * probe_eGD).sum().backward()
        return floor

    @torch.no_grad()
    def _routed_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows the router step sends to this rank's experts, and their count per local expert (counts_e)."""
        from competesmoe.moe.routing import RoutingContext

        x_TD = self.x.detach().reshape(self.opts.tokens, self.opts.d_model)
        experts_TK = self.ours.route(x_TD, RoutingContext()).experts_TK  # the router step's choice
        router_dispatcher = next(iter(self.dispatchers.values()))
        x_ND, meta = router_dispatcher.dispatch(x_TD, experts_TK)
        return x_ND, meta.counts_e

    def _expert_block(self, x_ND: torch.Tensor, counts_e: torch.Tensor) -> Callable:
        """Our GroupedExperts alone, fwd+bwd, on the routed rows."""
        experts = self.ours.experts
        x_ND = x_ND.clone().requires_grad_(True)
        probe_ND = torch.randn(x_ND.shape[0], self.opts.d_model, generator=self.gen)

        def expert_block():
            experts.zero_grad(set_to_none=True)
            x_ND.grad = None
            (experts(x_ND, counts_e) * probe_ND).sum().backward()
        return expert_block

    def _dense_references(self, rows: int) -> dict[str, Callable]:
        """Dense references of the same total size: one "expert" holding all `rows` rows: the six matmuls
        alone, and one GELU FFN through autograd."""
        D, H, gen = self.opts.d_model, self.opts.hidden, self.gen
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
        return {"dense_matmul": dense_matmul, "dense_ffn": dense_ffn}

    # measuring -------------------------------------------------------------------------------
    def measure(self) -> dict:
        variants = self._layer_variants()
        variants["floor"] = self._floor()
        x_ND, counts_e = self._routed_rows()
        counts, rows = counts_e.tolist(), x_ND.shape[0]
        variants["expert_block"] = self._expert_block(x_ND, counts_e)
        variants.update(self._dense_references(rows))

        errors, comm, outputs = self._try_each(variants)
        capacity, dropped = self._deepspeed_capacity()
        match, match_scale = self._compare_outputs(outputs, errors)
        o = self.opts
        plan = {n: (min(o.warmup, 1), o.competition_iters) if n.startswith(_EXPENSIVE) else (o.warmup, o.iters)
                for n in variants}
        timings = time_variants(variants, plan, o.clock)
        memory = self._peak_memory(variants, errors)

        D, H, E, T, ep = o.d_model, o.hidden, o.experts, o.tokens, self.ep
        return {"rank": self.rank, "ep": ep, "k": self.k, "rows": rows, "counts": counts, "capacity": capacity,
                "ds_dropped": dropped, "ds_estimate": 4 * E * capacity * D * 4 * (ep - 1) // ep,
                "timings": timings, "comm": comm, "memory": memory, "errors": errors,
                "expert_flops": 6 * rows * 2 * D * H,  # fwd + 2 bwd products of both expert matmuls
                "floor_flops": 6 * (E // ep) * ep * T * 2 * D * H,
                "match": match, "match_scale": match_scale, "modes": [*self.dispatchers, self.recompute_mode]}

    def _try_each(self, variants: dict[str, Callable]) -> tuple[dict, dict, dict]:
        """One trial step of each layer variant with the communication and the device-to-host transfers counted
        (all ranks agree to drop a variant that failed anywhere): errors, bytes (and host syncs) and outputs by
        variant."""
        errors, comm, outputs = {}, {}, {}
        for name in [n for n in variants if n.startswith(_TRIED)]:
            counter = CommCounter()
            for d in self.dispatchers.values():
                if hasattr(d, "comm_bytes"):
                    d.comm_bytes.clear()
            try:
                with counter, HostSyncCounter() as syncs:
                    y = variants[name]()
                outputs[name] = y.detach()
                ok, err = True, None
            except Exception as exc:  # reported, not raised: the other variants still run
                ok, err = False, first_error_line(exc)
            if not agree(ok):
                errors[name] = err or "failed on another rank"
                del variants[name]
                continue
            comm[name] = {"total": counter.total(), "by_collective": counter.summary(),
                          "dispatcher_counters": self._dispatcher_counters(), "host_syncs": syncs.count}
        return errors, comm, outputs

    def _dispatcher_counters(self) -> dict[str, int]:
        """Our dispatchers' own byte counters (non-zero ones) for the step just run."""
        own = {}
        for d in self.dispatchers.values():
            own.update({key: v for key, v in getattr(d, "comm_bytes", {}).items() if v})
        return own

    def _deepspeed_capacity(self) -> tuple[int, int]:
        """DeepSpeed's capacity (dropless: the largest expert load in the EP group; padded: its formula,
        sharded_moe._capacity with factor F * K) and the assignments it dropped, in its last step."""
        o, k = self.opts, self.k
        counts_ds = self.ds.deepspeed_moe.exp_counts.detach().clone().to(torch.int64)
        if self.padded:
            capacity = max(math.ceil(o.tokens / o.experts * self.ds_factor * k), 0)
        else:
            group_max = counts_ds.clone()
            if self.ep > 1:
                dist.all_reduce(group_max, op=dist.ReduceOp.MAX, group=self.groups.ep)
            capacity = int(group_max.max())
            if k == 1:
                capacity = min(capacity, o.tokens)
        return capacity, int((counts_ds - capacity).clamp_min(0).sum())

    @staticmethod
    def _compare_outputs(outputs: dict, errors: dict) -> tuple[float | None, float | None]:
        """Largest |ours - DeepSpeed| and DeepSpeed's largest |y|; the recomputing twin must equal ours."""
        match = match_scale = None
        if "ours" in outputs and "deepspeed" in outputs:
            match = float((outputs["ours"] - outputs["deepspeed"]).abs().max())
            match_scale = float(outputs["deepspeed"].abs().max())
        if "ours" in outputs and "ours:recompute" in outputs and not torch.equal(outputs["ours"],
                                                                                 outputs["ours:recompute"]):
            errors["ours:recompute"] = "its output differs from ours without recomputation"
        return match, match_scale

    @staticmethod
    def _peak_memory(variants: dict[str, Callable], errors: dict) -> dict[str, int | None]:
        memory = {}
        for name in [n for n in variants if n.startswith(_TRIED)]:
            try:
                memory[name], err = peak_step_bytes(variants[name]), None
            except Exception as exc:
                memory[name], err = None, first_error_line(exc)
            if not agree(err is None):
                memory[name] = None
                errors[f"memory:{name}"] = err or "failed on another rank"
        return memory
