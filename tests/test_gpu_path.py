"""What a GPU punishes and a CPU hides, counted on the CPU.

- Host syncs: every device-to-host transfer of an MoE layer's forward (experiments/bench/host_syncs.py counts what
  would stop the host on a GPU: .item(), .tolist(), .cpu(), bool(tensor), nonzero, boolean masks, bincount,
  repeat_interleave without output_size, ...): at most 1 on a router step (with or without capacity), at most 2 on
  a competition step (either gather mode), at EP 1 (in this process) and EP 2 (2 gloo ranks); backward adds none.
  The trainer's side (none per micro-step) is counted in the real job of test_device_placement.py.
- Selective activation checkpointing ('full'): backward runs exactly the collectives it runs without
  checkpointing (the gradients' own all-to-alls: none re-run from forward) and no top-K at all, and gives the same
  loss and gradients, on 2 ranks at EP 2, router and competition steps.

- scripts/gpu_check.sh refuses a machine without CUDA in one line (it is unrun here: no GPU).

The 2-rank cases share one spawn (process start-up dominates).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from competesmoe.experiments.bench.host_syncs import HostSyncCounter
from competesmoe.moe.config import CompetitionConfig, ModelConfig, MoEConfig
from competesmoe.moe.layer import MoELayer
from competesmoe.moe.model import TransformerLM
from competesmoe.parallel.parallelize import parallelize, shard_experts
from competesmoe.parallel.ranks import run_on_ranks

LAYER_CASES = {  # name -> (capacity_factor, gather, compete)
    "router": (0.0, "scores", False),
    "router-capacity": (1.0, "scores", False),
    "competition-scores": (0.0, "scores", True),
    "competition-outputs": (0.0, "outputs", True),
}
BUDGET = {False: 1, True: 2}
"""Host syncs allowed per layer forward: router step, competition step."""
STEPS = {"router-step": frozenset(), "competition-step": frozenset({0})}


def layer_syncs(groups, rank: int) -> dict[str, tuple[int, int, list[str]]]:
    """name -> (syncs in forward, syncs in backward, where the forward's came from) of one MoE layer step."""
    found = {}
    for name, (capacity, gather, compete) in LAYER_CASES.items():
        cfg = MoEConfig(num_experts=4, top_k=2, expert_hidden=32, router="competesmoe", capacity_factor=capacity,
                        competition=CompetitionConfig(gather=gather))
        torch.manual_seed(0)
        layer = MoELayer(cfg, 16).train()
        if groups is not None:
            shard_experts(layer, groups, gather)
        x = torch.randn(2, 5 + rank, 16, generator=torch.Generator().manual_seed(rank)).requires_grad_()
        with HostSyncCounter() as forward:
            y, aux = layer(x, compete=compete)
        with HostSyncCounter() as backward:
            (y.square().sum() + aux.loss).backward()
        found[name] = (forward.count, backward.count, forward.where)
    return found


def _assert_within_budget(found: dict) -> None:
    for name, (forward, backward, where) in found.items():
        assert forward <= BUDGET[LAYER_CASES[name][2]], (name, where)
        assert backward == 0, name


def test_an_moe_layer_waits_for_the_device_at_most_once_per_router_step_twice_per_competition_step():
    _assert_within_budget(layer_syncs(None, 0))


# ---------------------------------------------------------------------------------------------
# On 2 ranks.


_NOT_COLLECTIVES = {"_c10d_functional::wait_tensor", "_c10d_functional::_wrap_tensor_autograd"}
"""Functional-collective ops that move nothing (a wait, a wrapper for autograd)."""


class _OpsInBackward(TorchDispatchMode):
    """The collectives (c10d and functional) and top-Ks run while active, by name, in order."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace in ("c10d", "_c10d_functional") and func._schema.name not in _NOT_COLLECTIVES \
                or func.overloadpacket is torch.ops.aten.topk:
            self.ops.append(func._schema.name)
        return func(*args, **(kwargs or {}))


def _model() -> TransformerLM:
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=4, seq_len=16, dropout=0.1, layout="glam", dense_hidden=64)
    return TransformerLM(cfg, MoEConfig(num_experts=4, top_k=2, expert_hidden=64, jitter=0.1), vocab_size=50).train()


def _recompute_report(groups, rank: int) -> dict:
    """Per step kind: loss and gradients with 'full' and 'none', and the ops each backward ran."""
    gen = torch.Generator().manual_seed(1 + rank)
    inputs, targets = torch.randint(0, 50, (2, 16), generator=gen), torch.randint(0, 50, (2, 16), generator=gen)
    report = {}
    for step, compete in STEPS.items():
        runs = {}
        for mode in ("none", "full"):
            model = parallelize(copy.deepcopy(_model()), groups, activation_checkpointing=mode)
            torch.manual_seed(2)  # dropout and jitter: replayed in the recomputation
            out = model(inputs, targets, compete)
            with _OpsInBackward() as ops:
                (out.loss + out.aux_loss).backward()
            runs[mode] = (out.loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None},
                          ops.ops)
        report[step] = runs
    return report


def _ranks(rank: int, world: int) -> dict:
    from test_expert_parallel import _grid

    groups = _grid(2)
    return {"syncs": layer_syncs(groups, rank), "recompute": _recompute_report(groups, rank)}


@pytest.fixture(scope="module")
def on_two_ranks() -> list[dict]:
    return run_on_ranks(_ranks, 2, timeout=300)


def test_at_ep2_the_layer_keeps_the_same_host_sync_budget(on_two_ranks):
    for per_rank in on_two_ranks:
        _assert_within_budget(per_rank["syncs"])


@pytest.mark.parametrize("step", STEPS)
def test_full_checkpointing_reruns_no_collective_and_no_topk_in_backward(on_two_ranks, step):
    for per_rank in on_two_ranks:
        none_ops, full_ops = per_rank["recompute"][step]["none"][2], per_rank["recompute"][step]["full"][2]
        assert any("all_to_all" in op for op in none_ops), none_ops  # the gradients' own transport
        assert full_ops == none_ops  # nothing from forward re-entered
        assert not any("topk" in op for op in full_ops)


@pytest.mark.parametrize("step", STEPS)
def test_full_checkpointing_gives_the_same_loss_and_gradients_at_ep2(on_two_ranks, step):
    for per_rank in on_two_ranks:
        loss_none, grads_none, _ = per_rank["recompute"][step]["none"]
        loss_full, grads_full, _ = per_rank["recompute"][step]["full"]
        assert torch.equal(loss_full, loss_none)
        assert grads_full.keys() == grads_none.keys() and len(grads_full) > 10
        for name, grad in grads_full.items():
            torch.testing.assert_close(grad, grads_none[name], rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: run scripts/gpu_check.sh itself")
def test_gpu_check_says_in_one_line_that_it_needs_cuda():
    import subprocess

    from support import ROOT

    result = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "/nonexistent/gpu-check"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == ["gpu_check: no CUDA device visible to torch (torch.cuda.is_available() is "
                                          "False): run it on a GPU machine"]


@pytest.mark.parametrize("scale,agrees", [(1.01, True), (1.2, False)])
def test_gpu_check_compares_two_runs_losses_within_bf16_tolerance(tmp_path, scale, agrees):
    """gpu_check's own comparison (EP 2 vs EP 1, grouped GEMM vs loop), run here on two runs' metrics files: a
    relative loss difference of 1.4e-3 passes, 2.7e-2 fails (the tolerance is 2e-2), and it prints both figures."""
    import json
    import subprocess
    import sys

    from support import ROOT

    for name, factor in (("a", 1.0), ("b", scale)):
        rows = [{"step": s, "split": "train", "loss": 5.0 - 0.1 * s * (factor if s == 6 else 1.0),
                 "tokens_per_s": 1000.0 * (2 if name == "b" else 1)} for s in range(1, 11)]
        rows.append({"step": 10, "split": "valid", "loss": 9.0})
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    script = (ROOT / "scripts" / "gpu_check.sh").read_text()
    helper = script[script.index("compare_runs() {"):script.index("\n}\n", script.index("compare_runs() {")) + 3]
    result = subprocess.run(["bash", "-c", f'{helper}\ncompare_runs "$1" "$2"', "gpu_check", str(tmp_path / "a"),
                             str(tmp_path / "b")], capture_output=True, text=True, timeout=60,
                            env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"})
    assert (result.returncode == 0) == agrees, result.stdout + result.stderr
    worst = abs(0.6 * (scale - 1)) / (5.0 - 0.6)
    assert result.stdout.strip() == (f"worst relative loss difference {worst:.2e} over 10 steps; tokens/s "
                                     f"second/first 2.00x")
