"""Training with expert parallelism through the real launcher: the loss curve does not depend on
the EP size (same world, same global batch, same seed), with competition steps on."""

import json

import pytest

from support import SMALL, TINY, competesmoe, records

pytestmark = pytest.mark.slow  # real training runs / launchers: see tests/conftest.py



def run_losses(tmp_path, world: int, ep: int, *extra: str) -> dict[int, float]:
    run = tmp_path / f"w{world}_ep{ep}"
    result = competesmoe("launch", "--nproc", str(world), "--launcher", "torchrun", TINY, f"output_dir={run}",
                         f"parallel.expert_parallel_size={ep}", *SMALL, *extra, timeout=900)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
    train = records(run, "train")
    assert any(r["competing_layers"] for r in train)
    return {r["step"]: r["loss"] for r in train}


def assert_same_curve(a: dict[int, float], b: dict[int, float]) -> None:
    assert sorted(a) == sorted(b) == list(range(1, 31))
    worst = max(abs(a[s] - b[s]) for s in a)
    assert worst < 1e-4, f"largest loss difference {worst:.2e}"


@pytest.fixture(scope="module")
def world2_ep1(tmp_path_factory) -> dict[int, float]:
    return run_losses(tmp_path_factory.mktemp("w2"), 2, 1)


@pytest.mark.parametrize("extra", [[], ["moe.competition.gather=outputs"], ["train.zero_stage=0"],
                                   ["train.zero_stage=2"], ["parallel.activation_checkpointing=full"]],
                         ids=["zero1", "literal-output-gather", "zero0", "zero2", "recompute-blocks"])
def test_world2_ep2_equals_ep1(tmp_path, world2_ep1, extra):
    assert_same_curve(world2_ep1, run_losses(tmp_path, 2, 2, *extra))


def test_world4_ep1_ep2_ep4(tmp_path):
    ep1 = run_losses(tmp_path, 4, 1)
    assert_same_curve(ep1, run_losses(tmp_path, 4, 2))
    assert_same_curve(ep1, run_losses(tmp_path, 4, 4))


def test_deepspeed_launch_ep2_competes_on_both_ranks_experts(tmp_path):
    run = tmp_path / "ep2"
    result = competesmoe("launch", "--nproc", "2", TINY, f"output_dir={run}", "parallel.expert_parallel_size=2",
                         *SMALL)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
    winners_rank0 = winners_rank1 = 0.0
    for record in records(run, "train"):
        for layer in record["competing_layers"]:
            shares = record["moe"][layer]["expert_fraction"]  # of competition winners on that step
            winners_rank0 += sum(shares[:4])
            winners_rank1 += sum(shares[4:])
    assert winners_rank0 > 0 and winners_rank1 > 0
    saved = sorted(p.name for p in (run / "checkpoints").glob("step*/experts_*.pt"))
    assert saved == ["experts_ep000_of_002.pt", "experts_ep001_of_002.pt"]
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["split"] == "test"
