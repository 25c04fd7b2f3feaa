"""A finished run of the grid, analysed: its metrics (BPC, step times with and without a competing layer)
and its checkpoint (test BPC with K experts at evaluation, router entropy and top-1 probability per
layer, the similarity of the experts' outputs, parameter counts), written to result.json.

Shape legend: T tokens, D d_model, E experts, G tokens every expert answers.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from competesmoe.experiments.repro.grid import RESULT, Run
from competesmoe.launcher.evaluate import LoadedRun, load_run, score
from competesmoe.moe.routing import RoutingContext

SKIP_STEPS = 10  # first steps left out of the timing medians (allocation, warm caches)
ENTROPY_BINS = 40
PROB_BINS = 40


def analyse(run: Run, wall_s: float) -> dict:
    """Read the run's metrics, analyse its checkpoint, write result.json. An upcycled method's result covers both
    of its phases (its dense phase's result.json is read): steps, tokens, times and the validation curve."""
    start = time.perf_counter()
    records = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    valid = [r for r in records if r["split"] == "valid"]
    test = [r for r in records if r["split"] == "test"]
    train = [r for r in records if r["split"] == "train"]
    loaded = load_run(run.run_dir)
    cfg = loaded.cfg
    tokens_per_step = cfg.train.micro_batch_size * cfg.train.grad_accum * cfg.model.seq_len
    batches = split_batches(loaded, "test", cfg.train.eval_batches)
    E = cfg.moe.num_experts
    ks = sorted({2 ** i for i in range(int(math.log2(E)) + 1)} | {E}) if loaded.model.moe_layers else [cfg.moe.top_k]
    sweep = k_sweep(loaded, batches, ks)
    result = {
        "method": run.method, "variant": run.variant, "seed": run.seed, "fingerprint": run.fingerprint,
        "overrides": run.overrides, "wall_s": wall_s, "steps": cfg.train.max_steps,
        "tokens_per_step": tokens_per_step, "num_experts": E, "top_k": cfg.moe.top_k,
        "valid": [[r["step"], r["bpc"]] for r in valid],
        "valid_bpc": valid[-1]["bpc"], "test_bpc": test[-1]["bpc"],
        **_step_times(train, tokens_per_step),
        "train_s": sum(tokens_per_step / r["tokens_per_s"] for r in train),
        "diagnostics": diagnostics(train, cfg.train.max_steps),
        "k_sweep": {str(k): v / math.log(2) for k, v in sweep.items()},
        "layers": routing_analysis(loaded, batches),
        "params": parameter_counts(loaded),
    }
    if run.needs is not None:
        result = _after_first_phase(result, json.loads((run.needs.run_dir / RESULT).read_text()))
    result["tokens"] = result["steps"] * tokens_per_step
    result["analysis_s"] = time.perf_counter() - start
    tmp = run.run_dir / (RESULT + ".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, run.run_dir / RESULT)
    return result


def _after_first_phase(result: dict, first: dict) -> dict:
    """A second phase's result as the whole method's: the first phase's steps, times and validation curve
    before its own (its steps shifted by the first phase's)."""
    offset = first["steps"]
    return {**result, "steps": offset + result["steps"], "train_s": result["train_s"] + first["train_s"],
            "wall_s": result["wall_s"] + first["wall_s"] + first["analysis_s"],
            "valid": first["valid"] + [[step + offset, bpc] for step, bpc in result["valid"]],
            "first_phase": {key: first[key] for key in ("steps", "wall_s", "train_s", "valid_bpc", "test_bpc")}}


DIAGNOSTICS = ("competition_entropy_ratio", "router_competition_overlap_vs_chance", "expert_output_rms",
               "router_loss_to_lm", "diversity_loss_to_lm", "competition_balance_loss_to_lm", "aux_loss_to_lm")
"""The per-layer figures of competition steps (docs/competesmoe.md section 7) that the report averages."""
WINDOWS = {"early": (0.0, 0.25), "late": (0.5, 1.0)}
"""Parts of a run (fractions of its steps) over which the diagnostics are averaged."""


def diagnostics(train: list[dict], max_steps: int) -> dict:
    """Per window of WINDOWS: the mean over every (step, MoE layer) that competed of each DIAGNOSTICS figure, and
    the mean `aux_loss_to_lm` of the router steps ('router_aux_loss_to_lm'), over all layers and per layer
    ('layers'); a figure no record has is left out."""
    out = {}
    for name, (lo, hi) in WINDOWS.items():
        window = [r["moe"] for r in train if lo * max_steps < r["step"] <= hi * max_steps and r.get("moe")]
        per_layer = [_layer_means([layers[i] for layers in window]) for i in range(len(window[0]))] if window else []
        out[name] = {**_layer_means([layer for layers in window for layer in layers]), "layers": per_layer}
    return out


def _layer_means(records: list[dict]) -> dict:
    """DIAGNOSTICS over the competing layer records, aux_loss_to_lm over the others, and the competing count."""
    competed = [layer for layer in records if layer.get("competed", 0) > 0]
    means = {key: statistics.fmean(values) for key in DIAGNOSTICS
             if (values := [layer[key] for layer in competed if key in layer])}
    router = [layer["aux_loss_to_lm"] for layer in records if not layer.get("competed") and "aux_loss_to_lm" in layer]
    if router:
        means["router_aux_loss_to_lm"] = statistics.fmean(router)
    means["competition_layer_steps"] = len(competed)
    return means


def _step_times(train: list[dict], tokens_per_step: int) -> dict:
    """Median throughput and step times of the train records after SKIP_STEPS, with and without a
    competing layer."""
    timed = [r for r in train if r["step"] > SKIP_STEPS]
    step_s = [tokens_per_step / r["tokens_per_s"] for r in timed]
    comp_s = [tokens_per_step / r["tokens_per_s"] for r in timed if r.get("competing_layers")]
    router_s = [tokens_per_step / r["tokens_per_s"] for r in timed if not r.get("competing_layers")]
    return {"tokens_per_s_median": _median([r["tokens_per_s"] for r in timed]),
            "step_s_median": _median(step_s), "step_s_competition_median": _median(comp_s),
            "step_s_typical": _typical_step(comp_s, router_s),
            "step_s_router_median": _median(router_s), "competition_steps": len(comp_s), "timed_steps": len(timed)}


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _typical_step(comp_s: list[float], router_s: list[float]) -> float:
    """Mean step time, robust to other jobs' noise: the median of steps with and without a competing
    layer, weighted by how many there were (a plain median would ignore the rare competition steps)."""
    n_comp, n_router = len(comp_s), len(router_s)
    total = n_comp * (_median(comp_s) or 0.0) + n_router * (_median(router_s) or 0.0)
    return total / max(n_comp + n_router, 1)


# ---------------------------------------------------------------------------------------------
# Routing analyses (the figures): K at evaluation, router entropy, expert similarity.


def split_batches(run: LoadedRun, split: str, num_batches: int) -> list:
    """The trainer's evaluation batches of a prepared split (so K = moe.top_k repeats its figure)."""
    from competesmoe.data.loader import eval_batches

    return list(eval_batches(run.data_dir, split, run.cfg.model.seq_len, run.cfg.train.micro_batch_size, 0, 1,
                             num_batches))


def k_sweep(run: LoadedRun, batches: list, ks: list[int]) -> dict[int, float]:
    """Mean loss (nats/token) with K experts per token at evaluation, for each K."""
    out = {}
    for k in ks:
        nats, count = score(run.model, batches, run.context(k))
        out[k] = nats / count
    return out


def expert_similarity(outputs_EGD: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of the cosine similarity between two experts' outputs on the same token: [E, E]."""
    unit_EGD = F.normalize(outputs_EGD.float(), dim=-1)
    return torch.einsum("egd,fgd->ef", unit_EGD, unit_EGD) / outputs_EGD.shape[1]


@torch.no_grad()
def routing_analysis(run: LoadedRun, batches: list) -> list[dict]:
    """Per MoE layer, on the given batches: histograms of the per-token router entropy and top-1
    probability, their means, and the expert-output similarity matrix (representation collapse)."""
    model = run.model
    layers = model.moe_layers
    if not layers:
        return []
    E = run.cfg.moe.num_experts
    acc = [{"entropy": np.zeros(ENTROPY_BINS), "top1": np.zeros(PROB_BINS), "entropy_sum": 0.0, "top1_sum": 0.0,
            "tokens": 0, "similarity": torch.zeros(E, E), "sim_tokens": 0} for _ in layers]

    def hook_for(index):
        def hook(layer, args, kwargs):
            x_TD = args[0].reshape(-1, args[0].shape[-1])
            _accumulate(acc[index], layer, x_TD, kwargs.get("ctx") or RoutingContext(), E)
        return hook

    handles = [layer.register_forward_pre_hook(hook_for(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        model.eval()
        for inputs_BS, _ in batches:
            model(inputs_BS, routing=run.context())
    finally:
        for handle in handles:
            handle.remove()
    return [_layer_summary(a, E) for a in acc]


def _accumulate(a: dict, layer, x_TD: torch.Tensor, ctx: RoutingContext, E: int) -> None:
    """Add one MoE layer input's routing statistics and expert similarity to its accumulator."""
    probs_TE = layer.route(x_TD, ctx).probs_TE.float()
    ent_T = -(probs_TE * probs_TE.clamp_min(1e-12).log()).sum(-1)
    top1_T = probs_TE.max(-1).values
    a["entropy"] += np.histogram(ent_T.numpy(), bins=ENTROPY_BINS, range=(0.0, math.log(E)))[0]
    a["top1"] += np.histogram(top1_T.numpy(), bins=PROB_BINS, range=(0.0, 1.0))[0]
    a["entropy_sum"] += ent_T.sum().item()
    a["top1_sum"] += top1_T.sum().item()
    a["tokens"] += x_TD.shape[0]
    a["similarity"] += expert_similarity(layer.experts.forward_all(x_TD)) * x_TD.shape[0]
    a["sim_tokens"] += x_TD.shape[0]


def _layer_summary(a: dict, E: int) -> dict:
    sim = (a["similarity"] / max(a["sim_tokens"], 1)).numpy()
    off = sim[~np.eye(E, dtype=bool)]
    return {"entropy_hist": a["entropy"].tolist(), "top1_hist": a["top1"].tolist(),
            "entropy_mean": a["entropy_sum"] / max(a["tokens"], 1),
            "top1_mean": a["top1_sum"] / max(a["tokens"], 1),
            "max_entropy": math.log(E),
            "similarity": sim.round(5).tolist(), "similarity_mean": float(off.mean()) if off.size else 0.0}


def parameter_counts(run: LoadedRun) -> dict:
    """Total parameters and the parameters one token uses (K of the E experts per MoE layer)."""
    model, moe = run.model, run.cfg.moe
    total = sum(p.numel() for p in model.parameters())
    expert = sum(p.numel() for layer in model.moe_layers for p in layer.experts.parameters())
    active = total - expert + expert * moe.top_k // moe.num_experts
    return {"total": total, "active": active}
