"""`competesmoe repro`: the papers' comparison in one command: a grid of (method x seed) byte-level
runs on the bundled Wikipedia corpus (or any text file, --data), then results.md and the figures.

    competesmoe repro --quick                        # every method, 3 seeds, tiny models (~15 min, 2 cores)
    competesmoe repro                                # the default grid: every method, 3 seeds, budget 'small'
    competesmoe repro --budget compare --jobs 2      # issue 12's comparison: 10x the tokens, paired statistics
    competesmoe repro --budget compare --data my_corpus.txt --runs-dir runs/mine
    competesmoe repro --budget medium --seeds 1 2 3 --methods gshard competesmoe
    competesmoe repro --quick --ablation rate        # CompeteSMoE at competition rates 0.01 .. 0.5
    competesmoe repro --quick --vary moe.competition.cap=1,2 --methods competesmoe

Methods (same model, same data, same seeds, same tokens; only the routing differs, see moe/baselines.py and
moe/presets.py): switch (SMoE top-1), gshard (SMoE top-2), xmoe, xmoe-v1 and xmoe-v2 (XMoE with the v1 paper's
and the v2 code's settings), stablemoe, smoe-dropout, dense (a dense FFN of width top_k * expert_hidden: the
active parameters of top_k experts), competesmoe (this project's defaults with the budget's rate), competesmoe-v2
(the official v2 coefficients), competesmoe-v1 (the v1 regime: a competition on every forward) and
competesmoe-upcycled (a dense model for a quarter of the steps, upcycled into competesmoe-v2 for the rest).
Budgets quick, small and medium run the first seven; budget compare runs gshard, the XMoEs and the CompeteSMoEs.

Each run is `competesmoe train` in a child process (one rank, `--threads` threads) into
`<runs-dir>/<method>[@variant]/seed<S>/`, with its log in `train.log`. When it has finished, the
checkpoint is analysed in this process (experiments/repro/analysis.py): test BPC with K = 1, 2, 4, ...
experts at evaluation, the per-token router entropy and top-1 probability per layer, the similarity
of the experts' outputs and the competition's diagnostics from metrics.jsonl; all of it goes to `result.json`.
A run with a `result.json` made from the same settings is not run again (the grid resumes); an unfinished one
is started over. Then `<out>/results.md` (with each method's per-seed differences against GShard and their 95%
t intervals) and four PNGs are written from every finished run of the grid; `--report-only` writes them from the
runs finished so far. Both folders default to the working directory: runs/repro/<budget> and
results/repro/<budget>[-<ablation>|-vary].
"""

from __future__ import annotations

import argparse
import time

from competesmoe.common.options import integer
from competesmoe.experiments.repro.grid import ABLATIONS, BUDGETS, METHODS, build_grid, shown
from competesmoe.launcher.config import SEED_LIMIT


def add_command(subparsers) -> None:
    """Entry point `competesmoe.commands: repro`: add `competesmoe repro` to the command's sub-parsers."""
    parser = subparsers.add_parser("repro", help="the papers' comparison: a (method x seed) grid, results.md and "
                                                 "figures",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.set_defaults(run_command=main)


def add_arguments(parser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="budget 'quick': every method x 3 seeds, tiny models, 300 steps (~15 min on 2 cores)")
    parser.add_argument("--budget", choices=list(BUDGETS), default="small",
                        help="model and steps per run: quick (d64, 2 layers, 300 steps), small (default: the "
                             "tiny-cpu model, 500 steps), medium (2000 steps, batch 16), compare (2 layers of the "
                             "tiny-cpu shape, 2560 steps x 16 x 128 = 5.2 M tokens, 3 to 5 seeds)")
    parser.add_argument("--data", default=None, metavar="FILE",
                        help="train and evaluate on this text file (split 90/5/5 by bytes, byte level) instead of "
                             "the bundled Wikipedia fragment; keep a --runs-dir per corpus")
    parser.add_argument("--methods", nargs="+", metavar="METHOD", help=f"subset of: {' '.join(METHODS)}")
    parser.add_argument("--seeds", nargs="+", type=integer(0, SEED_LIMIT - 1), metavar="SEED",
                        help="train.seed values (default: the budget's)")
    parser.add_argument("--steps", type=integer(1), default=None, help="override train.max_steps of the budget")
    parser.add_argument("--ablation", choices=list(ABLATIONS), default=None,
                        help="a preset ablation grid (with its default methods)")
    parser.add_argument("--vary", action="append", metavar="KEY=V1,V2",
                        help="ablate any config field (repeat for a product), e.g. moe.competition.rate=0.01,0.5")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="extra override for every run")
    parser.add_argument("--jobs", type=integer(1), default=1, help="runs at the same time (timings are cleanest with 1)")
    parser.add_argument("--threads", type=integer(1), default=1,
                        help="threads per run (default 1: on a 2-core machine shared with other jobs, 2 threads "
                             "measured 4x slower)")
    parser.add_argument("--config", default=None, help="base YAML (default configs/tiny-cpu.yaml)")
    parser.add_argument("--runs-dir", default=None, help="where runs go (default runs/repro/<budget>)")
    parser.add_argument("--out", default=None,
                        help="where results.md and the PNGs go (default results/repro/<budget>; the committed "
                             "reports: --out docs/results/<budget>)")
    parser.add_argument("--dry-run", action="store_true", help="list the grid's runs and exit")
    parser.add_argument("--report-only", action="store_true", help="write the report from finished runs, train nothing")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args) -> int:
    grid = build_grid(args)
    if args.dry_run:
        for run in grid.runs:
            state = "finished" if run.finished() else "to run"
            print(f"{run.name}: {shown(run.run_dir)} ({state}): " + " ".join(
                o for o in run.overrides if not o.startswith(("output_dir=", "data.prepared_dir="))))
        return 0
    from competesmoe.experiments.repro.report import write_report
    from competesmoe.experiments.repro.runner import run_grid

    start = time.perf_counter()
    if not args.report_only:
        run_grid(grid, args.jobs, progress=not args.no_progress)
    path = write_report(grid, None if args.report_only else time.perf_counter() - start)
    print(f"wrote {shown(path)} and its figures", flush=True)
    return 0
