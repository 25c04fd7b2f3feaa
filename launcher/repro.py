"""`competesmoe repro`: the papers' comparison in one command: a grid of (method x seed) byte-level
runs on the bundled Wikipedia corpus, then results.md and the figures.

    competesmoe repro --quick                        # every method, 3 seeds, tiny models (~15 min, 2 cores)
    competesmoe repro                                # the default grid: every method, 3 seeds, budget 'small'
    competesmoe repro --budget medium --seeds 1 2 3 --methods gshard competesmoe
    competesmoe repro --quick --ablation rate        # CompeteSMoE at competition rates 0.01 .. 0.5
    competesmoe repro --quick --vary moe.competition.cap=1,2 --methods competesmoe

Methods (same model, same data, same seeds; only the routing differs, see moe/baselines.py):
switch (SMoE top-1), gshard (SMoE top-2), xmoe, stablemoe, smoe-dropout, dense (a dense FFN of
width top_k * expert_hidden: the active parameters of top_k experts) and competesmoe.

Each run is `competesmoe train` in a child process (one rank, `--threads` threads) into
`<runs-dir>/<method>[@variant]/seed<S>/`, with its log in `train.log`. When it has finished, the
checkpoint is analysed in this process (launcher/evaluate.py): test BPC with K = 1, 2, 4, ... experts
at evaluation, the per-token router entropy and top-1 probability per layer, and the similarity of
the experts' outputs; all of it goes to `result.json`. A run with a `result.json` made from the same
settings is not run again (the grid resumes); an unfinished one is started over. Then
`<out>/results.md` and four PNGs are written from every finished run of the grid.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from competesmoe.common.errors import UserError
from competesmoe.data.meta import load_meta
from competesmoe.launcher.config import Config, load_config

ROOT = Path(__file__).resolve().parents[1]
BASE_CONFIG = ROOT / "configs" / "tiny-cpu.yaml"
RESULT = "result.json"
REFERENCE = "gshard"  # the competition overhead is a ratio to SMoE with the same K
SKIP_STEPS = 10  # first steps left out of the timing medians (allocation, warm caches)

METHODS: dict[str, tuple[str, list[str]]] = {
    "switch": ("SMoE top-1 (Switch)", ["moe.router=smoe", "moe.top_k=1", "moe.baseline.smoe_raw_gates=true"]),
    "gshard": ("SMoE top-2 (GShard)", ["moe.router=smoe"]),
    "xmoe": ("XMoE", ["moe.router=xmoe"]),
    "stablemoe": ("StableMoE", ["moe.router=stablemoe"]),
    "smoe-dropout": ("SMoE-Dropout", ["moe.router=smoe_dropout"]),
    "dense": ("Dense FFN (same active params)", []),
    "competesmoe": ("CompeteSMoE", ["moe.router=competesmoe"]),
}

_COMMON = ["train.log_every=1", "train.checkpoint_every=0", "train.keep_checkpoints=1", "resume=none",
           "data.tokenizer=byte", "data.path=null", "model.layout=switch", "moe.competition.rate=0.1",
           "moe.competition.cap=2"]
BUDGETS: dict[str, dict] = {
    "quick": {"seeds": [1, 2, 3],
              "overrides": _COMMON + ["model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.seq_len=64",
                                      "moe.num_experts=8", "moe.top_k=2", "moe.expert_hidden=64",
                                      "train.max_steps=300", "train.micro_batch_size=8", "train.lr=0.003",
                                      "train.warmup_steps=20", "train.eval_every=30", "train.eval_batches=8"]},
    "small": {"seeds": [1, 2, 3],
              "overrides": _COMMON + ["model.d_model=128", "model.n_layers=4", "model.n_heads=4", "model.seq_len=128",
                                      "moe.num_experts=8", "moe.top_k=2", "moe.expert_hidden=256",
                                      "train.max_steps=500", "train.micro_batch_size=8", "train.lr=0.002",
                                      "train.warmup_steps=20", "train.eval_every=50", "train.eval_batches=16"]},
    "medium": {"seeds": [1, 2, 3],
               "overrides": _COMMON + ["model.d_model=128", "model.n_layers=4", "model.n_heads=4", "model.seq_len=128",
                                       "moe.num_experts=8", "moe.top_k=2", "moe.expert_hidden=256",
                                       "train.max_steps=2000", "train.micro_batch_size=16", "train.lr=0.002",
                                       "train.warmup_steps=50", "train.eval_every=200", "train.eval_batches=32"]},
}

# Ablations the reviewers asked for: (default methods, list of (label, overrides)).
ABLATIONS: dict[str, tuple[list[str], list[tuple[str, list[str]]]]] = {
    "rate": (["competesmoe"], [(f"rate={r}", [f"moe.competition.rate={r}"]) for r in (0.01, 0.05, 0.1, 0.2, 0.5)]),
    "cap": (["competesmoe"], [(f"cap={c}", [f"moe.competition.cap={c}", "moe.competition.rate=0.3"]) for c in (1, 2, 3)]),
    "router-loss": (["competesmoe"], [(f"router_loss={w}", [f"moe.competition.router_loss_coef={w}"])
                                      for w in (0.001, 0.01, 0.1)]),
    "diversity": (["competesmoe"], [(f"diversity={w}", [f"moe.competition.diversity_coef={w}"]) for w in (0.0, 0.01, 0.1)]),
    "affinity": (["competesmoe"], [(a, [f"moe.competition.affinity={a}"])
                                   for a in ("softplus_mean", "l2_norm", "relu_mean", "sigmoid_mean")]),
    "experts": (["gshard", "competesmoe"], [(f"E={e},K={k}", [f"moe.num_experts={e}", f"moe.top_k={k}"])
                                            for e, k in ((4, 1), (8, 2), (16, 2), (16, 4))]),
}


def method_overrides(method: str, cfg: Config) -> list[str]:
    """The overrides that turn the budget's model into `method` (cfg: the resolved budget config)."""
    if method not in METHODS:
        raise UserError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if method == "dense":
        return ["model.layout=dense", f"model.dense_hidden={cfg.moe.top_k * cfg.moe.expert_hidden}"]
    return list(METHODS[method][1])


@dataclass
class Run:
    method: str
    variant: str
    seed: int
    overrides: list[str]
    run_dir: Path
    max_steps: int

    @property
    def name(self) -> str:
        return f"{self.method}{'@' + self.variant if self.variant else ''} seed {self.seed}"

    @property
    def fingerprint(self) -> str:
        text = json.dumps([o for o in self.overrides if not o.startswith(("output_dir=", "data.prepared_dir="))])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def finished(self) -> bool:
        path = self.run_dir / RESULT
        if not path.is_file():
            return False
        try:
            return json.loads(path.read_text()).get("fingerprint") == self.fingerprint
        except ValueError:
            return False


@dataclass
class Grid:
    budget: str
    runs: list[Run]
    runs_dir: Path
    out_dir: Path
    base_config: Path
    data_dir: Path
    threads: int
    common: list[str] = field(default_factory=list)
    """The budget's overrides shared by every run (before variants and methods)."""


def parse_vary(items: list[str]) -> list[tuple[str, list[str]]]:
    """--vary KEY=V1,V2 [--vary KEY2=...]: the cartesian product as (label, overrides)."""
    axes = []
    for item in items:
        if "=" not in item:
            raise UserError(f"--vary {item!r} must look like section.key=value1,value2")
        key, values = item.split("=", 1)
        axes.append([(f"{key.split('.')[-1]}={v}", f"{key}={v}") for v in values.split(",") if v != ""])
    variants = []
    for combo in itertools.product(*axes):
        variants.append((",".join(label for label, _ in combo), [o for _, o in combo]))
    return variants


def build_grid(args) -> Grid:
    budget = "quick" if args.quick else args.budget
    spec = BUDGETS[budget]
    seeds = args.seeds or spec["seeds"]
    variants: list[tuple[str, list[str]]] = [("", [])]
    default_methods = list(METHODS)
    tag = budget
    if args.ablation:
        default_methods, variants = ABLATIONS[args.ablation]
        tag = f"{budget}-{args.ablation}"
    if args.vary:
        variants = parse_vary(args.vary)
        tag = f"{budget}-vary"
    methods = args.methods or default_methods
    for m in methods:
        if m not in METHODS:
            raise UserError(f"--methods: unknown method {m!r}; choose from {', '.join(METHODS)}")
    runs_dir = Path(args.runs_dir or ROOT / "runs" / "repro" / budget).resolve()
    out_dir = Path(args.out or ROOT / "docs" / "results" / tag).resolve()
    data_dir = runs_dir / "data"
    base = Path(args.config).resolve() if args.config else BASE_CONFIG
    extra = list(args.set or [])
    steps = [f"train.max_steps={args.steps}"] if args.steps else []
    runs = []
    for seed in seeds:
        for label, variant in variants:
            for method in methods:
                common = spec["overrides"] + steps + variant + extra
                cfg = load_config(base, common)
                if cfg.data.tokenizer != "byte":
                    raise UserError("repro reports bits per character: keep data.tokenizer=byte")
                folder = method + (f"@{label}" if label else "")
                run_dir = runs_dir / folder / f"seed{seed}"
                overrides = (common + method_overrides(method, cfg) + [f"train.seed={seed}",
                             f"data.prepared_dir={data_dir}", f"output_dir={run_dir}"])
                cfg = load_config(base, overrides)  # every run's settings are valid before anything starts
                runs.append(Run(method, label, seed, overrides, run_dir, cfg.train.max_steps))
    return Grid(budget, runs, runs_dir, out_dir, base, data_dir, args.threads,
                common=spec["overrides"] + steps + extra)


# ---------------------------------------------------------------------------------------------
# Running.


def _last_step(metrics: Path, offset: int) -> tuple[int | None, int]:
    """The newest train step in metrics.jsonl past byte `offset`, and the new offset."""
    if not metrics.is_file():
        return None, offset
    with open(metrics, "rb") as f:
        f.seek(offset)
        chunk = f.read()
    end = chunk.rfind(b"\n")
    if end < 0:
        return None, offset
    step = None
    for line in chunk[:end].splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("split") == "train":
            step = record["step"]
    return step, offset + end + 1


class _Child:
    def __init__(self, run: Run, grid: Grid):
        if run.run_dir.exists():
            shutil.rmtree(run.run_dir)  # an unfinished or outdated run of ours: start it over
        run.run_dir.mkdir(parents=True)
        self.run = run
        self.log = open(run.run_dir / "train.log", "w")
        env = {**os.environ, "OMP_NUM_THREADS": str(grid.threads), "MKL_NUM_THREADS": str(grid.threads),
               "PYTHONUNBUFFERED": "1"}
        command = [sys.executable, "-m", "competesmoe.launcher.cli", "train", str(grid.base_config),
                   *run.overrides, f"parallel.threads_per_rank={grid.threads}"]
        (run.run_dir / "command.txt").write_text(" ".join(command) + "\n")
        self.start = time.perf_counter()
        self.proc = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        self.step = 0
        self.offset = 0

    def poll_steps(self) -> int:
        """Steps done since the last call."""
        step, self.offset = _last_step(self.run.run_dir / "metrics.jsonl", self.offset)
        if step is None or step <= self.step:
            return 0
        done, self.step = step - self.step, step
        return done


def run_grid(grid: Grid, jobs: int, progress: bool = True) -> None:
    from tqdm import tqdm

    from competesmoe.data.prepare import prepare

    todo = [r for r in grid.runs if not r.finished()]
    done = len(grid.runs) - len(todo)
    print(f"repro: {len(grid.runs)} runs ({done} already finished, {len(todo)} to run) in {grid.runs_dir}; "
          f"results to {grid.out_dir}", flush=True)
    if not todo:
        return
    import torch

    torch.set_num_threads(grid.threads)  # the analyses here: no more threads than a run gets
    prepare(load_config(grid.base_config, todo[0].overrides).data, grid.data_dir, progress=False)
    bar = tqdm(total=sum(r.max_steps for r in todo), unit="step", disable=not progress, dynamic_ncols=True,
               desc="grid")
    queue, running, failures = list(todo), [], []
    finished = done
    try:
        while queue or running:
            while queue and len(running) < jobs:
                child = _Child(queue.pop(0), grid)
                running.append(child)
            time.sleep(0.5)
            for child in list(running):
                bar.update(child.poll_steps())
                if child.proc.poll() is None:
                    continue
                running.remove(child)
                child.log.close()
                wall = time.perf_counter() - child.start
                bar.update(max(0, child.run.max_steps - child.step))
                if child.proc.returncode != 0:
                    tail = (child.run.run_dir / "train.log").read_text(errors="replace").strip().splitlines()[-3:]
                    failures.append(f"{child.run.name}: exit {child.proc.returncode}: {' | '.join(tail)}")
                    bar.write(f"FAILED {child.run.name} (see {child.run.run_dir / 'train.log'})")
                    continue
                result = analyse(child.run, wall)
                finished += 1
                bar.write(f"[{finished}/{len(grid.runs)}] {child.run.name}: valid {result['valid_bpc']:.4f} "
                          f"test {result['test_bpc']:.4f} BPC, {wall:.0f} s train + {result['analysis_s']:.0f} s analysis")
            names = ", ".join(c.run.name for c in running)
            bar.set_description(f"grid {finished}/{len(grid.runs)} [{names}]" if names else "grid")
    except KeyboardInterrupt:
        for child in running:
            child.proc.terminate()
        raise
    finally:
        bar.close()
    if failures:
        raise UserError(f"{len(failures)} run(s) failed; the others are kept and a re-run resumes the grid: "
                        + "; ".join(failures))


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _typical_step(comp_s: list[float], router_s: list[float]) -> float:
    """Mean step time, robust to other jobs' noise: the median of steps with and without a competing
    layer, weighted by how many there were (a plain median would ignore the rare competition steps)."""
    n_comp, n_router = len(comp_s), len(router_s)
    total = n_comp * (_median(comp_s) or 0.0) + n_router * (_median(router_s) or 0.0)
    return total / max(n_comp + n_router, 1)


def analyse(run: Run, wall_s: float) -> dict:
    """Read the run's metrics, analyse its checkpoint, write result.json."""
    from competesmoe.launcher import evaluate as ev

    start = time.perf_counter()
    records = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in records if r["split"] == "train"]
    valid = [r for r in records if r["split"] == "valid"]
    test = [r for r in records if r["split"] == "test"]
    loaded = ev.load_run(run.run_dir)
    cfg = loaded.cfg
    tokens_per_step = cfg.train.micro_batch_size * cfg.train.grad_accum * cfg.model.seq_len
    timed = [r for r in train if r["step"] > SKIP_STEPS]
    step_s = [tokens_per_step / r["tokens_per_s"] for r in timed]
    comp_s = [tokens_per_step / r["tokens_per_s"] for r in timed if r.get("competing_layers")]
    router_s = [tokens_per_step / r["tokens_per_s"] for r in timed if not r.get("competing_layers")]

    batches = ev.split_batches(loaded, "test", cfg.train.eval_batches)
    E = cfg.moe.num_experts
    ks = sorted({2 ** i for i in range(int(math.log2(E)) + 1)} | {E}) if loaded.model.moe_layers else [cfg.moe.top_k]
    sweep = ev.k_sweep(loaded, batches, ks)
    result = {
        "method": run.method, "variant": run.variant, "seed": run.seed, "fingerprint": run.fingerprint,
        "overrides": run.overrides, "wall_s": wall_s, "steps": cfg.train.max_steps,
        "tokens_per_step": tokens_per_step, "num_experts": E, "top_k": cfg.moe.top_k,
        "valid": [[r["step"], r["bpc"]] for r in valid],
        "valid_bpc": valid[-1]["bpc"], "test_bpc": test[-1]["bpc"],
        "tokens_per_s_median": _median([r["tokens_per_s"] for r in timed]),
        "step_s_median": _median(step_s), "step_s_competition_median": _median(comp_s),
        "step_s_typical": _typical_step(comp_s, router_s),
        "step_s_router_median": _median(router_s), "competition_steps": len(comp_s),
        "k_sweep": {str(k): v / math.log(2) for k, v in sweep.items()},
        "layers": ev.routing_analysis(loaded, batches),
        "params": ev.parameter_counts(loaded),
    }
    result["analysis_s"] = time.perf_counter() - start
    tmp = run.run_dir / (RESULT + ".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, run.run_dir / RESULT)
    return result


# ---------------------------------------------------------------------------------------------
# Reporting.


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _fmt(values: list[float], digits: int = 3) -> str:
    mean, std = _mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def collect(grid: Grid) -> dict[tuple[str, str], list[dict]]:
    """Finished results by (method, variant), in grid order."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for run in grid.runs:
        key = (run.method, run.variant)
        groups.setdefault(key, [])
        if run.finished():
            groups[key].append(json.loads((run.run_dir / RESULT).read_text()))
    return {k: v for k, v in groups.items() if v}


def label(key: tuple[str, str]) -> str:
    method, variant = key
    return METHODS[method][0] + (f" [{variant}]" if variant else "")


def verdict(ours: list[float], theirs: list[float]) -> str:
    """'won' / 'lost' when the mean ± std intervals do not overlap (lower is better), else 'tied'."""
    (m1, s1), (m2, s2) = _mean_std(ours), _mean_std(theirs)
    if m1 + s1 < m2 - s2:
        return "won"
    if m1 - s1 > m2 + s2:
        return "lost"
    return "tied"


def write_report(grid: Grid, total_wall_s: float | None = None) -> Path:
    import torch

    groups = collect(grid)
    if not groups:
        raise UserError(f"no finished runs in {grid.runs_dir}; run the grid first")
    grid.out_dir.mkdir(parents=True, exist_ok=True)
    figures = write_figures(groups, grid.out_dir)
    cfg = load_config(grid.base_config, grid.common)
    m, moe, t = cfg.model, cfg.moe, cfg.train
    runs_done = sum(len(v) for v in groups.values())
    run_walls = [r["wall_s"] + r["analysis_s"] for v in groups.values() for r in v]

    lines = [f"# CompeteSMoE and baselines: budget `{grid.budget}`", ""]
    lines += ["Produced by `competesmoe repro" + (" --quick" if grid.budget == "quick" else f" --budget {grid.budget}")
              + "` (launcher/repro.py) from the runs under `" + _rel(grid.runs_dir) + "`; every number below is "
              "read from those runs.", ""]
    lines += ["## Budget", "",
              ("- data: the bundled Wikipedia fragment (data/corpus, 6.1 MB)" if cfg.data.path is None else
               f"- data: {cfg.data.path}") + ", byte level, split 90/5/5 as `prepare` does; BPC = bits per byte"
              + (". Not comparable with published enwik8 numbers." if cfg.data.path is None else "."),
              f"- model: {m.n_layers} layers, d_model {m.d_model}, {m.n_heads} heads, context {m.seq_len}; MoE in every "
              f"block: {moe.num_experts} experts of width {moe.expert_hidden}, top-{moe.top_k} (Switch: top-1); the "
              f"dense baseline has one FFN of width {moe.top_k * moe.expert_hidden}.",
              f"- training: {t.max_steps} steps x {t.micro_batch_size} x {m.seq_len} tokens "
              f"({t.max_steps * t.micro_batch_size * m.seq_len / 1e6:.2f} M tokens, "
              f"{t.max_steps * t.micro_batch_size * m.seq_len / _train_tokens(grid):.2f} epochs of the train split), "
              f"AdamW lr {t.lr}, "
              f"cosine; one process with {grid.threads} thread(s) per run.",
              f"- CompeteSMoE: rate {moe.competition.rate}, warm-up {moe.competition.warmup}, cap {moe.competition.cap}, "
              f"affinity {moe.competition.affinity}, router loss {moe.competition.router_loss_coef}, diversity "
              f"{moe.competition.diversity_coef}. StableMoE stage 1: first {moe.baseline.stablemoe_stage1:.0%} of steps. "
              f"SMoE-Dropout: K from {moe.baseline.dropout_k_start} to {moe.baseline.dropout_k_end or moe.num_experts} "
              f"during training, K = {moe.top_k} at evaluation. XMoE: routing dim {moe.baseline.xmoe_dim}.",
              f"- evaluation: validation and test BPC on the first {t.eval_batches} x {t.micro_batch_size} windows of "
              f"each split ({t.eval_batches * t.micro_batch_size * m.seq_len:,} tokens), after the last step.",
              f"- seeds: {sorted({r['seed'] for v in groups.values() for r in v})} (weights, data order, competition "
              f"schedule); mean ± sample std over seeds.",
              f"- machine: {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), torch "
              f"{torch.__version__}, shared with other jobs: the timings are indicative.",
              f"- time: {runs_done} runs, {sum(run_walls) / 60:.1f} min of run time (training + analysis; median "
              f"{statistics.median(run_walls):.0f} s per run)"
              + (f"; this invocation took {total_wall_s / 60:.1f} min" if total_wall_s else "") + ".", ""]

    ref_key = next((k for k in groups if k[0] == REFERENCE and k[1] == ""), None) or \
        next((k for k in groups if k[0] == REFERENCE), None)
    ref_step = _mean_std([r["step_s_typical"] for r in groups[ref_key]])[0] if ref_key else None
    lines += ["## Results", "",
              "| method | seeds | params (total / active) | valid BPC | test BPC | train tokens/s | step time / GShard |",
              "|---|---|---|---|---|---|---|"]
    for key, results in groups.items():
        params = results[0]["params"]
        step = _mean_std([r["step_s_typical"] for r in results])[0]
        ratio = f"{step / ref_step:.2f}" if ref_step else "n/a"
        lines.append(f"| {label(key)} | {len(results)} | {params['total'] / 1e3:.0f}k / {params['active'] / 1e3:.0f}k | "
                     f"{_fmt([r['valid_bpc'] for r in results])} | {_fmt([r['test_bpc'] for r in results])} | "
                     f"{_fmt([r['tokens_per_s_median'] for r in results], 0)} | {ratio} |")
    lines += ["", "Train tokens/s: median over the steps after the first "
              f"{SKIP_STEPS}. Step time: the median time of steps with and of steps without a competing layer, "
              "weighted by their counts (a plain median would ignore the rare competition steps), mean over seeds, "
              "divided by the same for SMoE top-2 (GShard). Runs ran one after the other on a machine shared with "
              "other jobs, so cross-run timings carry their load; the within-run competition overhead below does not.",
              ""]

    comp_keys = [k for k in groups if k[0] == "competesmoe"]
    if comp_keys:
        lines += ["## Competition overhead", ""]
        for key in comp_keys:
            results = groups[key]
            comp = [r["step_s_competition_median"] for r in results if r["step_s_competition_median"]]
            router = [r["step_s_router_median"] for r in results if r["step_s_router_median"]]
            n_comp = sum(r["competition_steps"] for r in results) / len(results)
            overall = _mean_std([r["step_s_typical"] for r in results])[0]
            text = (f"- {label(key)}: on average {n_comp:.0f} of {results[0]['steps'] - SKIP_STEPS} timed steps had a "
                    f"competing layer")
            if comp and router:
                c, r_ = statistics.fmean(comp), statistics.fmean(router)
                text += (f". Within the same runs (interleaved, so other jobs' load hits both alike) a step with a "
                         f"competition took {c * 1e3:.1f} ms against {r_ * 1e3:.1f} ms for a router step ({c / r_:.2f}x); "
                         f"a router step computes exactly what SMoE top-2 computes, so the run's competition "
                         f"overhead over SMoE is {overall / r_:.3f}x")
            if ref_step:
                text += f". Against the separate SMoE top-2 (GShard) runs: {overall / ref_step:.2f}x (noisier: other times)"
            lines.append(text + ".")
        lines.append("")

        ours_key = next((k for k in comp_keys if k[1] == ""), comp_keys[0])
        lines += [f"## Where {label(ours_key)} won, lost or tied", "",
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
        lines.append("")

    lines += ["## Figures", ""]
    captions = {
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
    for name in figures:
        lines += [f"![{name}]({name}.png)", "", captions[name], ""]

    lines += ["## Test BPC by experts at evaluation", "", "| method | " + " | ".join(
        f"K={k}" for k in _all_ks(groups)) + " |", "|---|" + "---|" * len(_all_ks(groups))]
    for key, results in groups.items():
        cells = []
        for k in _all_ks(groups):
            vals = [r["k_sweep"][str(k)] for r in results if str(k) in r["k_sweep"]]
            cells.append(_fmt(vals) if vals else "")
        lines.append(f"| {label(key)} | " + " | ".join(cells) + " |")
    lines += ["", "## Every run", "", "| method | seed | valid BPC | test BPC | tokens/s | train s | analysis s |",
              "|---|---|---|---|---|---|---|"]
    for key, results in groups.items():
        for r in results:
            lines.append(f"| {label(key)} | {r['seed']} | {r['valid_bpc']:.4f} | {r['test_bpc']:.4f} | "
                         f"{r['tokens_per_s_median']:.0f} | {r['wall_s']:.0f} | {r['analysis_s']:.0f} |")
    lines.append("")
    path = grid.out_dir / "results.md"
    path.write_text("\n".join(lines))
    return path


def _train_tokens(grid: Grid) -> int:
    meta = load_meta(grid.data_dir)
    return int(meta["splits"]["train"]["tokens"])


def _rel(path: Path) -> str:
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


def _all_ks(groups) -> list[int]:
    return sorted({int(k) for v in groups.values() for r in v for k in r["k_sweep"]})


def write_figures(groups: dict[tuple[str, str], list[dict]], out_dir: Path) -> list[str]:
    try:
        import matplotlib
    except ImportError:
        raise UserError("the figures need matplotlib: pip install 'matplotlib>=3.7' (a dependency of the "
                        "package; then competesmoe repro --report-only draws them from the finished runs)") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    plt.rcParams.update({"font.size": 8, "figure.dpi": 100})
    keys = list(groups)
    colors = {k: plt.cm.tab10(i % 10) for i, k in enumerate(keys)}
    styles = {k: "-" if k[0] == "competesmoe" else "--" if k[0] == "dense" else "-" for k in keys}
    widths = {k: 2.2 if k[0] == "competesmoe" else 1.2 for k in keys}
    names = []

    # Fig. 2: validation curves.
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for key in keys:
        curves = [dict(map(tuple, r["valid"])) for r in groups[key]]
        steps = sorted(set.intersection(*[set(c) for c in curves]))
        values = np.array([[c[s] for s in steps] for c in curves])
        ax.plot(steps, values.mean(0), styles[key], color=colors[key], lw=widths[key], label=label(key))
        if len(curves) > 1:
            ax.fill_between(steps, values.min(0), values.max(0), color=colors[key], alpha=0.15)
    ax.set_xlabel("training step")
    ax.set_ylabel("validation BPC")
    last = [np.mean([r["valid_bpc"] for r in groups[k]]) for k in keys]
    ax.set_ylim(min(last) - 0.15, min(last) + 1.2)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("Validation BPC during training (mean over seeds, band min-max)")
    names.append(_save(fig, out_dir, "fig2_validation"))

    # Fig. 3: test BPC vs experts at evaluation.
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for key in keys:
        results = groups[key]
        ks = sorted({int(k) for r in results for k in r["k_sweep"]})
        means = [np.mean([r["k_sweep"][str(k)] for r in results]) for k in ks]
        stds = [np.std([r["k_sweep"][str(k)] for r in results], ddof=1) if len(results) > 1 else 0 for k in ks]
        if key[0] == "dense":
            ax.axhline(means[0], ls="--", color=colors[key], lw=1.2, label=label(key))
            continue
        ax.errorbar(ks, means, yerr=stds, marker="o", ms=3, capsize=2, color=colors[key], lw=widths[key],
                    label=label(key))
    ax.set_xscale("log", base=2)
    all_ks = _all_ks(groups)
    ax.set_xticks(all_ks)
    ax.set_xticklabels([str(k) for k in all_ks])
    ax.set_xlabel("experts activated per token at evaluation (K)")
    ax.set_ylabel("test BPC")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("Test BPC vs experts at evaluation (trained with K = top_k)")
    names.append(_save(fig, out_dir, "fig3_experts_at_eval"))

    moe_keys = [k for k in keys if groups[k][0]["layers"]]
    if moe_keys:
        n_layers = max(len(groups[k][0]["layers"]) for k in moe_keys)
        # Figs. 4-5: router entropy per layer.
        fig, axes = plt.subplots(1, n_layers + 1, figsize=(3.0 * (n_layers + 1), 3.0))
        for key in moe_keys:
            results = groups[key]
            for li in range(n_layers):
                hist = np.sum([r["layers"][li]["entropy_hist"] for r in results], axis=0)
                max_ent = results[0]["layers"][li]["max_entropy"]
                edges = np.linspace(0, max_ent, len(hist) + 1)
                axes[li].stairs(hist / hist.sum(), edges, color=colors[key], lw=widths[key] * 0.8, label=label(key))
                axes[li].set_title(f"MoE layer {li}: per-token entropy")
                axes[li].set_xlabel(f"router entropy (nats; max ln E = {max_ent:.2f})")
            means = [np.mean([r["layers"][li]["entropy_mean"] for r in results]) for li in range(n_layers)]
            axes[-1].plot(range(n_layers), means, marker="o", color=colors[key], lw=widths[key], label=label(key))
        axes[0].set_ylabel("share of tokens")
        axes[-1].set_title("mean router entropy per layer")
        axes[-1].set_xlabel("MoE layer")
        axes[-1].set_xticks(range(n_layers))
        axes[-1].legend(fontsize=6)
        fig.tight_layout()
        names.append(_save(fig, out_dir, "fig4_router_entropy"))

        # Representation collapse: similarity of expert outputs.
        cols = math.ceil(len(moe_keys) / 2)
        fig = plt.figure(figsize=(4.2 + 2.0 * cols, 4.4))
        spec = fig.add_gridspec(2, cols + 1, width_ratios=[2.2] + [1] * cols, wspace=0.35, hspace=0.45)
        line = fig.add_subplot(spec[:, 0])
        for key in moe_keys:
            results = groups[key]
            means = [np.mean([r["layers"][li]["similarity_mean"] for r in results]) for li in range(n_layers)]
            line.plot(range(n_layers), means, marker="o", color=colors[key], lw=widths[key], label=label(key))
        line.set_title("mean cosine between two experts' outputs")
        line.set_xlabel("MoE layer")
        line.set_xticks(range(n_layers))
        line.legend(fontsize=6)
        line.grid(alpha=0.3)
        heat = []
        for i, key in enumerate(moe_keys):
            ax = fig.add_subplot(spec[i % 2, 1 + i // 2])
            sim = np.array(groups[key][0]["layers"][-1]["similarity"])
            image = ax.imshow(sim, vmin=-1, vmax=1, cmap="RdBu_r")
            ax.set_title(f"{label(key)}", fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
            heat.append(ax)
        fig.colorbar(image, ax=heat, shrink=0.7, label="cosine (last MoE layer, first seed)")
        names.append(_save(fig, out_dir, "fig5_expert_similarity"))
    return names


def _save(fig, out_dir: Path, name: str) -> str:
    fig.savefig(out_dir / f"{name}.png", dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return name


# ---------------------------------------------------------------------------------------------


def add_arguments(parser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="budget 'quick': every method x 3 seeds, tiny models, 300 steps (~15 min on 2 cores)")
    parser.add_argument("--budget", choices=list(BUDGETS), default="small",
                        help="model and steps per run: quick (d64, 2 layers, 300 steps), small (default: the "
                             "tiny-cpu model, 500 steps), medium (2000 steps, batch 16)")
    parser.add_argument("--methods", nargs="+", metavar="METHOD", help=f"subset of: {' '.join(METHODS)}")
    parser.add_argument("--seeds", nargs="+", type=int, metavar="SEED", help="train.seed values (default: the budget's)")
    parser.add_argument("--steps", type=int, default=None, help="override train.max_steps of the budget")
    parser.add_argument("--ablation", choices=list(ABLATIONS), default=None,
                        help="a preset ablation grid (with its default methods)")
    parser.add_argument("--vary", action="append", metavar="KEY=V1,V2",
                        help="ablate any config field (repeat for a product), e.g. moe.competition.rate=0.01,0.5")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="extra override for every run")
    parser.add_argument("--jobs", type=int, default=1, help="runs at the same time (timings are cleanest with 1)")
    parser.add_argument("--threads", type=int, default=1,
                        help="threads per run (default 1: on a 2-core machine shared with other jobs, 2 threads "
                             "measured 4x slower)")
    parser.add_argument("--config", default=None, help="base YAML (default configs/tiny-cpu.yaml)")
    parser.add_argument("--runs-dir", default=None, help="where runs go (default runs/repro/<budget>)")
    parser.add_argument("--out", default=None, help="where results.md and the PNGs go (default docs/results/<budget>)")
    parser.add_argument("--dry-run", action="store_true", help="list the grid's runs and exit")
    parser.add_argument("--report-only", action="store_true", help="write the report from finished runs, train nothing")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args) -> int:
    if args.jobs < 1 or args.threads < 1:
        raise UserError(f"--jobs ({args.jobs}) and --threads ({args.threads}) must be at least 1")
    if args.steps is not None and args.steps < 1:
        raise UserError(f"--steps ({args.steps}) must be at least 1")
    grid = build_grid(args)
    if args.dry_run:
        for run in grid.runs:
            state = "finished" if run.finished() else "to run"
            print(f"{run.name}: {_rel(run.run_dir)} ({state}): " + " ".join(
                o for o in run.overrides if not o.startswith(("output_dir=", "data.prepared_dir="))))
        return 0
    start = time.perf_counter()
    if not args.report_only:
        run_grid(grid, args.jobs, progress=not args.no_progress)
    path = write_report(grid, None if args.report_only else time.perf_counter() - start)
    print(f"wrote {_rel(path)} and its figures", flush=True)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="competesmoe repro", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
