"""`competesmoe repro`: the grid (methods differ only in routing), a tiny end-to-end grid that writes
results.md and four PNGs from real runs, resuming without re-running finished runs, the ablations, outputs
under the working directory, and the routing analyses against brute-force references."""

import json
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from competesmoe.experiments.repro import grid as repro
from competesmoe.experiments.repro.report import verdict
from competesmoe.launcher.config import load_config
from support import competesmoe


def args(**kw) -> Namespace:
    base = dict(quick=False, budget="small", methods=None, seeds=None, steps=None, ablation=None, vary=None, set=None,
                jobs=1, threads=1, config=None, runs_dir="/tmp/x", out="/tmp/y", dry_run=True, report_only=False,
                no_progress=True)
    base.update(kw)
    return Namespace(**base)


def settings(run) -> dict:
    cfg = load_config(repro.BASE_CONFIG, run.overrides)
    return {"model": vars(cfg.model), "moe": {k: v for k, v in vars(cfg.moe).items()}, "train": vars(cfg.train)}


def test_quick_grid_is_every_method_times_three_seeds_differing_only_in_routing():
    grid = repro.build_grid(args(quick=True))
    assert [(r.method, r.seed) for r in grid.runs] == [(m, s) for s in (1, 2, 3) for m in repro.METHODS]
    by_seed = {}
    for run in grid.runs:
        cfg = load_config(repro.BASE_CONFIG, run.overrides)
        assert cfg.data.tokenizer == "byte" and cfg.train.seed == run.seed and cfg.train.max_steps == 300
        by_seed.setdefault(run.seed, {})[run.method] = cfg
    for seed, cfgs in by_seed.items():
        ref = cfgs["gshard"]
        for method, cfg in cfgs.items():
            assert cfg.train == ref.train and cfg.data == ref.data, method
            if method != "dense":
                assert (cfg.model == ref.model and cfg.moe.num_experts == ref.moe.num_experts
                        and cfg.moe.expert_hidden == ref.moe.expert_hidden), method
        assert cfgs["switch"].moe.top_k == 1 and cfgs["gshard"].moe.router == "smoe" and cfgs["gshard"].moe.top_k == 2
        assert cfgs["dense"].model.layout == "dense"
        assert cfgs["dense"].model.dense_hidden == ref.moe.top_k * ref.moe.expert_hidden
        assert {cfgs[m].moe.router for m in ("xmoe", "stablemoe", "smoe-dropout", "competesmoe")} == \
            {"xmoe", "stablemoe", "smoe_dropout", "competesmoe"}


def test_ablations_and_vary():
    rate = repro.build_grid(args(quick=True, ablation="rate", seeds=[1]))
    rates = [load_config(repro.BASE_CONFIG, r.overrides).moe.competition.rate for r in rate.runs]
    assert rates == [0.01, 0.05, 0.1, 0.2, 0.5] and {r.method for r in rate.runs} == {"competesmoe"}
    affinity = repro.build_grid(args(quick=True, ablation="affinity", seeds=[1]))
    assert [load_config(repro.BASE_CONFIG, r.overrides).moe.competition.affinity for r in affinity.runs] == \
        ["softplus_mean", "l2_norm", "relu_mean", "sigmoid_mean"]
    experts = repro.build_grid(args(quick=True, ablation="experts", seeds=[1]))
    shapes = [(r.method, load_config(repro.BASE_CONFIG, r.overrides).moe.num_experts,
               load_config(repro.BASE_CONFIG, r.overrides).moe.top_k) for r in experts.runs]
    assert ("competesmoe", 16, 4) in shapes and ("gshard", 4, 1) in shapes and len(shapes) == 8
    vary = repro.build_grid(args(quick=True, seeds=[1], methods=["competesmoe"],
                                 vary=["moe.competition.cap=1,2", "moe.competition.diversity_coef=0,0.1"]))
    combos = {(c.moe.competition.cap, c.moe.competition.diversity_coef)
              for c in (load_config(repro.BASE_CONFIG, r.overrides) for r in vary.runs)}
    assert combos == {(1, 0.0), (1, 0.1), (2, 0.0), (2, 0.1)}
    assert len({r.run_dir for r in vary.runs}) == 4


def test_verdict_rule():
    assert verdict([1.0, 1.1], [1.5, 1.6]) == "won"
    assert verdict([1.5, 1.6], [1.0, 1.1]) == "lost"
    assert verdict([1.0, 1.4], [1.1, 1.5]) == "tied"


def test_outputs_default_to_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    here = Path.cwd()
    quick = repro.build_grid(args(quick=True, runs_dir=None, out=None))
    assert quick.runs_dir == here / "runs" / "repro" / "quick"
    assert quick.out_dir == here / "results" / "repro" / "quick"
    assert quick.runs[0].run_dir == quick.runs_dir / "switch" / "seed1" and quick.data_dir == quick.runs_dir / "data"
    rate = repro.build_grid(args(quick=True, ablation="rate", runs_dir=None, out=None))
    assert rate.out_dir == here / "results" / "repro" / "quick-rate"
    assert repro.shown(rate.out_dir) == "results/repro/quick-rate" and repro.shown(here.parent) == str(here.parent)
    chosen = repro.build_grid(args(quick=True, runs_dir="elsewhere/runs", out="docs/results/quick"))
    assert chosen.runs_dir == here / "elsewhere" / "runs" and chosen.out_dir == here / "docs" / "results" / "quick"


def test_expert_similarity_is_the_mean_cosine_over_tokens():
    from competesmoe.experiments.repro.analysis import expert_similarity

    outputs_EGD = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(0))
    want = torch.tensor([[sum(torch.nn.functional.cosine_similarity(outputs_EGD[e, g], outputs_EGD[f, g], dim=0)
                              for g in range(5)) / 5 for f in range(3)] for e in range(3)])
    torch.testing.assert_close(expert_similarity(outputs_EGD), want, rtol=1e-5, atol=1e-6)


def test_bad_method_is_one_line():
    result = competesmoe("repro", "--methods", "gshrad", "--dry-run", timeout=900)
    assert result.returncode == 2 and "unknown method 'gshrad'" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_tiny_grid_end_to_end_and_resume(tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "out"
    common = ["repro", "--quick", "--steps", "12", "--methods", "gshard", "dense", "competesmoe",
              "--seeds", "1", "2", "--runs-dir", str(runs), "--out", str(out), "--no-progress",
              "--set", "train.eval_every=6", "--set", "moe.competition.rate=0.5", "--set", "train.eval_batches=2"]
    result = competesmoe(*common, "--jobs", "2", timeout=900)  # two children at a time
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
    assert "6 to run" in result.stdout
    text = (out / "results.md").read_text()
    for name in ("SMoE top-2 (GShard)", "Dense FFN", "CompeteSMoE", "Competition overhead",
                 "Where CompeteSMoE won, lost or tied", "± "):
        assert name in text, name
    for fig in ("fig2_validation", "fig3_experts_at_eval", "fig4_router_entropy", "fig5_expert_similarity"):
        png = out / f"{fig}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000, fig
        assert f"({fig}.png)" in text
    for method in ("gshard", "competesmoe"):
        r = json.loads((runs / method / "seed1" / "result.json").read_text())
        # the K sweep at the trained K repeats the trainer's own test figure
        assert r["k_sweep"][str(r["top_k"])] == pytest.approx(r["test_bpc"], rel=1e-5)
        assert [s for s, _ in r["valid"]] == [6, 12]
        assert len(r["layers"]) == 2 and len(r["layers"][0]["similarity"]) == 8
    comp = json.loads((runs / "competesmoe" / "seed1" / "result.json").read_text())
    assert comp["competition_steps"] > 0
    dense = json.loads((runs / "dense" / "seed1" / "result.json").read_text())
    assert dense["layers"] == [] and dense["params"]["total"] == dense["params"]["active"]

    # resume: nothing reruns; a removed result reruns alone
    stamp = (runs / "gshard" / "seed1" / "metrics.jsonl").stat().st_mtime_ns
    (runs / "dense" / "seed2" / "result.json").unlink()
    again = competesmoe(*common, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "5 already finished, 1 to run" in again.stdout
    assert (runs / "gshard" / "seed1" / "metrics.jsonl").stat().st_mtime_ns == stamp
    assert (runs / "dense" / "seed2" / "result.json").is_file()
