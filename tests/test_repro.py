"""`competesmoe repro`: the grid (methods differ only in routing), a tiny end-to-end grid that writes
results.md and four PNGs from real runs, resuming without re-running finished runs, the ablations, outputs
under the working directory, and the routing analyses against brute-force references. Budget 'compare' (issue 12):
every method on the same model, data and token budget with its seeds, the papers' presets as moe/presets.py defines
them, the upcycled method's two phases, --data, the paired t intervals (t quantiles against numerical integration,
the interval's coverage by simulation), the diagnostics' averages against hand-made records, and an end-to-end
compare grid with an upcycled method."""

import dataclasses
import json
import math
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch

from competesmoe.experiments.repro import grid as repro
from competesmoe.experiments.repro.report import verdict
from competesmoe.launcher.config import load_config
from support import competesmoe


def args(**kw) -> Namespace:
    base = dict(quick=False, budget="small", methods=None, seeds=None, steps=None, ablation=None, vary=None, set=None,
                jobs=1, threads=1, config=None, runs_dir="/tmp/x", out="/tmp/y", dry_run=True, report_only=False,
                no_progress=True, data=None)
    base.update(kw)
    return Namespace(**base)


def settings(run) -> dict:
    cfg = load_config(repro.BASE_CONFIG, run.overrides)
    return {"model": vars(cfg.model), "moe": {k: v for k, v in vars(cfg.moe).items()}, "train": vars(cfg.train)}


def test_quick_grid_is_every_method_times_three_seeds_differing_only_in_routing():
    grid = repro.build_grid(args(quick=True))
    assert [(r.method, r.seed) for r in grid.runs] == [(m, s) for s in (1, 2, 3) for m in repro.DEFAULT_METHODS]
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


# ------------------------------------------------------------------------------------------------------------------
# Budget 'compare' (issue 12 item 6).

TOP = ("gshard", "xmoe", "competesmoe-v2")


def total_tokens(run) -> int:
    """Training tokens of a method's run, both phases of an upcycled one."""
    cfg = load_config(repro.BASE_CONFIG, run.overrides)
    tokens = cfg.train.max_steps * cfg.train.micro_batch_size * cfg.model.seq_len
    return tokens + (total_tokens(run.needs) if run.needs else 0)


def test_compare_grid_gives_every_method_the_same_model_data_tokens_and_its_seeds():
    grid = repro.build_grid(args(budget="compare"))
    seeds = {}
    for run in grid.results:
        seeds.setdefault(run.method, []).append(run.seed)
    assert seeds == {m: [1, 2, 3, 4, 5] if m in TOP else [1, 2, 3] for m in
                     ("gshard", "xmoe", "xmoe-v1", "xmoe-v2", "competesmoe-v2", "competesmoe-v1", "competesmoe-upcycled")}
    small = load_config(repro.BASE_CONFIG, repro.BUDGETS["small"]["overrides"])
    small_tokens = small.train.max_steps * small.train.micro_batch_size * small.model.seq_len
    ref = load_config(repro.BASE_CONFIG, next(r for r in grid.runs if r.method == "gshard").overrides)
    for run in grid.results:
        cfg = load_config(repro.BASE_CONFIG, run.overrides)
        assert total_tokens(run) == total_tokens(grid.runs[0]) >= 10 * small_tokens, run.name
        assert dataclasses.replace(cfg.model, init_from=None, init_from_data="restart") == ref.model, run.name
        assert (cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.expert_hidden, cfg.moe.activation) == (8, 2, 256, "gelu")
        assert cfg.data == ref.data and cfg.train.seed == run.seed
        assert dataclasses.replace(cfg.train, max_steps=0, seed=0) == dataclasses.replace(ref.train, max_steps=0, seed=0)


def test_compare_methods_are_the_presets_of_moe_presets():
    from competesmoe.moe.presets import preset_overrides

    grid = repro.build_grid(args(budget="compare", seeds=[1]))
    budget = repro.BUDGETS["compare"]["overrides"]
    for method in ("xmoe-v1", "xmoe-v2", "competesmoe-v2", "competesmoe-v1"):
        run = next(r for r in grid.runs if r.method == method)
        want = load_config(repro.BASE_CONFIG, budget + preset_overrides(method, 8)).moe
        assert load_config(repro.BASE_CONFIG, run.overrides).moe == want, method
    xmoe_v2 = load_config(repro.BASE_CONFIG, next(r for r in grid.runs if r.method == "xmoe-v2").overrides).moe
    assert (xmoe_v2.baseline.xmoe_dim, xmoe_v2.baseline.xmoe_learn_temperature) == (4, False)
    v1 = load_config(repro.BASE_CONFIG, next(r for r in grid.runs if r.method == "competesmoe-v1").overrides).moe
    assert (v1.competition.variant, v1.competition.rate) == ("v1", 1.0)


def test_upcycled_method_is_a_dense_phase_then_the_v2_moe_from_it_on_the_data_that_follows():
    grid = repro.build_grid(args(budget="compare", seeds=[1]))
    names = [r.name for r in grid.runs]
    moe = next(r for r in grid.runs if r.method == "competesmoe-upcycled" and not r.phase)
    dense = moe.needs
    assert dense.phase == "dense" and names.index(dense.name) < names.index(moe.name)
    assert dense not in grid.results and moe in grid.results
    d_cfg, m_cfg = (load_config(repro.BASE_CONFIG, r.overrides) for r in (dense, moe))
    assert d_cfg.model.layout == "dense" and d_cfg.model.dense_hidden == m_cfg.moe.expert_hidden
    assert d_cfg.train.max_steps == round(0.25 * 2560) and d_cfg.train.max_steps + m_cfg.train.max_steps == 2560
    assert d_cfg.train.seed == m_cfg.train.seed and d_cfg.train.micro_batch_size == m_cfg.train.micro_batch_size
    assert (m_cfg.model.init_from, m_cfg.model.init_from_data) == (str(dense.run_dir), "continue")
    v2 = load_config(repro.BASE_CONFIG, next(r for r in grid.runs if r.method == "competesmoe-v2").overrides).moe
    assert m_cfg.moe == dataclasses.replace(v2, upcycle_noise=repro.UPCYCLE_NOISE)


def test_fingerprints_follow_the_settings_not_the_folders():
    here = repro.build_grid(args(budget="compare", seeds=[1], runs_dir="/tmp/a"))
    there = repro.build_grid(args(budget="compare", seeds=[1], runs_dir="/tmp/b"))
    assert [r.fingerprint for r in here.runs] == [r.fingerprint for r in there.runs]
    other_lr = repro.build_grid(args(budget="compare", seeds=[1], set=["train.lr=0.001"]))
    assert not {r.fingerprint for r in here.runs} & {r.fingerprint for r in other_lr.runs}
    # an upcycled run follows its dense phase's settings
    moe = next(r for r in here.runs if r.method == "competesmoe-upcycled" and not r.phase)
    changed = dataclasses.replace(moe, needs=dataclasses.replace(moe.needs, overrides=moe.needs.overrides + ["x=1"]))
    assert changed.fingerprint != moe.fingerprint


def test_a_run_waits_for_its_first_phase():
    from competesmoe.experiments.repro.runner import _next_ready

    grid = repro.build_grid(args(budget="compare", seeds=[1], methods=["competesmoe-upcycled", "gshard"],
                                 runs_dir="/nonexistent/runs"))
    dense, moe, gshard = grid.runs
    assert _next_ready([moe, gshard]) is gshard and _next_ready([moe]) is None and _next_ready([dense, moe]) is dense


def test_data_flag_trains_on_any_text_file(tmp_path):
    corpus = tmp_path / "mine.txt"
    corpus.write_text("some text of my own\n" * 1000)
    grid = repro.build_grid(args(budget="compare", seeds=[1], data=str(corpus)))
    assert {load_config(repro.BASE_CONFIG, r.overrides).data.path for r in grid.runs} == {str(corpus)}
    assert "--data" in grid.command
    missing = competesmoe("repro", "--budget", "compare", "--data", str(tmp_path / "nope.txt"), "--dry-run",
                          timeout=900)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert f"--data {tmp_path / 'nope.txt'}: corpus" in missing.stderr and "does not exist" in missing.stderr


def test_t_quantile_against_numerical_integration_of_the_density():
    from competesmoe.experiments.repro.stats import t_quantile

    for df in range(1, 9):
        for level in (0.9, 0.95, 0.99):
            q = t_quantile(level, df)
            x = np.linspace(0.0, q, 400_001)
            log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
            density = np.exp(log_c - (df + 1) / 2 * np.log1p(x * x / df))
            assert 2 * np.trapezoid(density, x) == pytest.approx(level, abs=1e-7), (df, level)


def test_paired_interval_covers_the_true_difference_95_percent_of_the_time():
    from competesmoe.experiments.repro.stats import paired

    rng = np.random.default_rng(0)
    hits, trials = 0, 4000
    for _ in range(trials):
        ours, ref = rng.normal(1.0, 1.0, 3), rng.normal(0.0, 1.0, 3)
        lo, hi = paired(dict(enumerate(ours)), dict(enumerate(ref))).interval
        hits += lo <= 1.0 <= hi
    assert hits / trials == pytest.approx(0.95, abs=0.012)


def test_paired_verdicts_and_pairs_by_seed():
    from competesmoe.experiments.repro.stats import paired

    ref = {1: 3.0, 2: 3.1, 3: 2.9, 4: 3.0}
    better = paired({1: 2.9, 2: 2.99, 3: 2.81}, ref)
    assert better.seeds == [1, 2, 3] and better.differences == pytest.approx([-0.1, -0.11, -0.09])
    assert better.verdict() == "better"
    assert paired({1: 3.1, 2: 3.21, 3: 2.99}, ref).verdict() == "worse"
    assert paired({1: 2.9, 2: 3.2, 3: 2.9}, ref).verdict() == "not resolved"
    assert paired({1: 2.0}, ref).verdict() == "not resolved"  # one pair: no interval


def test_diagnostics_average_the_competing_layers_per_window():
    from competesmoe.experiments.repro.analysis import diagnostics

    def record(step, competed0, ratio0):
        router = {"competed": 0.0, "aux_loss_to_lm": 0.01 * step}
        layer0 = {"competed": 1.0, "competition_entropy_ratio": ratio0, "aux_loss_to_lm": 0.5} if competed0 else router
        return {"step": step, "split": "train", "moe": [layer0, router]}

    train = [record(s, s in (2, 7, 9), 0.1 * s) for s in range(1, 11)]
    d = diagnostics(train, 10)
    assert d["early"]["competition_entropy_ratio"] == pytest.approx(0.2)  # steps 1-2 (first 25%): step 2
    assert d["late"]["competition_entropy_ratio"] == pytest.approx(0.8)  # steps 6-10: steps 7 and 9
    assert d["late"]["competition_layer_steps"] == 2 and d["late"]["aux_loss_to_lm"] == 0.5
    # router steps: layer 1 at steps 6-10 and layer 0 at 6, 8, 10
    assert d["late"]["router_aux_loss_to_lm"] == pytest.approx(0.01 * (6 + 7 + 8 + 9 + 10 + 6 + 8 + 10) / 8)
    assert d["late"]["layers"][1] == {"router_aux_loss_to_lm": pytest.approx(0.08), "competition_layer_steps": 0}


@pytest.mark.slow
def test_compare_grid_end_to_end_with_an_upcycled_method(tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "out"
    command = ["repro", "--budget", "compare", "--steps", "8", "--methods", "gshard", "competesmoe-upcycled",
               "--seeds", "1", "2", "--runs-dir", str(runs), "--out", str(out), "--no-progress", "--jobs", "2",
               "--set", "train.eval_every=2", "--set", "train.eval_batches=2"]
    result = competesmoe(*command, timeout=1800)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
    assert "6 to run" in result.stdout
    gshard = json.loads((runs / "gshard" / "seed1" / "result.json").read_text())
    up = json.loads((runs / "competesmoe-upcycled" / "seed1" / "result.json").read_text())
    assert up["tokens"] == gshard["tokens"] == 8 * 16 * 128 and up["first_phase"]["steps"] == 2
    assert [s for s, _ in up["valid"]] == [s for s, _ in gshard["valid"]] == [2, 4, 6, 8]
    assert "initialised from" in (runs / "competesmoe-upcycled" / "seed1" / "train.log").read_text()
    text = (out / "results.md").read_text()
    for needle in ("## Paired differences against SMoE top-2 (GShard)", "CompeteSMoE v2 upcycled from dense | 2 |",
                   "Did the competition carry a signal", "first a dense model of one expert's width for 2 steps"):
        assert needle in text, needle
    again = competesmoe(*command, "--report-only", timeout=900)
    assert again.returncode == 0 and "to run" not in again.stdout, again.stderr[-2000:]


def test_gshard_and_the_competesmoes_start_from_the_same_weights_at_the_same_seed():
    from competesmoe.launcher.trainer import seed_everything
    from competesmoe.moe.model import TransformerLM

    grid = repro.build_grid(args(budget="compare", seeds=[2], methods=["gshard", "competesmoe-v2", "competesmoe-v1"]))
    states = []
    for run in grid.runs:
        cfg = load_config(repro.BASE_CONFIG, run.overrides)
        seed_everything(cfg.train.seed)  # as the trainer does before building the model
        states.append(TransformerLM(cfg.model, cfg.moe, vocab_size=256).state_dict())
    for state in states[1:]:
        assert state.keys() == states[0].keys() and all(torch.equal(state[k], states[0][k]) for k in state)
