"""End to end through the real command line: a short run whose loss falls, monitoring output,
exact resume, the launchers, and bad input that gets a one-line error."""

import subprocess

import pytest

from support import FAST, TINY, competesmoe, losses, records

pytestmark = pytest.mark.slow  # real training runs / launchers: see tests/conftest.py


def test_short_run_loss_falls_and_is_monitored(tmp_path):
    run = tmp_path / "run"
    result = competesmoe("train", TINY, "train.max_steps=40", f"output_dir={run}", "train.eval_every=20",
                         "train.log_every=5", "train.eval_batches=4", "moe.competition.rate=0.3")
    assert result.returncode == 0, result.stderr[-3000:]
    train, valid = records(run, "train"), records(run, "valid")
    assert [r["step"] for r in train] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert train[-1]["loss"] < train[0]["loss"] - 0.5
    assert [r["step"] for r in valid] == [20, 40] and valid[1]["bpc"] < valid[0]["bpc"]
    assert records(run, "test")[0]["bpc"] > 0
    for key in ("loss", "bpc", "lr", "grad_norm", "tokens_per_s", "moe"):
        assert key in train[-1], key
    layers = train[-1]["moe"]
    assert len(layers) == 4 and abs(sum(layers[0]["expert_fraction"]) - 1) < 1e-5
    assert any(r["competing_layers"] for r in train), "rate 0.3 over 4 layers should compete in 40 steps"
    assert any("router_competition_overlap" in layer for r in train for layer in r["moe"])

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    tags = events.Tags()
    for tag in ("train/loss", "valid/bpc", "moe/layer0/router_entropy", "moe/layer3/competed",
                "moe/layer0/expert_fraction/expert7", "moe/layer1/balance_loss", "moe/layer2/z_loss"):
        assert tag in tags["scalars"], tag
    assert "moe/layer0/expert_fraction" in tags["histograms"]
    assert (run / "config.yaml").exists() and (run / "checkpoints" / "latest").exists()


def test_resume_continues_the_same_trajectory(tmp_path):
    args = [TINY, "train.max_steps=8", "train.checkpoint_every=4", "moe.competition.rate=0.5", *FAST]
    full = tmp_path / "full"
    assert competesmoe("train", *args, f"output_dir={full}").returncode == 0
    part = tmp_path / "part"
    assert competesmoe("train", *args, f"output_dir={part}").returncode == 0
    # Roll the second run back to its step-4 checkpoint, as if it had died there.
    ckpt = part / "checkpoints"
    for tag in ckpt.glob("step00000008"):
        subprocess.run(["rm", "-rf", str(tag)], check=True)
    (ckpt / "latest").write_text("step00000004")
    (part / "metrics.jsonl").unlink()
    result = competesmoe("train", *args, f"output_dir={part}", "resume=auto")
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = losses(part)
    assert sorted(resumed) == [5, 6, 7, 8]
    assert all(resumed[s] == losses(full)[s] for s in resumed)  # bitwise on CPU


@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun"])
def test_launch_two_ranks_data_parallel(tmp_path, launcher):
    run = tmp_path / launcher
    result = competesmoe("launch", "--nproc", "2", "--launcher", launcher, TINY, "train.max_steps=6",
                         f"output_dir={run}", *FAST)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
    assert ("deepspeed" if launcher == "deepspeed" else "torch.distributed.run") in result.stdout.splitlines()[0]
    train = records(run, "train")
    assert [r["step"] for r in train] == list(range(1, 7))
    assert train[-1]["loss"] < train[0]["loss"]


def one_line_error(result: subprocess.CompletedProcess, needle: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and needle in errors[0], result.stderr[-2000:]


@pytest.mark.parametrize("overrides,needle", [
    (["moe.num_expert=4"], "did you mean moe.num_experts"),
    (["train.max_steps=ten"], "train.max_steps"),
    (["moe.top_k=9"], "moe.top_k (9) must not exceed moe.num_experts (8)"),
    (["data.path=/nonexistent/corpus.txt"], "/nonexistent/corpus.txt"),
])
def test_bad_input_gets_one_line(tmp_path, overrides, needle):
    one_line_error(competesmoe("train", TINY, f"output_dir={tmp_path / 'run'}", *overrides), needle)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_empty_corpus(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    one_line_error(competesmoe("train", TINY, f"output_dir={tmp_path / 'run'}", f"data.path={empty}"), str(empty))


def test_output_dir_of_another_run_is_not_overwritten(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "step00000010").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 10}\n')
    before = sorted(p.name for p in run.rglob("*"))
    one_line_error(competesmoe("train", TINY, f"output_dir={run}"), "resume=auto")
    # the refused start's lock file (launcher/run_dir.py) is the only addition
    assert sorted(p.name for p in run.rglob("*") if p.name != ".competesmoe.lock") == before
    assert (run / "metrics.jsonl").read_text() == '{"step": 10}\n'


@pytest.mark.parametrize("overrides,figure", [
    (["data.tokenizer=sentencepiece", "data.vocab_size=1000"], "ppl"),
    (["train.precision=bf16", "train.zero_stage=2", "model.layout=glam", "train.grad_accum=2"], "bpc"),
])
def test_variants_train(tmp_path, overrides, figure):
    run = tmp_path / "run"
    result = competesmoe("train", TINY, "train.max_steps=8", f"output_dir={run}", *FAST, *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    train = records(run, "train")
    assert figure in train[-1] and train[-1]["loss"] < train[0]["loss"]
    assert figure in records(run, "test")[0]
