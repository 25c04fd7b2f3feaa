"""Bad input, table-driven: each case gets one line on stderr naming the field, file or rank and the
fix, exit code 2, no traceback, and nothing the user had is changed."""

import contextlib
import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch.distributed

from competesmoe.launcher.run_dir import LOCK_FILE
from support import ROOT, TINY, competesmoe, one_error_line

pytestmark = pytest.mark.slow  # real training runs / launchers: see tests/conftest.py

QUICK = ["train.max_steps=2", "train.eval_every=0", "train.eval_batches=1", "model.d_model=64", "model.n_layers=2",
         "model.n_heads=2", "model.seq_len=64", "moe.expert_hidden=64", "train.micro_batch_size=2"]


def snapshot(root: Path) -> dict[str, str]:
    """Every file's hash, but a run's lock file (each start that takes it writes its pid and host there)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != LOCK_FILE}


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
    damage: Callable[[Path], None] = lambda tag_dir: None
    """Applied to the copy's step-2 checkpoint folder before the command."""
    in_process: bool = True
    """Fails before any process group exists, so it runs in the test process (fast); else a subprocess."""


def train(*extra: str) -> Callable[[Path, Path], list[str]]:
    return lambda d, run: ["train", TINY, f"output_dir={d / 'out'}", *QUICK, *extra]


def write(name: str, data: bytes) -> Callable[[Path], None]:
    return lambda d: (d / name).write_bytes(data)


def step2(run: Path) -> Path:
    return run / "checkpoints" / "step00000002"


PAYLOAD_MARKER = "payload_ran"
"""The file a payload creates when it is unpickled, in the folder that holds the run (a test's tmp_path)."""


class Payload:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def rehash(tag_dir: Path) -> None:
    """Make the manifest agree with the files again, as a forger (or a buggy writer) would."""
    manifest = json.loads((tag_dir / "manifest.json").read_text())
    for name, entry in manifest["files"].items():
        data = (tag_dir / name).read_bytes()
        entry.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (tag_dir / "manifest.json").write_text(json.dumps(manifest))


def add_payload(path: Path) -> None:
    """The same file, plus an object whose unpickling creates the marker."""
    from competesmoe.launcher.checkpoint.rng import LEGACY_GLOBALS
    from competesmoe.parallel.deepspeed.safe_load import safe_load

    content = safe_load(path, extra_globals=LEGACY_GLOBALS)
    torch.save({**content, "extra": Payload(path.parents[3] / PAYLOAD_MARKER)}, path)  # run/checkpoints/stepN/x.pt


def payload_in(name: str) -> Callable[[Path], None]:
    def damage(tag_dir: Path) -> None:
        add_payload(tag_dir / name)
        rehash(tag_dir)
    return damage


def manifest_is(text: str) -> Callable[[Path], None]:
    return lambda tag_dir: (tag_dir / "manifest.json").write_text(text)


def run_state_is(text: str) -> Callable[[Path], None]:
    def damage(tag_dir: Path) -> None:
        (tag_dir / "run_state.json").write_text(text)
        rehash(tag_dir)
    return damage


def unlisted(name: str) -> Callable[[Path], None]:
    def damage(tag_dir: Path) -> None:
        manifest = json.loads((tag_dir / "manifest.json").read_text())
        del manifest["files"][name]
        (tag_dir / "manifest.json").write_text(json.dumps(manifest))
    return damage


def flip_a_byte(name: str) -> Callable[[Path], None]:
    def damage(tag_dir: Path) -> None:
        data = bytearray((tag_dir / name).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (tag_dir / name).write_bytes(bytes(data))
    return damage


PT_FILES = ["mp_rank_00_model_states.pt", "expp_rank_0_mp_rank_00_optim_states.pt", "experts_ep000_of_001.pt",
            "optim_dense.pt", "optim_experts_ep000_of_001.pt", "rng_rank00000.pt"]
"""Every kind of .pt in a one-rank ZeRO-0 checkpoint (ZeRO 1/2's partition files: tests/test_deepspeed_moe.py)."""
DAMAGES: dict[str, tuple[Callable[[Path], None], Callable[[Path], str]]] = {
    "manifest []": (manifest_is("[]"), lambda t: f"{t / 'manifest.json'} is not a checkpoint manifest"),
    "manifest {}": (manifest_is("{}"), lambda t: f"{t / 'manifest.json'} is not a checkpoint manifest"),
    "manifest lists no files": (manifest_is('{"files": {}}'), lambda t: f"{t / 'manifest.json'} lists no files"),
    "manifest not JSON": (manifest_is("\x00garbage"), lambda t: f"{t / 'manifest.json'} is not a checkpoint manifest"),
    "no manifest": (lambda t: (t / "manifest.json").unlink(), lambda t: f"checkpoint {t} has no manifest.json"),
    "run_state.json missing": (lambda t: (t / "run_state.json").unlink(),
                               lambda t: f"checkpoint file {t / 'run_state.json'} is missing"),
    "run_state.json not JSON": (run_state_is("{not json"), lambda t: f"{t / 'run_state.json'} is not JSON"),
    "run_state.json without world_size": (run_state_is('{"step": 2}'),
                                          lambda t: f"{t / 'run_state.json'}: world_size is missing"),
    "manifest omits an expert file": (unlisted("experts_ep000_of_001.pt"),
                                      lambda t: f"{t / 'manifest.json'} does not list experts_ep000_of_001.pt"),
    "corrupt model file": (flip_a_byte("mp_rank_00_model_states.pt"),
                           lambda t: f"{t / 'mp_rank_00_model_states.pt'} is corrupt"),
    **{f"payload in {name}": (payload_in(name), lambda t, name=name: f"{t / name} holds the Python object exec")
       for name in PT_FILES},
}
"""Ways a checkpoint is damaged (or forged): the damage, and what the one line about it must say."""
RESUME_PATH_REFUSES = ["manifest []", "manifest {}", "manifest lists no files", "run_state.json missing",
                       "run_state.json not JSON", "manifest omits an expert file", "corrupt model file",
                       *(f"payload in {name}" for name in PT_FILES)]


def resume_from_step2(d: Path, run: Path) -> list[str]:
    return ["train", TINY, f"output_dir={run}", *QUICK, f"resume={step2(run)}"]


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
    Case("export over an existing file", lambda d, r: ["export", str(r / "checkpoints" / "step00000002"),
                                                      str(r / "config.yaml")], lambda d, r: "already exists"),
    *(Case(f"resume=PATH refuses: {name}", resume_from_step2, lambda d, r, name=name: DAMAGES[name][1](step2(r)),
           damage=DAMAGES[name][0], in_process=False) for name in RESUME_PATH_REFUSES),
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
    case.damage(step2(run))
    case.setup(tmp_path)
    before_run = snapshot(run)
    result = run_in_process(case.args(tmp_path, run)) if case.in_process else competesmoe(*case.args(tmp_path, run))
    line = one_error_line(result)
    assert case.needle(tmp_path, run) in line, line
    assert snapshot(run) == before_run  # nothing the user had was changed
    assert not (tmp_path / "out" / "metrics.jsonl").exists()
    assert not (tmp_path / PAYLOAD_MARKER).exists()  # no code from a checkpoint ran



def test_resume_auto_skips_every_damaged_checkpoint_and_falls_back(tmp_path, finished_run):
    """Newer checkpoints damaged in each way: resume=auto names each once, in one line, and continues from the
    older intact one; the damaged ones are left as they were and no payload ran."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    damaged = {}
    for i, (name, (damage, needle)) in enumerate(DAMAGES.items()):
        tag_dir = run / "checkpoints" / f"step{3 + i:08d}"
        shutil.copytree(step2(run), tag_dir)
        damage(tag_dir)
        damaged[tag_dir] = (name, needle(tag_dir))
    before = {tag_dir: snapshot(tag_dir) for tag_dir in damaged}
    result = competesmoe("train", TINY, f"output_dir={run}", *QUICK, "resume=auto")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"resumed from {step2(run)} at step 2" in result.stdout
    for tag_dir, (name, needle) in damaged.items():
        lines = [line for line in result.stderr.splitlines() if f"skipping {tag_dir.name}:" in line]
        assert len(lines) == 1 and needle in lines[0], (name, lines, result.stderr[-3000:])
        assert snapshot(tag_dir) == before[tag_dir], name
    assert not (tmp_path / PAYLOAD_MARKER).exists()


@pytest.mark.parametrize("command", ["eval", "export", "finetune", "train"])
def test_a_checkpoint_whose_every_file_would_run_code_is_refused(command, tmp_path, finished_run):
    """Every .pt carries a payload (and the manifest agrees): each command refuses in one line naming a file
    of the checkpoint, nothing is written, and the payload never runs; loading a file unsafely does run it."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    tag_dir = step2(run)
    for path in sorted(tag_dir.glob("*.pt")):
        add_payload(path)
    rehash(tag_dir)
    labels = tmp_path / "labels.tsv"
    labels.write_text("a gripping film\t1\nthe plot is a mess\t0\n")
    args = {"eval": ["eval", str(tag_dir), "--text", str(ROOT / "README.md")],
            "export": ["export", str(tag_dir), str(tmp_path / "model.safetensors")],
            "finetune": ["finetune", str(tag_dir), "--train", str(labels), "--valid", str(labels), "--epochs", "1"],
            "train": ["train", TINY, f"output_dir={run}", *QUICK, f"resume={tag_dir}"]}[command]
    before = snapshot(run)
    line = one_error_line(competesmoe(*args))
    assert f"checkpoint file {tag_dir}/" in line and ".pt holds the Python object exec" in line, line
    assert not (tmp_path / PAYLOAD_MARKER).exists()
    assert snapshot(run) == before and not (tmp_path / "model.safetensors").exists()
    torch.load(tag_dir / "optim_dense.pt", weights_only=False)  # the control: the payload is live
    assert (tmp_path / PAYLOAD_MARKER).exists()


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


# ------------------------------------------------------------------------------------------- by class (issue 10)
# Each case runs the real CLI's main() in this process (a subprocess costs seconds; a handful below prove the same
# end to end): exit 2, one line without a traceback naming the option, field or file, and every file of the user's
# folder byte-identical. `d` is the user's folder: it holds their config (a copy of TINY) and a notes file.


def user_folder(tmp_path: Path) -> Path:
    user = tmp_path / "user"
    user.mkdir()
    shutil.copy(TINY, user / "config.yaml")
    (user / "notes.txt").write_text("my notes\n")
    return user


def run_cfg(*overrides: str) -> Callable[[Path], list[str]]:
    """`train` on the user's config, output into a folder beside theirs."""
    return lambda d: ["train", str(d / "config.yaml"), f"output_dir={d.parent / 'out'}", *overrides]


def cmd(*words: str) -> Callable[[Path], list[str]]:
    """A command line; '{d}' in a word is the user's folder."""
    return lambda d: [w.replace("{d}", str(d)) for w in words]


@dataclass
class Refused:
    args: Callable[[Path], list[str]]
    needle: str
    """What the one error line must contain ('{d}': the user's folder)."""
    setup: Callable[[Path], None] = lambda d: None
    """Makes the user's files the case needs, before they are hashed."""


CLI_OPTIONS = {  # every command's options are typed: refused at parse time, naming the option
    "eval --batch-size 0": Refused(cmd("eval", "{d}", "--text", "{d}/notes.txt", "--batch-size", "0"), "--batch-size"),
    "eval --batch-size x": Refused(cmd("eval", "{d}", "--text", "{d}/notes.txt", "--batch-size", "x"), "--batch-size"),
    "eval --top-k -1": Refused(cmd("eval", "{d}", "--text", "{d}/notes.txt", "--top-k", "-1"), "--top-k"),
    "eval without --text": Refused(cmd("eval", "{d}"), "--text"),
    "export --format onnx": Refused(cmd("export", "{d}", "{d}/m.onnx", "--format", "onnx"), "--format"),
    "export into a missing folder": Refused(cmd("export", "{d}", "{d}/no/such/m.safetensors"), "{d}/no/such"),
    "export over the user's file": Refused(cmd("export", "{d}", "{d}/notes.txt"), "{d}/notes.txt already exists"),
    "export --format hf into the user's folder": Refused(cmd("export", "{d}", "{d}", "--format", "hf"),
                                                         "{d} is not an empty folder"),
    "generate --max-new-tokens -1": Refused(cmd("generate", "{d}", "--prompt", "a", "--max-new-tokens", "-1"),
                                            "--max-new-tokens"),
    "generate --temperature nan": Refused(cmd("generate", "{d}", "--prompt", "a", "--temperature", "nan"),
                                          "--temperature"),
    "generate --top-k 0": Refused(cmd("generate", "{d}", "--prompt", "a", "--top-k", "0"), "--top-k"),
    "generate --seed -5": Refused(cmd("generate", "{d}", "--prompt", "a", "--seed", "-5"), "--seed"),
    "generate --device banana": Refused(cmd("generate", "{d}", "--prompt", "a", "--device", "banana"), "--device"),
    "launch --nproc 0": Refused(cmd("launch", "--nproc", "0", "{d}/config.yaml"), "--nproc"),
    "launch --master-port 70000": Refused(cmd("launch", "--master-port", "70000", "{d}/config.yaml"), "--master-port"),
    "launch --master-addr with a ;": Refused(cmd("launch", "--master-addr", "n0;touch {d}/x", "{d}/config.yaml"),
                                             "--master-addr"),
    "launch --ifname with a space": Refused(cmd("launch", "--ifname", "eth 0", "{d}/config.yaml"), "--ifname"),
    "launch --threads 0": Refused(cmd("launch", "--threads", "0", "{d}/config.yaml"), "--threads"),
    "launch --node-rank -1": Refused(cmd("launch", "--node-rank", "-1", "{d}/config.yaml"), "--node-rank"),
    "launch --hostfile with a bad line": Refused(cmd("launch", "--hostfile", "{d}/hosts", "{d}/config.yaml"),
                                                 "hostfile {d}/hosts line 2",
                                                 setup=write("hosts", b"node1 slots=2\nnode2 slots=two\n")),
    "launch --hostfile missing": Refused(cmd("launch", "--hostfile", "{d}/nohosts", "{d}/config.yaml"),
                                         "hostfile {d}/nohosts does not exist"),
    "tensorboard --port 0": Refused(cmd("tensorboard", "{d}", "--port", "0", "--dry-run"), "--port"),
    "tensorboard --host $(id)": Refused(cmd("tensorboard", "{d}", "--host", "$(id)", "--dry-run"), "--host"),
    "plan --gpus 0": Refused(cmd("plan", "{d}/config.yaml", "--gpus", "0"), "--gpus"),
    "plan --mfu 1.5": Refused(cmd("plan", "{d}/config.yaml", "--gpus", "8", "--mfu", "1.5"), "--mfu"),
    "plan --gpu-memory inf": Refused(cmd("plan", "{d}/config.yaml", "--gpus", "8", "--gpu-memory", "inf"),
                                     "--gpu-memory"),
    "plan --vocab-size 0": Refused(cmd("plan", "{d}/config.yaml", "--gpus", "8", "--vocab-size", "0"), "--vocab-size"),
    "prepare --workers 0": Refused(cmd("prepare", "{d}/config.yaml", "--workers", "0"), "--workers"),
    "bench moe-layer --tokens 0": Refused(cmd("bench", "moe-layer", "--tokens", "0"), "--tokens"),
    "repro --jobs 0": Refused(cmd("repro", "--jobs", "0", "--dry-run"), "--jobs"),
    "repro --seeds -1": Refused(cmd("repro", "--seeds", "-1", "--dry-run"), "--seeds"),
    "finetune --epochs 0": Refused(cmd("finetune", "{d}", "--train", "{d}/notes.txt", "--valid", "{d}/notes.txt",
                                       "--epochs", "0"), "--epochs"),
    "finetune --lr inf": Refused(cmd("finetune", "{d}", "--train", "{d}/notes.txt", "--valid", "{d}/notes.txt",
                                     "--lr", "inf"), "--lr"),
    "finetune --num-classes 1": Refused(cmd("finetune", "{d}", "--train", "{d}/notes.txt", "--valid",
                                            "{d}/notes.txt", "--num-classes", "1"), "--num-classes"),
    "finetune --out into the user's folder": Refused(cmd("finetune", "{d}", "--train", "{d}/notes.txt", "--valid",
                                                         "{d}/notes.txt", "--out", "{d}"), "--out: {d} already holds"),
    "a misspelled command": Refused(cmd("trian", "{d}/config.yaml"), "'trian'"),
    "an unknown option": Refused(cmd("train", "{d}/config.yaml", "--max-steps", "3"), "--max-steps"),
}

CONFIG_VALUES = {  # values that pass a type check but would fail later (or train on nonsense): refused at load
    "train.seed=-1": Refused(run_cfg("train.seed=-1"), "train.seed (-1)"),
    "train.seed=2**32": Refused(run_cfg("train.seed=4294967296"), "train.seed (4294967296)"),
    "train.lr=.inf": Refused(run_cfg("train.lr=.inf"), "train.lr = inf is not a finite number"),
    "train.lr=.nan": Refused(run_cfg("train.lr=.nan"), "train.lr = nan is not a finite number"),
    "train.beta2=1": Refused(run_cfg("train.beta2=1.0"), "train.beta2 (1.0)"),
    "train.weight_decay=-0.1": Refused(run_cfg("train.weight_decay=-0.1"), "train.weight_decay (-0.1)"),
    "train.max_steps=1.5": Refused(run_cfg("train.max_steps=1.5"), "train.max_steps = 1.5 must be a whole number"),
    "train.grad_clip=-1": Refused(run_cfg("train.grad_clip=-1"), "train.grad_clip (-1.0)"),
    "moe.capacity_factor=0.01": Refused(run_cfg("moe.capacity_factor=0.01"), "moe.capacity_factor (0.01)"),
    "moe.jitter=1": Refused(run_cfg("moe.jitter=1"), "moe.jitter (1.0)"),
    "model.d_model=[64]": Refused(run_cfg("model.d_model=[64]"), "model.d_model = [64] has the wrong type"),
    "an override with an empty key part": Refused(run_cfg("train..lr=1"), "override 'train..lr'"),
}

YAML_FILES = {  # mistakes in the YAML itself: one line naming the file (and the line)
    "a key given twice": Refused(cmd("train", "{d}/dup.yaml"), "{d}/dup.yaml is not valid YAML (line 3",
                                 setup=write("dup.yaml", b"train:\n  lr: 0.1\n  lr: 0.2\n")),
    "a section given twice": Refused(cmd("train", "{d}/dup.yaml"), "key 'model' appears twice",
                                     setup=write("dup.yaml", b"model: {d_model: 64}\nmodel: {n_layers: 2}\n")),
    "a tab for indentation": Refused(cmd("train", "{d}/tab.yaml"), "{d}/tab.yaml is not valid YAML",
                                     setup=write("tab.yaml", b"train:\n\tlr: 0.1\n")),
    "not UTF-8": Refused(cmd("train", "{d}/latin1.yaml"), "{d}/latin1.yaml is not UTF-8",
                         setup=write("latin1.yaml", "output_dir: caf\u00e9\n".encode("latin-1"))),
    "a folder as the config": Refused(cmd("train", "{d}"), "config file {d} is not a file"),
    "a list at top level": Refused(cmd("train", "{d}/list.yaml"), "{d}/list.yaml must hold a mapping",
                                   setup=write("list.yaml", b"- train\n- model\n")),
    "a section that is a number": Refused(cmd("train", "{d}/scalar.yaml"), "model must be a mapping",
                                          setup=write("scalar.yaml", b"model: 5\n")),
}

SIZES = {  # what would allocate gigabytes (or more than any machine) is refused before anything is built
    "moe.num_experts=100000": Refused(run_cfg("moe.num_experts=100000"), "out of memory before the first step"),
    "model.seq_len=10**7": Refused(run_cfg("model.seq_len=10000000"), "model.seq_len 10000000"),
    "model.n_layers=5000": Refused(run_cfg("model.n_layers=5000"), "model.n_layers (5000)"),
    "parallel.threads_per_rank=100000": Refused(run_cfg("parallel.threads_per_rank=100000"),
                                                "parallel.threads_per_rank (100000)"),
}


def prepared_by_someone_else(d: Path) -> None:
    (d / "data").mkdir()
    (d / "data" / "train.bin").write_bytes(b"their tokens")
    (d / "data" / "meta.json").write_text('{"theirs": true}')


def locked_by_a_live_run(d: Path) -> None:
    """output_dir (beside the user's folder) held as a running `train` holds it: a flock, its pid and host."""
    import fcntl

    out = d.parent / "out"
    out.mkdir()
    holder = open(out / LOCK_FILE, "w")
    holder.write("pid 4242 on host elsewhere\n")
    holder.flush()
    fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
    LIVE_LOCKS.append(holder)  # closed by the test


LIVE_LOCKS: list = []

OUR_FILES = {  # nothing a user made is overwritten, and one run at a time per output_dir
    "prepare into someone else's data folder": Refused(cmd("prepare", "{d}/config.yaml", "data.prepared_dir={d}/data"),
                                                       "data.prepared_dir: {d}/data already holds files",
                                                       setup=prepared_by_someone_else),
    "output_dir locked by a live run": Refused(run_cfg(), "is in use by another run (pid 4242 on host elsewhere",
                                               setup=locked_by_a_live_run),
    "output_dir whose config files are the user's": Refused(
        lambda d: ["train", str(d / "config.yaml"), f"output_dir={d}"], "config.resolved.yaml are files competesmoe did not write",
        setup=write("config.resolved.yaml", b"# mine too\n")),
}

BY_CLASS = {**CLI_OPTIONS, **CONFIG_VALUES, **YAML_FILES, **SIZES, **OUR_FILES}


@pytest.mark.parametrize("name", list(BY_CLASS))
def test_refused_by_class(name, tmp_path):
    case = BY_CLASS[name]
    user = user_folder(tmp_path)
    case.setup(user)
    before = snapshot(user)
    try:
        line = one_error_line(run_in_process(case.args(user)))
    finally:
        while LIVE_LOCKS:
            LIVE_LOCKS.pop().close()
    assert case.needle.replace("{d}", str(user)) in line, line
    assert snapshot(user) == before  # the user's files, byte for byte, and nothing added but a released lock
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_at_least_forty_cases_by_class():
    assert len(BY_CLASS) >= 40


# ------------------------------------------------------------------------------ the same, end to end (subprocesses)


def test_refused_end_to_end_without_a_traceback(tmp_path):
    """A handful of the classes above through a real process: an option, a YAML mistake, a size."""
    user = user_folder(tmp_path)
    before = snapshot(user)
    for args, needle in ((["plan", str(user / "config.yaml"), "--gpus", "8", "--mfu", "nan"], "--mfu"),
                         (["train", str(user / "config.yaml"), "train.seed=-1"], "train.seed (-1)"),
                         (["train", str(user / "config.yaml"), f"output_dir={tmp_path / 'out'}",
                           "moe.num_experts=100000"], "GiB")):
        line = one_error_line(competesmoe(*args, timeout=300))
        assert needle in line, line
    assert snapshot(user) == before


def test_a_build_lock_left_by_a_killed_build_is_named_instead_of_waited_for(tmp_path):
    """torch would wait for this lock forever (DeepSpeed builds its CPU communication op at start); a fresh lock is
    another start's build in progress and is waited for, an hour-old one is named in one line."""
    user = user_folder(tmp_path)
    lock = tmp_path / "extensions" / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    hour_ago = time.time() - 3600
    os.utime(lock, (hour_ago, hour_ago))
    result = competesmoe("train", str(user / "config.yaml"), f"output_dir={tmp_path / 'out'}", timeout=300,
                         env={"TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions")})
    line = one_error_line(result)
    assert f"{lock}: a build lock 60 min old" in line and "remove the file and start again" in line, line
    assert lock.exists() and not (tmp_path / "out").exists()


def test_a_second_run_on_a_locked_output_dir_names_the_holder(tmp_path):
    """A live `train` holds output_dir: a second one stops at once naming its pid and host, and writes nothing."""
    user = user_folder(tmp_path)
    locked_by_a_live_run(user)
    try:
        line = one_error_line(competesmoe("train", str(user / "config.yaml"), f"output_dir={tmp_path / 'out'}",
                                          timeout=300))
    finally:
        LIVE_LOCKS.pop().close()
    assert "in use by another run (pid 4242 on host elsewhere" in line, line
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [LOCK_FILE]


def test_a_split_shorter_than_a_window_is_refused_before_the_first_step(tmp_path):
    """valid and test hold fewer tokens than one window: once the corpus is prepared, `train` refuses before any
    process group exists (no metrics, no checkpoint, the user's corpus as it was), and nothing it leaves blocks the
    corrected rerun. (A corpus prepared by `train` itself is checked right after it is prepared.)"""
    user = tmp_path / "user"
    user.mkdir()
    (user / "corpus.txt").write_bytes(b"".join(b"line %d of a short corpus\n" % i for i in range(1600)))  # 5%: 2 KB
    before = snapshot(user)
    data = [f"data.path={user / 'corpus.txt'}", f"data.prepared_dir={tmp_path / 'data'}"]
    out = tmp_path / "out"
    assert run_in_process(["prepare", TINY, *data]).returncode == 0
    line = one_error_line(run_in_process(["train", TINY, f"output_dir={out}", *data, "train.micro_batch_size=1",
                                          "model.seq_len=4096"]))
    assert "the valid split of corpus corpus.txt has" in line and "model.seq_len" in line, line
    assert snapshot(user) == before
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()
    from competesmoe.launcher.config import load_config
    from competesmoe.launcher.run_dir import RunDir

    with RunDir(load_config(TINY, [f"output_dir={out}"]), out):  # the rerun would start
        pass
