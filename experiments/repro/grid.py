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

BASE_CONFIG = Path(str(files("competesmoe.configs") / "tiny-cpu.yaml"))
RESULT = "result.json"

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
    extra = list(args.set or [])
    steps = [f"train.max_steps={args.steps}"] if args.steps else []
    runs = []
    for seed in args.seeds or spec["seeds"]:
        for label, variant in variants:
            for method in methods:
                common = spec["overrides"] + steps + variant + extra
                cfg = load_config(base, common)
                if cfg.data.tokenizer != "byte":
                    raise UserError("repro reports bits per character: keep data.tokenizer=byte")
                run_dir = runs_dir / (method + (f"@{label}" if label else "")) / f"seed{seed}"
                overrides = (common + method_overrides(method, cfg) + [f"train.seed={seed}",
                             f"data.prepared_dir={data_dir}", f"output_dir={run_dir}"])
                cfg = load_config(base, overrides)  # every run's settings are valid before anything starts
                runs.append(Run(method, label, seed, overrides, run_dir, cfg.train.max_steps))
    return Grid(budget, runs, runs_dir, out_dir, base, data_dir, args.threads,
                common=spec["overrides"] + steps + extra)


def _methods_and_variants(args, budget: str) -> tuple[list[str], list[tuple[str, list[str]]], str]:
    """The methods, the variants as (label, overrides) and the report's tag of --ablation / --vary / --methods."""
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
    return METHODS[method][0] + (f" [{variant}]" if variant else "")
