"""The benchmark's report: how it ran, five tables of measured figures, the errors, and a summary of
the ratios per (top-K, EP) cell. No thresholds here: docs/benchmarks.md states the targets."""

from __future__ import annotations

from types import SimpleNamespace

from competesmoe.common.table import text_table

Cell = tuple[int, int]
"""(top-K, EP size)"""


def report(opts: SimpleNamespace, results: list[dict], wall: float, load: tuple[str, str]) -> str:
    """results: every rank's measurements; wall: the benchmark's seconds; load: load averages at start and end."""
    cells = [[r["cells"][i] for r in results] for i in range(len(results[0]["cells"]))]
    speed_lines, speedups = _throughput(opts, cells)
    efficiency_lines, efficiencies = _efficiency(cells)
    competition_lines, competition = _competition(cells)
    memory_lines, memory, memory_recompute = _memory(cells)
    return "\n".join([*_header(opts, results, load), *speed_lines, *efficiency_lines, *competition_lines,
                      *_bytes(cells), *_host_syncs(cells), *memory_lines, *_errors(results),
                      *_summary(opts, speedups, efficiencies, competition, memory, memory_recompute),
                      f"(benchmark wall time {wall:.0f} s)"])


def _mb(n) -> str:
    return "n/a" if n is None else f"{n / 2**20:.2f}"


def _ratio(x) -> str:
    return "n/a" if x is None else f"{x:.2f}x"


def _header(opts: SimpleNamespace, results: list[dict], load: tuple[str, str]) -> list[str]:
    m = results[0]["machine"]
    threads = sorted({r["machine"]["torch_threads"] for r in results})
    capacity = ("drop_tokens=False (dropless: capacity = largest expert load in the EP group)"
                if opts.ds_capacity_factor is None else
                f"drop_tokens=True, capacity_factor {opts.ds_capacity_factor} "
                f"(capacity = ceil({opts.ds_capacity_factor} x K x tokens / E))")
    return [
        f"machine: {m['cpu_model']}, {m['cpus']} cores (this process may use {m['affinity']}), "
        f"{opts.nproc} gloo ranks x {'/'.join(map(str, threads))} torch intra-op thread(s) per rank; "
        f"torch {m['torch']}, deepspeed {m['deepspeed']}, python {m['python']}; load average "
        f"(1/5/15 min) {load[0]} at start, {load[1]} at end (other work on the cores skews timings)",
        f"shape: d_model {opts.d_model}, experts {opts.experts}, expert hidden {opts.hidden}, GELU, fp32, "
        f"{opts.tokens} tokens per rank; top-K {opts.top_k}; EP {opts.ep}"
        + ("  [--quick: smoke-test shapes, figures are not meaningful]" if opts.quick else ""),
        f"timing: median of {opts.iters} iterations after {opts.warmup} warm-up (competition steps and "
        f"floor: {opts.competition_iters} after {min(opts.warmup, 1)}), variants interleaved, barrier "
        f"before and after each, step = slowest rank; clock: "
        + ("wall (elapsed)" if opts.clock == "wall" else "process CPU time of each rank (not wall time)")
        + "; fwd+bwd with loss = sum(y * probe) + aux",
        "ours: MoELayer router step, capacity_factor 0 (dropless); EP 1 = data-parallel replicas with "
        "LocalDispatcher, EP > 1 = apply_expert_parallel + AllToAllDispatcher",
        "DeepSpeed: deepspeed.moe.layer.MoE, experts Linear-GELU-Linear (no bias), same gate and expert "
        f"weights, {capacity}, min_capacity 0, use_rts=False, noisy_gate_policy=None, "
        "top2_2nd_expert_sampling=False",
    ]


def _output_check(c: dict) -> str:
    """Ours against DeepSpeed's output (at K 1 DeepSpeed weights by the gate probability, we do not)."""
    if c["match"] is None:
        return "n/a"
    if c["k"] == 1:
        return "(K=1: DS weights by gate prob)"
    mismatch = c["match"] / max(c["match_scale"], 1e-30) > 1e-3
    return f"max|dy| {c['match']:.1e}" + (" MISMATCH" if mismatch else "")


def _throughput(opts: SimpleNamespace, cells: list[list[dict]]) -> tuple[list[str], dict[Cell, float | None]]:
    rows, speedups = [], {}
    for per_rank in cells:
        c = per_rank[0]
        t = c["timings"]
        ours = t.get("ours", {}).get("step")
        recompute = t.get("ours:recompute", {}).get("step")
        dsp = t.get("deepspeed", {}).get("step")
        speedups[(c["k"], c["ep"])] = dsp / ours if ours and dsp else None
        rows.append([str(c["k"]), str(c["ep"]),
                     "n/a" if ours is None else f"{ours * 1e3:.1f}",
                     "n/a" if ours is None else f"{opts.tokens / ours:,.0f}",
                     "n/a" if dsp is None else f"{dsp * 1e3:.1f}",
                     "n/a" if dsp is None else f"{opts.tokens / dsp:,.0f}",
                     _ratio(speedups[(c["k"], c["ep"])]), "n/a" if recompute is None else f"{recompute * 1e3:.1f}",
                     _ratio(dsp / recompute if recompute and dsp else None), str(c["capacity"]),
                     str(sum(r["ds_dropped"] for r in per_rank)), _output_check(c)])
    return ["\n1. router step forward+backward throughput (per rank)",
            text_table(["K", "EP", "ours ms", "ours tok/s", "DS ms", "DS tok/s", "ours/DS", "recompute ms",
                    "recompute/DS", "DS capacity", "DS dropped", "ours vs DS output"], rows),
            "   recompute = ours with parallel.activation_checkpointing=experts (the experts' hidden layer "
            "recomputed in backward); tok/s ratios are DS time / our time"], speedups


def _efficiency_per_rank(per_rank: list[dict]) -> list[tuple]:
    """(efficiency, rank, rows, experts GF/s, dense mm GF/s, dense FFN GF/s, whole layer GF/s, experts s)
    of every rank whose experts got rows."""
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
    return per


def _efficiency(cells: list[list[dict]]) -> tuple[list[str], dict[Cell, float]]:
    rows, efficiencies = [], {}
    for per_rank in cells:
        c = per_rank[0]
        per = _efficiency_per_rank(per_rank)
        if not per:
            continue
        eff, rank, nrows, block, dense, ffn, layer, tblock = min(per)  # the worst rank
        efficiencies[(c["k"], c["ep"])] = eff
        rows.append([str(c["k"]), str(c["ep"]), str(rank), str(nrows), f"{tblock * 1e3:.1f}",
                     f"{block / 1e9:.1f}", f"{dense / 1e9:.1f}", f"{eff:.0%}", f"{ffn / 1e9:.1f}",
                     f"{block / ffn:.0%}", "n/a" if layer is None else f"{layer / dense:.0%}"])
    return ["\n2. expert work efficiency (worst rank; FLOPs = 3 x 2 x rows x 2 x d x hidden)",
            text_table(["K", "EP", "rank", "rows", "experts ms", "experts GF/s", "dense mm GF/s", "efficiency",
                    "dense FFN GF/s", "vs FFN", "whole layer"], rows),
            "   experts = GroupedExperts fwd+bwd on the rows the router step sent to this rank's experts;\n"
            "   dense mm = the same six matmuls on one dense [rows, d] x [d, hidden] / [rows, hidden] x "
            "[hidden, d] pair, no activation;\n"
            "   dense FFN = one dense GELU FFN of the same size through autograd; whole layer = expert "
            "FLOPs / router step time, as a share of dense mm"], efficiencies


def _competition(cells: list[list[dict]]) -> tuple[list[str], dict[tuple[int, int, str], float | None]]:
    rows, ratios = [], {}
    for per_rank in cells:
        c = per_rank[0]
        t = c["timings"]
        floor_t = t.get("floor", {}).get("step")
        for mode in c["modes"]:
            name = f"competition:{mode}"
            if name not in t:
                rows.append([str(c["k"]), str(c["ep"]), mode, "failed", "", "", "", "",
                             c["errors"].get(name, "")[:120]])
                ratios[(c["k"], c["ep"], mode)] = None
                continue
            ct = t[name]["step"]
            rt = t.get("ours", {}).get("step")
            ratios[(c["k"], c["ep"], mode)] = ct / floor_t if floor_t else None
            rows.append([str(c["k"]), str(c["ep"]), mode, f"{ct * 1e3:.1f}",
                         "n/a" if rt is None else f"{rt * 1e3:.1f}", _ratio(ct / rt if rt else None),
                         "n/a" if floor_t is None else f"{floor_t * 1e3:.1f}",
                         _ratio(ratios[(c["k"], c["ep"], mode)]), ""])
    return ["\n3. competition step vs router step and vs its floor (forward_all fwd+bwd on the EP group's "
            "tokens, no communication, no top-K)",
            text_table(["K", "EP", "gather", "comp ms", "router ms", "comp/router", "floor ms", "comp/floor",
                    "note"], rows)], ratios


def _tried_variants(cells: list[list[dict]]):
    """(the cell's rank-0 figures, every rank's, variant name) of each variant tried in each cell, ours first."""
    for per_rank in cells:
        for name in sorted({n for r in per_rank for n in r["comm"]}, key=lambda n: (n != "ours", n)):
            yield per_rank[0], per_rank, name


def _bytes(cells: list[list[dict]]) -> list[str]:
    rows = []
    for c, per_rank, name in _tried_variants(cells):
        totals = [r["comm"].get(name, {}).get("total") for r in per_rank]
        detail = per_rank[0]["comm"][name]["by_collective"]
        parts = ", ".join(f"{k} x{n} {b / 2**20:.2f}" for k, (n, b) in detail.items()) or "none"
        own = per_rank[0]["comm"][name]["dispatcher_counters"]
        own_total = sum(own.values()) if own else None
        est = f"{c['ds_estimate'] / 2**20:.2f}" if name == "deepspeed" else ""
        rows.append([str(c["k"]), str(c["ep"]), name, " / ".join(_mb(x) for x in totals),
                     "" if own_total is None else _mb(own_total), est, parts])
    return ["\n4. bytes sent to other ranks per fwd+bwd step, MiB (measured: every c10d collective of one step "
            "seen by a TorchDispatchMode; per rank)",
            text_table(["K", "EP", "variant", "rank0 / rank1 ...", "dispatcher counter", "DS estimate",
                    "rank 0 by collective (calls, MiB)"], rows),
            "   DS estimate = 4 all-to-alls x E x C x d x 4 B x (P-1)/P (its capacity-padded dispatch tensor)"]


def _host_syncs(cells: list[list[dict]]) -> list[str]:
    rows = []
    for c, per_rank, name in _tried_variants(cells):
        counts = [r["comm"].get(name, {}).get("host_syncs") for r in per_rank]
        rows.append([str(c["k"]), str(c["ep"]), name, " / ".join("n/a" if n is None else str(n) for n in counts)])
    return ["\n4b. device-to-host transfers per fwd+bwd step (what would stop the host on a GPU: .item(), .tolist(), "
            ".cpu(), bool(tensor), nonzero, boolean masks, bincount, repeat_interleave without output_size; "
            "experiments/bench/host_syncs.py)",
            text_table(["K", "EP", "variant", "rank0 / rank1 ..."], rows)]


def _memory(cells: list[list[dict]]) -> tuple[list[str], dict[Cell, float | None], dict[Cell, float | None]]:
    rows, ratios, recompute_ratios = [], {}, {}
    for per_rank in cells:
        c = per_rank[0]
        names = ["ours", "ours:recompute", "deepspeed"] + [f"competition:{m}" for m in c["modes"]]
        worst = {n: max((r["memory"].get(n) or 0 for r in per_rank), default=0) or None for n in names}
        ds = worst["deepspeed"]
        ratios[(c["k"], c["ep"])] = worst["ours"] / ds if worst["ours"] and ds else None
        recompute_ratios[(c["k"], c["ep"])] = worst["ours:recompute"] / ds if worst["ours:recompute"] and ds else None
        rows.append([str(c["k"]), str(c["ep"]), _mb(worst["ours"]), _mb(worst["ours:recompute"]),
                     _mb(ds), _ratio(ratios[(c["k"], c["ep"])]), _ratio(recompute_ratios[(c["k"], c["ep"])]),
                     "  ".join(f"{m} {_mb(worst[f'competition:{m}'])}" for m in c["modes"])])
    return ["\n5. peak memory of one fwd+bwd step, MiB, largest rank (live tensors allocated during the step, "
            "incl. gradients; tracked by torch.distributed._tools.mem_tracker.MemTracker; parameters and "
            "input excluded; gloo buffers not seen)",
            text_table(["K", "EP", "ours", "ours recompute", "DeepSpeed", "ours/DS", "recompute/DS",
                    "competition step"], rows)], ratios, recompute_ratios


def _errors(results: list[dict]) -> list[str]:
    errors = {(c["k"], c["ep"], n): e for r in results for c in r["cells"] for n, e in c["errors"].items()}
    if not errors:
        return []
    return ["\nerrors (variant dropped):"] + [f"  K {k} EP {ep} {name}: {e}"
                                             for (k, ep, name), e in sorted(errors.items())]


def _summary(opts: SimpleNamespace, speedups: dict, efficiencies: dict, competition: dict, memory: dict,
             memory_recompute: dict) -> list[str]:
    """The ratios per cell, as docs/benchmarks.md states its targets; no verdicts."""
    cells = [(k, ep) for ep in opts.ep for k in opts.top_k]

    def per_cell(values: dict, fmt=_ratio) -> str:
        return ", ".join(f"K {k} EP {ep} {'n/a' if values.get((k, ep)) is None else fmt(values[(k, ep)])}"
                         for k, ep in cells)

    out = ["\nsummary (measured ratios; the targets they are read against: docs/benchmarks.md):"]
    for k in opts.top_k:
        out.append(f"  ours / DeepSpeed tokens/s at K {k}: "
                   + ", ".join(f"EP {ep} {_ratio(speedups.get((k, ep)))}" for ep in opts.ep))
    out.append(f"  expert work / dense matmul rate: {per_cell(efficiencies, lambda v: f'{v:.0%}')}")
    keys = sorted((key for key in competition if not key[2].endswith("+recompute")),  # the floor keeps its hidden
                  key=lambda key: (key[1], key[0], key[2]))
    best = {}
    for k, ep in cells:
        measured = [competition[key] for key in keys if key[:2] == (k, ep) and competition[key] is not None]
        best[(k, ep)] = min(measured) if measured else None
    out.append("  competition step / its floor: "
               + ", ".join(f"K {k} EP {ep} {mode} {_ratio(competition[(k, ep, mode)])}" for k, ep, mode in keys)
               + f"; best gather mode per cell: {per_cell(best)}")
    out.append(f"  our peak memory / DeepSpeed's: {per_cell(memory)}")
    out.append(f"    with the experts recomputed: {per_cell(memory_recompute)}")
    for k, ep in cells:
        scores, outputs = competition.get((k, ep, "scores")), competition.get((k, ep, "outputs"))
        if ep > 1 and scores is not None and outputs is not None:
            out.append(f"  cheaper competition gather at K {k} EP {ep}: {'scores' if scores <= outputs else 'outputs'} "
                       f"({_ratio(scores)} vs {_ratio(outputs)} of the floor)")
    return out
