"""The comparison's grid: the methods (routing policies on the same model), the budgets, the preset
ablations, and the (method x variant x seed) runs a command line makes of them."""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path

from competesmoe.common.errors import UserError
from competesmoe.launcher.config import Config, load_config
from competesmoe.moe.presets import preset_overrides

BASE_CONFIG = Path(str(files("competesmoe.configs") / "tiny-cpu.yaml"))
RESULT = "result.json"

@dataclass(frozen=True)
class Method:
    label: str
    """How the report names it."""
    overrides: tuple[str, ...] = ()
    """Its `moe.*` settings on the budget's model."""
    preset: str | None = None
    """A paper's settings from moe/presets.py, applied after `overrides`."""
    upcycled: bool = False
    """Trained in two phases that share the run's token budget: a dense model of one expert's width for the
    budget's upcycle_share of the steps, then this MoE upcycled from it (experts = copies of the dense FFN plus
    UPCYCLE_NOISE, fresh routers) for the rest, continuing the same data stream."""


METHODS: dict[str, Method] = {
    "switch": Method("SMoE top-1 (Switch)", ("moe.router=smoe", "moe.top_k=1", "moe.baseline.smoe_raw_gates=true")),
    "gshard": Method("SMoE top-2 (GShard)", ("moe.router=smoe",)),
    "xmoe": Method("XMoE", ("moe.router=xmoe",)),
    "xmoe-v1": Method("XMoE (v1 paper's settings)", preset="xmoe-v1"),
    "xmoe-v2": Method("XMoE (v2 code's settings)", preset="xmoe-v2"),
    "stablemoe": Method("StableMoE", ("moe.router=stablemoe",)),
    "smoe-dropout": Method("SMoE-Dropout", ("moe.router=smoe_dropout",)),
    "dense": Method("Dense FFN (same active params)"),
    "competesmoe": Method("CompeteSMoE", ("moe.router=competesmoe",)),
    "competesmoe-v2": Method("CompeteSMoE v2 (official coefficients)", preset="competesmoe-v2"),
    "competesmoe-v1": Method("CompeteSMoE v1 regime", preset="competesmoe-v1"),
    "competesmoe-upcycled": Method("CompeteSMoE v2 upcycled from dense", preset="competesmoe-v2", upcycled=True),
}
DEFAULT_METHODS = ["switch", "gshard", "xmoe", "stablemoe", "smoe-dropout", "dense", "competesmoe"]
"""The grid of budgets quick, small and medium (the papers' table); budget 'compare' names its own."""
UPCYCLE_NOISE = 0.005
"""moe.upcycle_noise of the upcycled method: 6% (w_in) and 8% (w_out) of the initial weights' spread at the
compare budget's shape (N(0, 1/128), N(0, 1/256)): the experts differ from the start (a competition among identical
experts is a tie) while the upcycled model stays close to the dense one."""

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
    # Issue 12: at least 10x the 'small' budget's tokens per run (2560 x 16 x 128 = 5.24 M against 0.51 M), every
    # method on the same data, model and budget; 5 seeds for the reference and the two strongest candidates.
    # Two MoE blocks of the tiny-cpu model's shape (d_model 128, 8 experts of width 256): half its depth halves
    # the cost of a token, which buys the tokens and seeds on 2 shared cores; README 'Results' says why.
    "compare": {"seeds": [1, 2, 3], "more_seeds": {m: [4, 5] for m in ("gshard", "xmoe", "competesmoe-v2")},
                "methods": ["gshard", "xmoe", "xmoe-v1", "xmoe-v2", "competesmoe-v2", "competesmoe-v1",
                            "competesmoe-upcycled"],
                "upcycle_share": 0.25,
                "overrides": _COMMON + ["model.d_model=128", "model.n_layers=2", "model.n_heads=4",
                                        "model.seq_len=128", "moe.num_experts=8", "moe.top_k=2",
                                        "moe.expert_hidden=256", "train.max_steps=2560", "train.micro_batch_size=16",
                                        "train.lr=0.002", "train.warmup_steps=50", "train.eval_every=320",
                                        "train.eval_batches=32"]},
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
    spec = METHODS[method]
    return list(spec.overrides) + (preset_overrides(spec.preset, cfg.moe.num_experts) if spec.preset else [])


def dense_phase_overrides(cfg: Config, steps: int) -> list[str]:
    """An upcycled method's first phase: the dense model whose FFN (one expert's width and activation) its experts
    copy, trained for `steps`."""
    return ["model.layout=dense", f"model.dense_hidden={cfg.moe.expert_hidden}", f"train.max_steps={steps}"]


def upcycle_overrides(dense_dir: Path, steps: int) -> list[str]:
    """An upcycled method's second phase: starts from the dense phase's weights and data position."""
    return [f"model.init_from={dense_dir}", "model.init_from_data=continue", f"moe.upcycle_noise={UPCYCLE_NOISE}",
            f"train.max_steps={steps}"]


LOCAL = ("output_dir=", "data.prepared_dir=", "model.init_from=")
"""Overrides that name where a run is, not what it computes: left out of fingerprints and listings."""


@dataclass
class Run:
    method: str
    variant: str
    seed: int
    overrides: list[str]
    run_dir: Path
    max_steps: int
    needs: Run | None = None
    """The run whose checkpoint this one starts from (an upcycled method's dense phase); it runs first."""
    phase: str = ""
    """'dense' for an upcycled method's first phase (not a result of its own), else ''."""

    @property
    def name(self) -> str:
        variant = f"@{self.variant}" if self.variant else ""
        phase = f" ({self.phase} phase)" if self.phase else ""
        return f"{self.method}{variant}{phase} seed {self.seed}"

    @property
    def fingerprint(self) -> str:
        text = json.dumps([o for o in self.overrides if not o.startswith(LOCAL)]
                          + ([self.needs.fingerprint] if self.needs else []))
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
    command: str = ""
    """The `competesmoe repro` options that name this grid (budget, data), for the report."""

    @property
    def results(self) -> list[Run]:
        """The runs that are results of their own (not an upcycled method's dense phase)."""
        return [r for r in self.runs if not r.phase]


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
    """The runs of a parsed command line, each run's settings validated before anything starts. Runs go to
    --runs-dir (default runs/repro/<budget>), the report to --out (default results/repro/<tag>), both
    under the working directory."""
    budget = "quick" if args.quick else args.budget
    spec = BUDGETS[budget]
    methods, variants, tag = _methods_and_variants(args, budget)
    runs_dir = Path(args.runs_dir or Path("runs") / "repro" / budget).resolve()
    out_dir = Path(args.out or Path("results") / "repro" / tag).resolve()
    data_dir = runs_dir / "data"
    base = Path(args.config).resolve() if args.config else BASE_CONFIG
    data = [f"data.path={data_file(args.data)}"] if args.data else []
    extra = data + list(args.set or [])
    steps = [f"train.max_steps={args.steps}"] if args.steps else []
    runs = []
    for seed in sorted({s for m in methods for s in _seeds(args, spec, m)}):
        for label, variant in variants:
            for method in (m for m in methods if seed in _seeds(args, spec, m)):
                common = spec["overrides"] + steps + variant + extra
                cfg = load_config(base, common)
                if cfg.data.tokenizer != "byte":
                    raise UserError("repro reports bits per character: keep data.tokenizer=byte")
                run_dir = runs_dir / (method + (f"@{label}" if label else "")) / f"seed{seed}"
                where = [f"train.seed={seed}", f"data.prepared_dir={data_dir}"]
                needs = None
                overrides = common + method_overrides(method, cfg)
                if METHODS[method].upcycled:
                    dense_steps = max(1, round(cfg.train.max_steps * spec.get("upcycle_share", 0.25)))
                    if dense_steps >= cfg.train.max_steps:
                        raise UserError(f"{method} needs at least 2 steps (a dense phase, then the MoE); raise --steps")
                    dense_dir = run_dir.with_name(f"seed{seed}-dense")
                    needs = _run(base, method, label, seed, common + dense_phase_overrides(cfg, dense_steps) + where,
                                 dense_dir, phase="dense")
                    runs.append(needs)
                    overrides += upcycle_overrides(dense_dir, cfg.train.max_steps - dense_steps)
                runs.append(_run(base, method, label, seed, overrides + where, run_dir, needs=needs))
    command = f"competesmoe repro {'--quick' if args.quick else '--budget ' + budget}" + \
        (f" --data {args.data}" if args.data else "")
    return Grid(budget, runs, runs_dir, out_dir, base, data_dir, args.threads,
                common=spec["overrides"] + steps + extra, command=command)


def _run(base: Path, method: str, label: str, seed: int, overrides: list[str], run_dir: Path, **kw) -> Run:
    """A run of the grid, its settings validated now (so every run is valid before anything starts)."""
    overrides = overrides + [f"output_dir={run_dir}"]
    cfg = load_config(base, overrides)
    return Run(method, label, seed, overrides, run_dir, cfg.train.max_steps, **kw)


def _seeds(args, spec: dict, method: str) -> list[int]:
    """--seeds, else the budget's seeds and its extra seeds for `method`."""
    return args.seeds or spec["seeds"] + spec.get("more_seeds", {}).get(method, [])


def data_file(path: str) -> Path:
    """--data: a readable text file (the checks of data.path), as an absolute path."""
    from competesmoe.data.prepare import resolve_corpus

    try:
        return resolve_corpus(str(Path(path).resolve())).resolve()
    except UserError as err:
        raise UserError(f"--data {path}: {str(err).removeprefix('data.path: ')}") from None


def _methods_and_variants(args, budget: str) -> tuple[list[str], list[tuple[str, list[str]]], str]:
    """The methods, the variants as (label, overrides) and the report's tag of --ablation / --vary / --methods."""
    variants: list[tuple[str, list[str]]] = [("", [])]
    default_methods = BUDGETS[budget].get("methods", DEFAULT_METHODS)
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
    return methods, variants, tag


def shown(path: Path) -> str:
    """`path` as the user would type it: relative to the working directory when below it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def label(key: tuple[str, str]) -> str:
    """A (method, variant) as the report names it."""
    method, variant = key
    return METHODS[method].label + (f" [{variant}]" if variant else "")
