"""`competesmoe plan CONFIG --gpus N`: every layout a cluster allows for a config, before the job starts.

For each expert-parallel size that divides both the experts and the GPUs, and each ZeRO stage 0/1/2: the memory
one rank holds (weights, gradients, Adam states, the activations of a router step, the extra of a competing layer,
the peak with `moe.competition.cap` layers competing), the bytes of each collective per optimizer step (split
inside / across nodes), the FLOPs, and a step's time with nothing overlapped (what the code does today) and with
everything overlapped (the bound); then a recommendation and the warnings: EP spanning nodes, a competing layer
or a router step bound by communication, memory that does not fit. Every figure comes from parallel/cost.py and
moe/flops.py, whose byte counts, FLOPs and activation memory tests/test_cost.py checks against the code's own
collectives, torch's FlopCounterMode and its MemTracker. The hardware figures are named with their sources.

    competesmoe plan configs/v2-pretrain.yaml [key=value ...] --gpus 64 [--gpus-per-node 8] [--gpu h100]
                     [--format json]

(config overrides come before the options).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

from competesmoe.common.errors import UserError
from competesmoe.common.options import integer, number
from competesmoe.common.table import text_table
from competesmoe.launcher.config import Config, load_config
from competesmoe.launcher.hardware import GPUS
from competesmoe.moe.flops import training_flops_per_token
from competesmoe.parallel import cost

GiB, MiB = 2**30, 2**20
DEFAULT_MFU = 0.5
MFU_SOURCE = ("assumption: half the peak (small d_model runs lower); pass --mfu with the `mfu` a run of this "
              "config reports in metrics.jsonl")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config, e.g. configs/v2-pretrain.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.micro_batch_size=4")
    parser.add_argument("--gpus", type=integer(1), required=True, help="GPUs in the job (the world size)")
    parser.add_argument("--gpus-per-node", type=integer(1), default=8, help="GPUs per node (default 8)")
    parser.add_argument("--gpu", choices=sorted(GPUS), default="h100",
                        help="the GPU whose figures are the defaults of the next four options (default h100)")
    parser.add_argument("--gpu-memory", type=number(0, low_open=True), default=None, metavar="GiB", help="usable memory per GPU")
    parser.add_argument("--intra-node-GBps", type=number(0, low_open=True), default=None, metavar="GB/s",
                        help="bandwidth a GPU sends at to GPUs of its node (NVLink, one direction)")
    parser.add_argument("--inter-node-GBps", type=number(0, low_open=True), default=None, metavar="GB/s",
                        help="bandwidth a GPU sends at to other nodes (its network link, one direction)")
    parser.add_argument("--peak-tflops", type=number(0, low_open=True), default=None, metavar="TFLOP/s",
                        help="dense matmul peak per GPU in the config's train.precision")
    parser.add_argument("--mfu", type=number(0, 1, low_open=True), default=DEFAULT_MFU,
                        help=f"share of the peak the compute reaches (default {DEFAULT_MFU})")
    parser.add_argument("--vocab-size", type=integer(1), default=None,
                        help="vocabulary size (default: 256 for the byte tokenizer, data.vocab_size for sentencepiece)")
    parser.add_argument("--format", choices=["text", "json"], default="text")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    result = make_plan(cfg, args)
    print(json.dumps(result, indent=2) if args.format == "json" else render(result))
    return 0


# ------------------------------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Figure:
    value: float
    source: str


def hardware_figures(args: argparse.Namespace, precision: str) -> dict[str, Figure]:
    """Memory, peak, both bandwidths and the MFU: the option where given, else the --gpu table, with sources."""
    spec = GPUS[args.gpu]

    def pick(option: str, table_value: float, field: str, flag: str) -> Figure:
        given = getattr(args, option)
        if given is not None:
            return Figure(given, f"{flag}")
        return Figure(table_value, f"--gpu {args.gpu}: {spec.sources[field]}")

    figures = {"memory_gib": pick("gpu_memory", spec.memory_gib, "memory_gib", "--gpu-memory"),
               "peak_tflops": pick("peak_tflops", spec.peak_tflops[precision], "peak_tflops", "--peak-tflops"),
               "intra_node_GBps": pick("intra_node_GBps", spec.intra_node_GBps, "intra_node_GBps", "--intra-node-GBps"),
               "inter_node_GBps": pick("inter_node_GBps", spec.inter_node_GBps, "inter_node_GBps", "--inter-node-GBps"),
               "mfu": Figure(args.mfu, "--mfu" if args.mfu != DEFAULT_MFU else MFU_SOURCE)}
    return figures  # each option's range is checked as it is parsed (add_arguments)


def check_cluster(args: argparse.Namespace) -> int:
    """GPUs per node as the layout sees it (a job smaller than a node sits in one)."""
    if args.gpus > args.gpus_per_node and args.gpus % args.gpus_per_node:
        raise UserError(f"--gpus {args.gpus} is not a whole number of {args.gpus_per_node}-GPU nodes; pass a multiple "
                        f"of --gpus-per-node")
    return min(args.gpus, args.gpus_per_node)


def vocab_size(cfg: Config, given: int | None) -> int:
    if given is not None:
        return given
    if cfg.data.tokenizer == "byte":
        from competesmoe.data.tokenizer import ByteTokenizer

        return ByteTokenizer(with_eod=cfg.data.inputs is not None).vocab_size
    return cfg.data.vocab_size


def workload(cfg: Config, vocab: int) -> cost.Workload:
    t = cfg.train
    return cost.Workload(cfg.model, cfg.moe, vocab, t.micro_batch_size, t.grad_accum, t.precision,
                         cfg.parallel.activation_checkpointing)


def peak_competing_layers(cfg: Config, moe_layers: int) -> int:
    """The most MoE layers that compete in one step (moe.competition.cap; none for a policy without competition)."""
    return min(cfg.moe.competition.cap, moe_layers) if cfg.moe.competes else 0


def mean_competing_layers(cfg: Config, moe_layers: int) -> float:
    """Competing layers in a mean step of the run: the schedule keeps rate x layers after warm-up (a step's
    surplus over the cap moves to another step), none before."""
    comp = cfg.moe.competition
    if not cfg.moe.competes or moe_layers == 0:
        return 0.0
    return (1 - comp.warmup) * min(comp.rate * moe_layers, comp.cap)


# --------------------------------------------------------------------------------------------------- plan


def make_plan(cfg: Config, args: argparse.Namespace) -> dict:
    gpus_per_node = check_cluster(args)
    vocab = vocab_size(cfg, args.vocab_size)
    w = workload(cfg, vocab)
    figures = hardware_figures(args, w.precision)
    hw = cost.Hardware(peak_flops=figures["peak_tflops"].value * 1e12, mfu=figures["mfu"].value,
                       intra_node_Bps=figures["intra_node_GBps"].value * 1e9,
                       inter_node_Bps=figures["inter_node_GBps"].value * 1e9)
    params = cost.param_counts(cfg.model, cfg.moe, vocab)
    cap = peak_competing_layers(cfg, w.moe_layers)
    steps = {"router": 0.0, "mean": mean_competing_layers(cfg, w.moe_layers), "competition": float(cap)}
    memory_limit = figures["memory_gib"].value * GiB
    layouts = [describe_layout(w, cost.Layout(args.gpus, ep, zero, gpus_per_node), params, hw, steps, cap, memory_limit)
               for ep in ep_sizes(cfg.moe.num_experts, args.gpus) for zero in cost.ZERO_STAGES]
    return {
        "config": args.config,
        "gpus": args.gpus, "gpus_per_node": args.gpus_per_node, "nodes": max(1, args.gpus // args.gpus_per_node),
        "hardware": {name: {"value": f.value, "source": f.source} for name, f in figures.items()},
        "model": model_summary(cfg, w, params, vocab),
        "competing_layers": steps,
        "layouts": layouts,
        "recommended": recommend(layouts),
    }


def ep_sizes(num_experts: int, gpus: int) -> list[int]:
    return [p for p in range(1, min(num_experts, gpus) + 1) if num_experts % p == 0 and gpus % p == 0]


def model_summary(cfg: Config, w: cost.Workload, params: cost.ParamCounts, vocab: int) -> dict:
    router_step = training_flops_per_token(cfg.model, cfg.moe, vocab)
    active_experts = params.experts * cfg.moe.top_k / cfg.moe.num_experts
    return {
        "dense_params": params.dense, "expert_params": params.experts,
        "active_params_per_token": params.dense + active_experts,
        "vocab_size": vocab, "moe_layers": w.moe_layers,
        "tokens_per_rank_per_step": w.tokens * w.grad_accum, "micro_batches": w.grad_accum, "precision": w.precision,
        "activation_checkpointing": w.activation_checkpointing, "gather": cfg.moe.competition.gather,
        "model_flops_per_token": {
            "router_step": router_step,
            "per_competing_layer": training_flops_per_token(cfg.model, cfg.moe, vocab, 1) - router_step},
    }


def describe_layout(w: cost.Workload, layout: cost.Layout, params: cost.ParamCounts, hw: cost.Hardware,
                    steps: dict[str, float], cap: int, memory_limit: float) -> dict:
    mem = cost.memory(w, layout, params)
    peak = mem.peak(cap)
    estimates = {name: cost.estimate_step(w, layout, params, hw, layers) for name, layers in steps.items()}
    router_comm = sum(cost.collective_seconds(c, layout, hw) for c in cost.router_step_collectives(w, layout))
    router_compute = estimates["router"].compute_s / (w.grad_accum * max(w.moe_layers, 1))
    comp_compute, comp_comm = cost.competing_layer_seconds(w, layout, hw)
    out = {
        "ep": layout.ep, "zero_stage": layout.zero_stage,
        "memory_gib": {"weights": mem.weights / GiB, "gradients": mem.gradients / GiB, "optimizer": mem.optimizer / GiB,
                       "activations_router_step": mem.activations.peak(0) / GiB,
                       "activations_per_competing_layer": (mem.activations.peak(1) - mem.activations.peak(0)) / GiB,
                       "peak_router_step": mem.peak(0) / GiB, "peak_competition_step": peak / GiB,
                       "fits": peak <= memory_limit},
        "steps": {name: step_summary(e, layout) for name, e in estimates.items()},
        "router_layer_ms": {"compute": router_compute * 1e3, "communication": router_comm * 1e3},
        "competing_layer_ms": {"compute": comp_compute * 1e3, "communication": comp_comm * 1e3},
        "ep_spans_nodes": layout.spans_nodes("ep"),
    }
    out["warnings"] = layout_warnings(out, memory_limit, cap)
    return out


def step_summary(e: cost.StepEstimate, layout: cost.Layout) -> dict:
    collectives = []
    for c in e.collectives:
        intra, inter = cost.split_bytes(c, layout)
        collectives.append({"name": c.name, "kind": c.kind, "group": c.group, "group_size": layout.group_size(c.group),
                            "calls": c.calls, "bytes": c.total,
                            "intra_node_bytes": intra * c.calls, "inter_node_bytes": inter * c.calls})
    return {"competing_layers": e.competing_layers, "flops": e.flops, "compute_ms": e.compute_s * 1e3,
            "communication_ms": e.comm_s * 1e3, "serial_ms": e.serial_s * 1e3, "overlapped_ms": e.overlapped_s * 1e3,
            "compute_share": e.compute_s / e.serial_s if e.serial_s else 1.0, "collectives": collectives}


def layout_warnings(layout: dict, memory_limit: float, cap: int) -> list[str]:
    """Memory is the layout's; the rest belongs to its EP size (the same words at every ZeRO stage)."""
    where = f"EP {layout['ep']}"
    out = []
    mem = layout["memory_gib"]
    if not mem["fits"]:
        out.append(f"{where} ZeRO {layout['zero_stage']}: does not fit: peak {mem['peak_competition_step']:.1f} GiB > "
                   f"{memory_limit / GiB:.1f} GiB")
    if layout["ep_spans_nodes"]:
        out.append(f"{where}: EP spans nodes: its all-to-alls cross the network")
    router, comp = layout["router_layer_ms"], layout["competing_layer_ms"]
    if router["communication"] > router["compute"]:
        out.append(f"{where}: a router step's all-to-alls ({router['communication']:.2f} ms per layer) take longer "
                   f"than its block's compute ({router['compute']:.2f} ms)")
    if cap and comp["communication"] > comp["compute"]:
        out.append(f"{where}: a competition step is communication-bound: its gathers take {comp['communication']:.2f} "
                   f"ms per layer, its compute {comp['compute']:.2f} ms")
    return out


def recommend(layouts: list[dict]) -> dict:
    """The fastest mean step (nothing overlapped: what the code does today) among the layouts that fit; within 1%,
    the lower ZeRO stage (less to gather), then the smaller EP (fewer all-to-alls)."""
    fitting = [lay for lay in layouts if lay["memory_gib"]["fits"]]
    if not fitting:
        return {"ep": None, "zero_stage": None,
                "why": "no layout fits in memory: use activation checkpointing, a smaller micro-batch or more GPUs"}
    fastest = min(lay["steps"]["mean"]["serial_ms"] for lay in fitting)
    near = [lay for lay in fitting if lay["steps"]["mean"]["serial_ms"] <= fastest * 1.01]
    best = min(near, key=lambda lay: (lay["zero_stage"], lay["ep"]))
    mean = best["steps"]["mean"]
    return {"ep": best["ep"], "zero_stage": best["zero_stage"],
            "why": f"the fastest mean step that fits ({mean['serial_ms']:.1f} ms with nothing overlapped, "
                   f"{mean['overlapped_ms']:.1f} ms overlapped; compute {mean['compute_share']:.0%} of it), "
                   f"lowest ZeRO stage and EP size among those within 1%"}


# ------------------------------------------------------------------------------------------------- output


def render(plan: dict) -> str:
    parts = [_header(plan), _memory_table(plan), _bytes_table(plan), _time_table(plan), _verdict(plan)]
    return "\n\n".join("\n".join(part) for part in parts)


def _header(plan: dict) -> list[str]:
    m, hw = plan["model"], plan["hardware"]
    flops = m["model_flops_per_token"]
    steps = plan["competing_layers"]
    return [
        f"competesmoe plan {plan['config']}: {plan['gpus']} GPUs, {plan['gpus_per_node']} per node ({plan['nodes']} "
        f"node(s))",
        f"model: {(m['dense_params'] + m['expert_params']) / 1e6:.1f} M parameters ({m['dense_params'] / 1e6:.1f} M "
        f"dense, {m['expert_params'] / 1e6:.1f} M in experts), {m['active_params_per_token'] / 1e6:.1f} M active per "
        f"token, vocabulary {m['vocab_size']}, {m['moe_layers']} MoE layers",
        f"step: {m['tokens_per_rank_per_step']} tokens per rank in {m['micro_batches']} micro-batch(es), "
        f"{m['precision']}, activation checkpointing {m['activation_checkpointing']}, competition gather "
        f"{m['gather']}; layers competing: {steps['mean']:.2f} in a mean step, {steps['competition']:.0f} at most",
        f"model FLOPs per token: {flops['router_step'] / 1e9:.3f} GFLOP on a router step, "
        f"+{flops['per_competing_layer'] / 1e9:.3f} per competing layer (forward + backward)",
        "hardware per GPU:",
        f"  memory {hw['memory_gib']['value']:g} GiB ({hw['memory_gib']['source']})",
        f"  peak {hw['peak_tflops']['value']:g} TFLOP/s {m['precision']} ({hw['peak_tflops']['source']})",
        f"  intra-node {hw['intra_node_GBps']['value']:g} GB/s ({hw['intra_node_GBps']['source']})",
        f"  inter-node {hw['inter_node_GBps']['value']:g} GB/s ({hw['inter_node_GBps']['source']})",
        f"  compute at {hw['mfu']['value']:g} of the peak ({hw['mfu']['source']})",
        "assumed: balanced routing (each expert gets T K / E of a rank's assignments); bandwidth only (no latency); "
        "an all-to-all's bytes to other nodes go over the network; a ring collective (all-reduce, all-gather) over m "
        "nodes sends m / n of its bytes over the network (NCCL: one ring per GPU's network link)",
    ]


def _memory_table(plan: dict) -> list[str]:
    rows = []
    for lay in plan["layouts"]:
        m = lay["memory_gib"]
        rows.append([str(lay["ep"]), str(lay["zero_stage"]), *(f"{m[k]:.2f}" for k in (
            "weights", "gradients", "optimizer", "activations_router_step", "activations_per_competing_layer",
            "peak_router_step", "peak_competition_step")), "yes" if m["fits"] else "NO"])
    cap = plan["competing_layers"]["competition"]
    return ["memory per rank, GiB (activations: one micro-batch, at their peak in backward)",
            text_table(["EP", "ZeRO", "weights", "grads", "Adam", "act router", "+competing layer", "peak router",
                        f"peak {cap:.0f} competing", "fits"], rows)]


BYTE_COLUMNS = {
    "dispatch+combine (router step)": ("router", ("dispatch", "combine")),
    "competition gathers (per layer)": ("per_layer", ("gather_",)),
    "grad all-reduce DP": ("router", ("grad.dense",)),
    "grad all-reduce EDP": ("router", ("grad.experts",)),
    "ZeRO 1/2 weight all-gather": ("router", ("params.",)),
}
"""Column -> (which step, prefixes of the collectives it sums)."""


def _bytes_table(plan: dict) -> list[str]:
    """Per EP size, the bytes of each family of collectives (the JSON output lists every collective)."""
    rows = []
    for lay in plan["layouts"]:
        if lay["zero_stage"] != 1:  # one row per EP size: ZeRO 0 and 2 move what ZeRO 1 moves, without / with gathers
            continue
        row = [str(lay["ep"])]
        for step, prefixes in BYTE_COLUMNS.values():
            chosen = [c for c in _step_collectives(lay, step) if c["name"].startswith(prefixes)]
            row.append(f"{sum(c['intra_node_bytes'] for c in chosen) / MiB:,.0f} / "
                       f"{sum(c['inter_node_bytes'] for c in chosen) / MiB:,.0f}")
        rows.append(row)
    return ["bytes each rank sends per optimizer step, MiB, intra-node / inter-node (forward and backward; the "
            "competition's per competing layer; ZeRO 0 has no weight all-gather; --format json lists every collective)",
            text_table(["EP", *BYTE_COLUMNS], rows)]


def _step_collectives(layout: dict, step: str) -> list[dict]:
    """The router step's collectives, or ('per_layer') one competing layer's: the competition step's divided by its
    competing layers."""
    if step == "router":
        return layout["steps"]["router"]["collectives"]
    competition = layout["steps"]["competition"]
    layers = competition["competing_layers"] or 1
    return [{**c, "intra_node_bytes": c["intra_node_bytes"] / layers,
             "inter_node_bytes": c["inter_node_bytes"] / layers} for c in competition["collectives"]]


def _time_table(plan: dict) -> list[str]:
    rows = []
    tokens = plan["model"]["tokens_per_rank_per_step"]
    for lay in plan["layouts"]:
        s = lay["steps"]
        mean = s["mean"]
        rows.append([str(lay["ep"]), str(lay["zero_stage"]), f"{mean['flops'] / 1e12:.2f}", f"{mean['compute_ms']:.1f}",
                     f"{mean['communication_ms']:.1f}", f"{s['router']['serial_ms']:.1f}", f"{mean['serial_ms']:.1f}",
                     f"{mean['overlapped_ms']:.1f}", f"{s['competition']['serial_ms']:.1f}",
                     f"{tokens / mean['serial_ms'] * 1e3:,.0f}", f"{mean['compute_share']:.0%}"])
    return ["step time per optimizer step, ms (serial: nothing overlapped, as the code runs today; overlapped: every "
            "collective hidden behind compute)",
            text_table(["EP", "ZeRO", "TFLOP mean", "compute", "comm", "router serial", "mean serial",
                        "mean overlapped", "competition serial", "tok/s/GPU", "compute share"], rows)]


def _verdict(plan: dict) -> list[str]:
    rec = plan["recommended"]
    out = ["warnings:"] + [f"  {w}" for w in dict.fromkeys(w for lay in plan["layouts"] for w in lay["warnings"])]
    if len(out) == 1:
        out.append("  none")
    if rec["ep"] is None:
        return [*out, f"recommended: none ({rec['why']})"]
    return [*out, f"recommended: parallel.expert_parallel_size={rec['ep']} train.zero_stage={rec['zero_stage']}: "
                  f"{rec['why']}"]
