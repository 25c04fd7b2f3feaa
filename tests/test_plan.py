"""`competesmoe plan` and MFU in every run.

The plan: every feasible layout is listed with its memory, bytes and times, the recommendation is the fastest
mean step that fits, the warnings fire where the layout earns them (EP across nodes, a competition step bound by
its gathers, memory that does not fit), every hardware figure is printed with its source and an option overrides
it, JSON agrees with the cost model, bad input is one line and exit 2. (That the cost model's bytes, FLOPs and
memory are what the code does: tests/test_cost.py.)

MFU: the device peak comes from train.peak_tflops, the GPU table or a measured matmul; a short run writes the
step's model FLOPs per token (moe/flops.py, with its competing layers), the achieved TFLOP/s and MFU to
metrics.jsonl and TensorBoard.
"""

from __future__ import annotations

import json

import pytest
import torch

from competesmoe.launcher.cli import main
from competesmoe.launcher.config import load_config
from competesmoe.launcher.hardware import GPUS, device_peak_tflops, known_gpu
from competesmoe.moe.flops import training_flops_per_token
from competesmoe.parallel import cost
from support import FAST, ROOT, TINY, competesmoe, records

V2 = str(ROOT / "configs" / "v2-pretrain.yaml")


def plan_json(capsys, *args) -> dict:
    assert main(["plan", V2, "--format", "json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_every_layout_is_planned_and_the_fastest_fitting_one_recommended(capsys):
    plan = plan_json(capsys, "--gpus", "64")
    assert [(lay["ep"], lay["zero_stage"]) for lay in plan["layouts"]] == [
        (ep, zero) for ep in (1, 2, 4, 8, 16, 32, 64) for zero in (0, 1, 2)]
    fitting = [lay for lay in plan["layouts"] if lay["memory_gib"]["fits"]]
    best = min(fitting, key=lambda lay: lay["steps"]["mean"]["serial_ms"])
    rec = plan["recommended"]
    chosen = next(lay for lay in plan["layouts"] if (lay["ep"], lay["zero_stage"]) == (rec["ep"], rec["zero_stage"]))
    assert chosen["steps"]["mean"]["serial_ms"] <= best["steps"]["mean"]["serial_ms"] * 1.01
    for lay in plan["layouts"]:
        mem, steps = lay["memory_gib"], lay["steps"]
        assert mem["peak_competition_step"] > mem["peak_router_step"] > mem["weights"] + mem["optimizer"]
        assert steps["competition"]["flops"] > steps["mean"]["flops"] > steps["router"]["flops"]
        assert steps["mean"]["overlapped_ms"] <= steps["mean"]["serial_ms"]
        assert lay["ep_spans_nodes"] == (lay["ep"] > 8)


def test_json_bytes_are_the_cost_models(capsys):
    plan = plan_json(capsys, "--gpus", "16", "--gpus-per-node", "4")
    cfg = load_config(V2)
    w = cost.Workload(cfg.model, cfg.moe, cfg.data.vocab_size, cfg.train.micro_batch_size, precision="bf16")
    layout = cost.Layout(world=16, ep=8, zero_stage=2, gpus_per_node=4)
    lay = next(lay for lay in plan["layouts"] if (lay["ep"], lay["zero_stage"]) == (8, 2))
    planned = {c.name: c for c in cost.step_collectives(w, layout, cost.param_counts(cfg.model, cfg.moe, 32000), 0)}
    got = {c["name"]: c for c in lay["steps"]["router"]["collectives"]}
    assert set(got) == set(planned) and "params.experts" in got and "gather_tokens" not in got
    for name, c in got.items():
        assert c["bytes"] == pytest.approx(planned[name].total)
        assert c["intra_node_bytes"] + c["inter_node_bytes"] == pytest.approx(c["bytes"])
    assert got["dispatch"]["inter_node_bytes"] == pytest.approx(got["dispatch"]["bytes"] * 4 / 7)  # 4 of 7 peers away


def test_warnings_name_what_the_layout_earns(capsys):
    plan = plan_json(capsys, "--gpus", "64")
    warnings = {lay["ep"]: " ".join(lay["warnings"]) for lay in plan["layouts"] if lay["zero_stage"] == 0}
    assert "EP spans nodes" in warnings[16] and "EP spans nodes" not in warnings[8]
    assert "competition step is communication-bound" in warnings[64]
    assert "competition step is communication-bound" not in warnings[8]  # inside a node its compute dominates
    tight = plan_json(capsys, "--gpus", "8", "--gpu-memory", "15.3")
    assert all("does not fit" in " ".join(lay["warnings"]) for lay in tight["layouts"]
               if not lay["memory_gib"]["fits"])
    assert any(lay["memory_gib"]["fits"] for lay in tight["layouts"]) and not all(
        lay["memory_gib"]["fits"] for lay in tight["layouts"])
    none = plan_json(capsys, "--gpus", "8", "--gpu-memory", "1")
    assert none["recommended"]["ep"] is None and "no layout fits" in none["recommended"]["why"]


def test_hardware_figures_are_named_and_options_override_them(capsys):
    assert main(["plan", V2, "--gpus", "8", "--gpu", "h200"]) == 0
    text = capsys.readouterr().out
    spec = GPUS["h200"]
    for field in ("memory_gib", "peak_tflops", "intra_node_GBps", "inter_node_GBps"):
        assert spec.sources[field] in text
    assert "memory per rank, GiB" in text and "recommended: parallel.expert_parallel_size=" in text
    base = plan_json(capsys, "--gpus", "8")
    faster = plan_json(capsys, "--gpus", "8", "--peak-tflops", "1978", "--intra-node-GBps", "900")
    assert faster["hardware"]["peak_tflops"] == {"value": 1978.0, "source": "--peak-tflops"}
    assert base["hardware"]["peak_tflops"]["value"] == GPUS["h100"].peak_tflops["bf16"]
    for slow, fast in zip(base["layouts"], faster["layouts"]):
        assert fast["steps"]["router"]["compute_ms"] == pytest.approx(slow["steps"]["router"]["compute_ms"] / 2)


@pytest.mark.parametrize("args,message", [
    (["--gpus", "12"], "--gpus 12 is not a whole number of 8-GPU nodes"),
    (["--gpus", "8", "--mfu", "1.5"], "argument --mfu: 1.5 must be within (0, 1]"),
    (["--gpus", "8", "--mfu", "nan"], "argument --mfu: nan is not a finite number"),
    (["--gpus", "8", "--inter-node-GBps", "0"], "argument --inter-node-GBps: 0 must be above 0"),
    (["--gpus", "8", "--gpu-memory", "inf"], "argument --gpu-memory: inf is not a finite number"),
    (["--gpus", "0"], "argument --gpus: 0 must be at least 1"),
    (["moe.num_experts=0", "--gpus", "8"], "moe.num_experts (0) must be at least 1"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, args, message):
    assert main(["plan", V2, *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


# --------------------------------------------------------------------------------------------------------- MFU


def test_device_peak_comes_from_the_config_the_table_or_a_measurement():
    assert device_peak_tflops(123.0, torch.device("cpu"), "bf16") == (123.0, "train.peak_tflops")
    measured, source = device_peak_tflops(None, torch.device("cpu"), "fp32")
    assert measured > 0 and source.startswith("measured")
    assert known_gpu("NVIDIA H100 80GB HBM3") == "h100" and known_gpu("NVIDIA H200") == "h200"
    assert known_gpu("NVIDIA A100-SXM4-80GB") == "a100" and known_gpu("Tesla V100") is None
    assert known_gpu("NVIDIA H100 PCIe") is None  # the table's figures are the SXM parts'


@pytest.mark.slow  # a real (short) training run
def test_a_run_reports_model_flops_achieved_rate_and_mfu(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    result = competesmoe("train", TINY, f"output_dir={run}", "train.max_steps=4", "train.peak_tflops=0.05",
                         "moe.competition.rate=1.0", "moe.competition.warmup=0.5", *FAST)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "MFU against 0.05 TFLOP/s per device (train.peak_tflops)" in result.stdout + result.stderr
    cfg = load_config(TINY)
    steps = records(run, "train")
    for record in steps:
        competing = len(record["competing_layers"])
        assert record["model_flops_per_token"] == training_flops_per_token(cfg.model, cfg.moe, 256, competing)
        achieved = record["model_flops_per_token"] * record["tokens_per_s"] / 1e12  # one device
        assert record["tflops_per_device"] == pytest.approx(achieved, rel=1e-6)
        assert record["mfu"] == pytest.approx(record["tflops_per_device"] / 0.05)
    assert {len(r["competing_layers"]) for r in steps} == {0, 2}  # competition cap 2 after the warm-up
    board = EventAccumulator(str(run / "tensorboard")).Reload()
    assert [e.value for e in board.Scalars("train/mfu")] == pytest.approx([r["mfu"] for r in steps])
