"""results.md of a grid, from its finished runs' result.json: the budget, the results table, the
competition overhead, where CompeteSMoE won, lost or tied, the figures, the K sweep and every run."""

from __future__ import annotations

import json
import os
import platform
import statistics
from pathlib import Path

from competesmoe.common.errors import UserError
from competesmoe.data.meta import load_meta
from competesmoe.experiments.repro.analysis import SKIP_STEPS, WINDOWS
from competesmoe.experiments.repro.figures import Groups, all_ks, write_figures
from competesmoe.experiments.repro.grid import LOCAL, RESULT, Grid, label, shown
from competesmoe.experiments.repro.stats import Paired, paired
from competesmoe.launcher.config import Config, load_config

REFERENCE = "gshard"  # the competition overhead is a ratio to SMoE with the same K

CAPTIONS = {
    "fig2_validation": "Validation BPC during training, mean over seeds (band: min to max); the papers' Fig. 2.",
    "fig3_experts_at_eval": "Test BPC against the number of experts activated per token at evaluation "
                            "(mean ± std over seeds; the dense model is a line); the papers' Fig. 3.",
    "fig4_router_entropy": "Per-token entropy of the routing distribution on the test windows, per MoE layer "
                           "(histogram, all seeds), and its mean per layer; the papers' Figs. 4-5. For "
                           "CompeteSMoE and SMoE: the router's softmax; XMoE: its cosine softmax; StableMoE: the "
                           "frozen distilled router; SMoE-Dropout: its random router.",
    "fig5_expert_similarity": "Representation collapse: mean cosine similarity between two experts' outputs on "
                              "the same token (off-diagonal mean per layer, and the matrix of the last layer, "
                              "seed 1). Lower = more diverse experts.",
}


def _mean_std(values: list[float | None]) -> tuple[float, float]:
    """Mean and std of the figures a run has (None: e.g. a throughput of a run too short to time)."""
    values = [v for v in values if v is not None]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _number(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _fmt(values: list[float | None], digits: int = 3) -> str:
    mean, std = _mean_std(values)
    known = sum(v is not None for v in values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if known > 1 else f"{mean:.{digits}f}"


def collect(grid: Grid) -> Groups:
    """Finished results by (method, variant), in grid order."""
    groups: Groups = {}
    for run in grid.results:
        key = (run.method, run.variant)
        groups.setdefault(key, [])
        if run.finished():
            groups[key].append(json.loads((run.run_dir / RESULT).read_text()))
    return {k: v for k, v in groups.items() if v}


def verdict(ours: list[float], theirs: list[float]) -> str:
    """'won' / 'lost' when the mean ± std intervals do not overlap (lower is better), else 'tied'."""
    (m1, s1), (m2, s2) = _mean_std(ours), _mean_std(theirs)
    if m1 + s1 < m2 - s2:
        return "won"
    if m1 - s1 > m2 + s2:
        return "lost"
    return "tied"


def write_report(grid: Grid, total_wall_s: float | None = None) -> Path:
    """Write <out>/results.md and the figures from the grid's finished runs; its path."""
    groups = collect(grid)
    if not groups:
        raise UserError(f"no finished runs in {grid.runs_dir}; run the grid first")
    grid.out_dir.mkdir(parents=True, exist_ok=True)
    figures = write_figures(groups, grid.out_dir)
    cfg = load_config(grid.base_config, grid.common)
    lines = [f"# CompeteSMoE and baselines: budget `{grid.budget}`", "",
             f"Produced by `{grid.command}` (experiments/repro) from the runs under `{shown(grid.runs_dir)}`; every "
             "number below is read from those runs.", ""]
    lines += _budget(grid, cfg, groups, total_wall_s)
    lines += _results(groups)
    lines += _paired(groups)
    lines += _diagnostics(groups)
    lines += _competition(groups)
    lines += ["## Figures", ""]
    for name in figures:
        lines += [f"![{name}]({name}.png)", "", CAPTIONS[name], ""]
    lines += _k_sweep_table(groups)
    lines += _every_run(groups)
    path = grid.out_dir / "results.md"
    path.write_text("\n".join(lines))
    return path


def _budget(grid: Grid, cfg: Config, groups: Groups, total_wall_s: float | None) -> list[str]:
    import torch

    m, moe, t = cfg.model, cfg.moe, cfg.train
    train_tokens = int(load_meta(grid.data_dir)["splits"]["train"]["tokens"])
    run_walls = [r["wall_s"] + r["analysis_s"] for v in groups.values() for r in v]
    return ["## Budget", "",
            ("- data: the bundled Wikipedia fragment (data/corpus, 6.1 MB)" if cfg.data.path is None else
             f"- data: {cfg.data.path}") + ", byte level, split 90/5/5 as `prepare` does; BPC = bits per byte"
            + (". Not comparable with published enwik8 numbers." if cfg.data.path is None else "."),
            f"- model: {m.n_layers} layers, d_model {m.d_model}, {m.n_heads} heads, context {m.seq_len}; MoE in every "
            f"block: {moe.num_experts} experts of width {moe.expert_hidden}, top-{moe.top_k} (Switch: top-1); the "
            f"dense baseline has one FFN of width {moe.top_k * moe.expert_hidden}.",
            f"- training: {t.max_steps} steps x {t.micro_batch_size} x {m.seq_len} tokens "
            f"({t.max_steps * t.micro_batch_size * m.seq_len / 1e6:.2f} M tokens, "
            f"{t.max_steps * t.micro_batch_size * m.seq_len / train_tokens:.2f} epochs of the train split), "
            f"AdamW lr {t.lr}, "
            f"cosine; one process with {grid.threads} thread(s) per run.",
            f"- the budget's defaults (a method's own settings below replace them): CompeteSMoE rate "
            f"{moe.competition.rate}, warm-up {moe.competition.warmup}, cap {moe.competition.cap}, affinity "
            f"{moe.competition.affinity}, router loss {moe.competition.router_loss_coef}, diversity "
            f"{moe.competition.diversity_coef}; StableMoE stage 1: first {moe.baseline.stablemoe_stage1:.0%} of steps; "
            f"SMoE-Dropout: K from {moe.baseline.dropout_k_start} to {moe.baseline.dropout_k_end or moe.num_experts} "
            f"during training, K = {moe.top_k} at evaluation; XMoE: routing dim {moe.baseline.xmoe_dim}.",
            *_method_settings(grid, groups),
            f"- evaluation: validation and test BPC on the first {t.eval_batches} x {t.micro_batch_size} windows of "
            f"each split ({t.eval_batches * t.micro_batch_size * m.seq_len:,} tokens), after the last step.",
            "- seeds (weights, data order, competition schedule; the same seed gives every method the same data "
            "order): " + "; ".join(f"{label(k)} {sorted(r['seed'] for r in v)}" for k, v in groups.items())
            + "; mean ± sample std over seeds.",
            f"- machine: {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), torch "
            f"{torch.__version__}, shared with other jobs: the timings are indicative.",
            f"- time: {len(run_walls)} runs, {sum(run_walls) / 60:.1f} min of run time (training + analysis; median "
            f"{statistics.median(run_walls):.0f} s per run)"
            + (f"; this invocation took {total_wall_s / 60:.1f} min" if total_wall_s else "") + ".", ""]


def _method_settings(grid: Grid, groups: Groups) -> list[str]:
    """One line per method: the overrides that make it (what the budget's model is given), and an upcycled
    method's two phases."""
    lines = []
    for key, results in groups.items():
        own = [o for o in results[0]["overrides"] if o not in grid.common and not o.startswith((*LOCAL, "train.seed="))]
        text = f"- {label(key)}: `{' '.join(own) or '(the budget as it is)'}`"
        first = results[0].get("first_phase")
        if first:
            text += (f"; first a dense model of one expert's width for {first['steps']} steps (its FFN upcycled into "
                     f"every expert), then the MoE for {results[0]['steps'] - first['steps']} steps on the data "
                     f"that follows: {results[0]['steps']} steps in all, as every other method")
        lines.append(text)
    return lines


def _reference_step(groups: Groups) -> float | None:
    """SMoE top-2's typical step time (its plain variant when there is one), mean over seeds."""
    ref_key = next((k for k in groups if k[0] == REFERENCE and k[1] == ""), None) or \
        next((k for k in groups if k[0] == REFERENCE), None)
    return _mean_std([r["step_s_typical"] for r in groups[ref_key]])[0] if ref_key else None


def _results(groups: Groups) -> list[str]:
    ref_step = _reference_step(groups)
    lines = ["## Results", "",
             "| method | seeds | params (total / active) | valid BPC | test BPC | train tokens/s | step time / GShard "
             "| training time per run | wall time per run |",
             "|---|---|---|---|---|---|---|---|---|"]
    for key, results in groups.items():
        params = results[0]["params"]
        step = _mean_std([r["step_s_typical"] for r in results])[0]
        ratio = f"{step / ref_step:.2f}" if ref_step else "n/a"
        trained = [r["train_s"] / 60 for r in results if "train_s" in r]
        lines.append(f"| {label(key)} | {len(results)} | {params['total'] / 1e3:.0f}k / {params['active'] / 1e3:.0f}k "
                     f"| {_fmt([r['valid_bpc'] for r in results])} | {_fmt([r['test_bpc'] for r in results])} | "
                     f"{_fmt([r['tokens_per_s_median'] for r in results], 0)} | {ratio} | "
                     f"{_fmt(trained, 1) + ' min' if trained else 'n/a'} | "
                     f"{_fmt([(r['wall_s'] + r['analysis_s']) / 60 for r in results], 1)} min |")
    return lines + ["", f"Train tokens/s: median over the steps after the first {SKIP_STEPS}. Step time: the median "
                    "time of steps with and of steps without a competing layer, weighted by their counts (a plain "
                    "median would ignore the rare competition steps), mean over seeds, divided by the same for SMoE "
                    "top-2 (GShard). Training time: the sum of the logged step times (no start-up, evaluation or "
                    "analysis); wall time: the run's process and its analysis. An upcycled method's times add both "
                    "phases' (its step-time figures are its MoE phase's). Runs shared the machine with each other and "
                    "with other jobs, so cross-run timings carry their load; the within-run competition overhead below "
                    "does not.", ""]


def _paired(groups: Groups) -> list[str]:
    """Each method's per-seed differences against GShard's run with the same seed, and their 95% t intervals."""
    ref_key = next((k for k in groups if k[0] == REFERENCE and k[1] == ""), None)
    if ref_key is None:
        return []
    ref = {split: {r["seed"]: r[f"{split}_bpc"] for r in groups[ref_key]} for split in ("test", "valid")}
    lines = [f"## Paired differences against {label(ref_key)}", "",
             "Each method's BPC minus GShard's with the same seed (same data order; the same initial weights for "
             "methods whose modules draw the same random numbers, e.g. GShard and CompeteSMoE), mean over seeds and its 95% Student-t interval, mean ± t(0.975, n-1) sd / sqrt(n). "
             "Negative = lower BPC than GShard. 'better' / 'worse' when the interval excludes 0, 'not resolved' when "
             "it does not (no claim either way at this number of seeds).", "",
             "| method | pairs | test BPC - GShard [95% interval] | test | valid BPC - GShard [95% interval] | valid "
             "| per-seed test differences |", "|---|---|---|---|---|---|---|"]
    for key, results in groups.items():
        if key == ref_key:
            continue
        test = paired({r["seed"]: r["test_bpc"] for r in results}, ref["test"])
        valid = paired({r["seed"]: r["valid_bpc"] for r in results}, ref["valid"])
        if not test.n:
            continue
        per_seed = ", ".join(f"{s}: {d:+.4f}" for s, d in zip(test.seeds, test.differences))
        lines.append(f"| {label(key)} | {test.n} | {_interval(test)} | {test.verdict()} | {_interval(valid)} | "
                     f"{valid.verdict()} | {per_seed} |")
    return lines + [""]


def _interval(p: Paired) -> str:
    lo, hi = p.interval
    return f"{p.mean:+.4f} [{lo:+.4f}, {hi:+.4f}]" if p.n > 1 else f"{p.mean:+.4f}"


DIAGNOSTIC_COLUMNS = [("competition_entropy_ratio", "H(p_C) / ln E", 3),
                      ("router_competition_overlap_vs_chance", "overlap / chance (K/E)", 2),
                      ("expert_output_rms", "winners' output RMS", 3),
                      ("router_loss_to_lm", "router loss / LM", 5), ("diversity_loss_to_lm", "diversity / LM", 5),
                      ("competition_balance_loss_to_lm", "comp. balance / LM", 5),
                      ("aux_loss_to_lm", "all aux / LM (competition steps)", 5),
                      ("router_aux_loss_to_lm", "all aux / LM (router steps)", 5)]


def _diagnostics(groups: Groups) -> list[str]:
    """The competition's diagnostics (docs/competesmoe.md section 7) per method and part of the run."""
    rows = [(key, window) for key, results in groups.items() if results[0]["layers"] and "diagnostics" in results[0]
            for window in WINDOWS]
    if not rows:
        return []
    lines = ["## Did the competition carry a signal? (diagnostics from metrics.jsonl)", "",
             "Means over the (step, MoE layer) pairs of a part of the run (early: the first "
             f"{WINDOWS['early'][1]:.0%} of its steps; late: the second half) and over seeds: the competition's "
             "figures over the pairs that competed, the last column over those that did not. H(p_C) / ln E near 1: the "
             "competition's policy is nearly uniform and the router learns little from it; overlap / chance near 1: "
             "the router's top-K agrees with the competition's winners no more than a random router would; "
             "<term> / LM: the weighted loss term over the LM loss of the same micro-batch.", "",
             "| method | part | competing layer-steps | " + " | ".join(c[1] for c in DIAGNOSTIC_COLUMNS) + " |",
             "|---|---|---|" + "---|" * len(DIAGNOSTIC_COLUMNS)]
    for key, window in rows:
        parts = [r["diagnostics"][window] for r in groups[key]]
        cells = []
        for name, _, digits in DIAGNOSTIC_COLUMNS:
            values = [p[name] for p in parts if name in p]
            cells.append(_fmt(values, digits) if values else "")
        steps = statistics.fmean(p["competition_layer_steps"] for p in parts)
        lines.append(f"| {label(key)} | {window} | {steps:.0f} | " + " | ".join(cells) + " |")
    return lines + [""]


def _competition(groups: Groups) -> list[str]:
    """The competition overhead of each CompeteSMoE variant, and where the first one won, lost or tied."""
    comp_keys = [k for k in groups if k[0].startswith("competesmoe")]
    if not comp_keys:
        return []
    ref_step = _reference_step(groups)
    lines = ["## Competition overhead", ""]
    lines += [_overhead(key, groups[key], ref_step) for key in comp_keys]
    lines.append("")
    return lines + _won_lost_tied(next((k for k in comp_keys if k[1] == ""), comp_keys[0]), groups)


def _overhead(key: tuple[str, str], results: list[dict], ref_step: float | None) -> str:
    comp = [r["step_s_competition_median"] for r in results if r["step_s_competition_median"]]
    router = [r["step_s_router_median"] for r in results if r["step_s_router_median"]]
    n_comp = sum(r["competition_steps"] for r in results) / len(results)
    overall = _mean_std([r["step_s_typical"] for r in results])[0]
    timed = results[0].get("timed_steps", results[0]["steps"] - SKIP_STEPS)
    text = (f"- {label(key)}: on average {n_comp:.0f} of {timed} timed steps had a "
            f"competing layer")
    if comp and router:
        c, r_ = statistics.fmean(comp), statistics.fmean(router)
        text += (f". Within the same runs (interleaved, so other jobs' load hits both alike) a step with a "
                 f"competition took {c * 1e3:.1f} ms against {r_ * 1e3:.1f} ms for a router step ({c / r_:.2f}x); "
                 f"a router step computes exactly what SMoE top-2 computes, so the run's competition "
                 f"overhead over SMoE is {overall / r_:.3f}x")
    if ref_step:
        text += f". Against the separate SMoE top-2 (GShard) runs: {overall / ref_step:.2f}x (noisier: other times)"
    return text + "."


def _won_lost_tied(ours_key: tuple[str, str], groups: Groups) -> list[str]:
    lines = [f"## Where {label(ours_key)} won, lost or tied", "",
             "Rule: lower BPC is better; 'won' / 'lost' when the two mean ± std intervals do not overlap, "
             "'tied' when they do. With this few seeds a tie is the honest reading of most differences.", "",
             f"| {label(ours_key)} vs | valid BPC | test BPC | test BPC difference (theirs - ours) |",
             "|---|---|---|---|"]
    ours = groups[ours_key]
    for key, results in groups.items():
        if key == ours_key:
            continue
        diff = _mean_std([r["test_bpc"] for r in results])[0] - _mean_std([r["test_bpc"] for r in ours])[0]
        lines.append(f"| {label(key)} | {verdict([r['valid_bpc'] for r in ours], [r['valid_bpc'] for r in results])} | "
                     f"{verdict([r['test_bpc'] for r in ours], [r['test_bpc'] for r in results])} | {diff:+.3f} |")
    return lines + [""]


def _k_sweep_table(groups: Groups) -> list[str]:
    ks = all_ks(groups)
    lines = ["## Test BPC by experts at evaluation", "",
             "| method | " + " | ".join(f"K={k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
    for key, results in groups.items():
        cells = []
        for k in ks:
            vals = [r["k_sweep"][str(k)] for r in results if str(k) in r["k_sweep"]]
            cells.append(_fmt(vals) if vals else "")
        lines.append(f"| {label(key)} | " + " | ".join(cells) + " |")
    return lines


def _every_run(groups: Groups) -> list[str]:
    lines = ["", "## Every run", "", "| method | seed | valid BPC | test BPC | tokens/s | train s | analysis s |",
             "|---|---|---|---|---|---|---|"]
    for key, results in groups.items():
        for r in results:
            lines.append(f"| {label(key)} | {r['seed']} | {r['valid_bpc']:.4f} | {r['test_bpc']:.4f} | "
                         f"{_number(r['tokens_per_s_median'], 0)} | {r['wall_s']:.0f} | {r['analysis_s']:.0f} |")
    return lines + [""]
