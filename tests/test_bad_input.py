"""Bad input, table-driven: each case gets one line on stderr naming the field, file or rank and the
fix, exit code 2, no traceback, and nothing the user had is changed."""

import contextlib
import hashlib
import io
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch.distributed

from support import TINY, competesmoe

pytestmark = pytest.mark.slow  # real training runs / launchers: see tests/conftest.py

QUICK = ["train.max_steps=2", "train.eval_every=0", "train.eval_batches=1", "model.d_model=64", "model.n_layers=2",
         "model.n_heads=2", "model.seq_len=64", "moe.expert_hidden=64", "train.micro_batch_size=2"]


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished byte-level run with checkpoints, to resume (wrongly) from."""
    run = tmp_path_factory.mktemp("done") / "run"
    result = competesmoe("train", TINY, f"output_dir={run}", *QUICK)
    assert result.returncode == 0, result.stderr[-2000:]
    return run


@dataclass
class Case:
    name: str
    args: Callable[[Path, Path], list[str]]
    """(scratch dir, finished run copy) -> command-line arguments."""
    needle: Callable[[Path, Path], str]
    """What the one error line must contain."""
    setup: Callable[[Path], None] = lambda scratch: None
    in_process: bool = True
    """Fails before any process group exists, so it runs in the test process (fast); else a subprocess."""


def train(*extra: str) -> Callable[[Path, Path], list[str]]:
    return lambda d, run: ["train", TINY, f"output_dir={d / 'out'}", *QUICK, *extra]


def write(name: str, data: bytes) -> Callable[[Path], None]:
    return lambda d: (d / name).write_bytes(data)


def corrupt_checkpoint(run: Path) -> Path:
    victim = run / "checkpoints" / "step00000002" / "mp_rank_00_model_states.pt"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    return victim


CASES = [
    Case("unknown key", train("moe.num_expert=4"), lambda d, r: "did you mean moe.num_experts"),
    Case("misspelled section", train("trian.lr=0.1"), lambda d, r: "did you mean train"),
    Case("wrong type", train("train.max_steps=ten"), lambda d, r: "train.max_steps = 'ten' has the wrong type"),
    Case("wrong literal", train("moe.router=topk"), lambda d, r: "moe.router = 'topk' is not one of"),
    Case("K > E", train("moe.top_k=9"), lambda d, r: "moe.top_k (9) must not exceed moe.num_experts (8)"),
    Case("rate above 1", train("moe.competition.rate=1.5"), lambda d, r: "moe.competition.rate (1.5) must be within [0, 1]"),
    Case("negative lr", train("train.lr=-0.001"), lambda d, r: "train.lr (-0.001) must be positive"),
    Case("E not divisible by EP", train("parallel.expert_parallel_size=3"),
         lambda d, r: "moe.num_experts (8) must be divisible by parallel.expert_parallel_size (3)"),
    Case("EP larger than the world", train("parallel.expert_parallel_size=2"),
         lambda d, r: "world size (1 ranks) must be divisible by parallel.expert_parallel_size (2)"),
    Case("heads do not divide d_model", train("model.n_heads=3"), lambda d, r: "model.d_model (64) must be divisible"),
    Case("ZeRO 3", train("train.zero_stage=3"), lambda d, r: "train.zero_stage (3) must be 0, 1 or 2"),
    Case("override without =", train("max_steps"), lambda d, r: "must look like section.key=value"),
    Case("missing config file", lambda d, r: ["train", str(d / "nope.yaml")], lambda d, r: "nope.yaml does not exist"),
    Case("invalid YAML", lambda d, r: ["train", str(d / "bad.yaml")], lambda d, r: "bad.yaml is not valid YAML",
         setup=write("bad.yaml", b"model: {d_model: [\n")),
    Case("missing corpus", train("data.path=/nonexistent/corpus.txt"), lambda d, r: "/nonexistent/corpus.txt"),
    Case("empty corpus", lambda d, r: train(f"data.path={d / 'empty.txt'}")(d, r), lambda d, r: str(d / "empty.txt"),
         setup=write("empty.txt", b"")),
    Case("binary garbage corpus", lambda d, r: train(f"data.path={d / 'junk.bin'}")(d, r),
         lambda d, r: str(d / "junk.bin"), setup=write("junk.bin", bytes(range(256)) * 64)),
    Case("corpus is a directory", lambda d, r: train(f"data.path={d}")(d, r), lambda d, r: str(d)),
    Case("output_dir holds another run", lambda d, r: ["train", TINY, f"output_dir={r}", *QUICK],
         lambda d, r: f"output_dir {r} already holds a run"),
    Case("output_dir not writable", lambda d, r: train()(d, r)[:2] + [f"output_dir={d / 'afile' / 'run'}", *QUICK],
         lambda d, r: f"output_dir {d / 'afile' / 'run'} is not writable", setup=write("afile", b"x")),
    Case("resume from a path that does not exist", train("resume=/nonexistent/ckpt"), lambda d, r: "resume = '/nonexistent/ckpt'"),
    Case("resume with a changed model shape", lambda d, r: ["train", TINY, f"output_dir={r}", *QUICK,
                                                            "model.d_model=96", "model.n_heads=2", "resume=auto"],
         lambda d, r: "model.d_model is 96 but checkpoint", in_process=False),
    Case("tokenizer differs from the checkpoint's", lambda d, r: [
        "train", TINY, f"output_dir={r}", *QUICK, "resume=auto", "data.tokenizer=sentencepiece",
        "data.vocab_size=600", f"data.prepared_dir={d / 'spm'}"], lambda d, r: "was trained with tokenizer", in_process=False),
    Case("corrupt checkpoint named explicitly", lambda d, r: [
        "train", TINY, f"output_dir={r}", *QUICK, f"resume={r / 'checkpoints' / 'step00000002'}"],
         lambda d, r: "mp_rank_00_model_states.pt is corrupt", in_process=False),
    Case("export over an existing file", lambda d, r: ["export", str(r / "checkpoints" / "step00000002"),
                                                      str(r / "config.yaml")], lambda d, r: "already exists"),
]


def run_in_process(args: list[str]) -> subprocess.CompletedProcess:
    from competesmoe.launcher.cli import main

    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(args)
    assert not torch.distributed.is_initialized()  # failed before any collective
    return subprocess.CompletedProcess(args, code, stdout.getvalue(), stderr.getvalue())


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_bad_input(case: Case, tmp_path, finished_run):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    if case.name == "corrupt checkpoint named explicitly":
        corrupt_checkpoint(run)
    case.setup(tmp_path)
    before_run = snapshot(run)
    result = run_in_process(case.args(tmp_path, run)) if case.in_process else competesmoe(*case.args(tmp_path, run))
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, result.stderr[-3000:]
    assert case.needle(tmp_path, run) in errors[0], errors[0]
    assert snapshot(run) == before_run  # nothing the user had was changed
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_there_are_at_least_twenty_cases():
    assert len(CASES) >= 20


def test_port_already_in_use(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        result = competesmoe("launch", "--nproc", "2", "--master-port", str(port), TINY,
                             f"output_dir={tmp_path / 'run'}", *QUICK, timeout=120)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert f"port {port}" in result.stderr and "Traceback" not in result.stderr


def test_world_not_divisible_by_ep_is_refused_before_launch(tmp_path):
    result = competesmoe("launch", "--nproc", "3", TINY, f"output_dir={tmp_path / 'run'}",
                         "parallel.expert_parallel_size=2", *QUICK, timeout=120)
    assert result.returncode == 2
    assert "world size (3 ranks) must be divisible by parallel.expert_parallel_size (2)" in result.stderr
    assert not (tmp_path / "run").exists()


def test_disk_full_during_save_is_one_line_and_publishes_nothing(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)]).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        run = mount / "run"
        result = competesmoe("train", TINY, f"output_dir={run}", *QUICK, "train.max_steps=4",
                             "train.checkpoint_every=2", f"data.prepared_dir={tmp_path / 'data'}",
                             "model.d_model=128", "moe.expert_hidden=256")
        assert result.returncode == 2, result.stderr[-3000:]
        errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
        assert len(errors) == 1 and "checkpoint" in errors[0] and "No space left" in errors[0], result.stderr[-2000:]
        assert "Traceback" not in result.stderr
        assert not list((run / "checkpoints").glob("step*"))
    finally:
        subprocess.run(["umount", str(mount)])
