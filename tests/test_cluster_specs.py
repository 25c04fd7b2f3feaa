"""The cluster job specs (docker/compose.yaml, docker/slurm/train.sbatch, docker/k8s/train-job.yaml)
parse, and on every node they start exactly what `competesmoe launch` starts: each node's command is
run through the real CLI with --dry-run and the printed command is checked (one rendezvous endpoint,
distinct node ranks 0..N-1, N nodes, node 0 hosting the store, the same training arguments). Each spec
runs `competesmoe prepare` as a step of its own before training, with the training's config and
overrides (so into the directory the training reads)."""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

from support import ROOT

DOCKER = ROOT / "docker"
IMAGE_ROOT = "/opt/competesmoe/"  # where the Dockerfiles put the project (WORKDIR + COPY)


def underlying(stdout: str) -> tuple[dict[str, str], list[str]]:
    """The `+ VAR=value ... command` line `competesmoe launch` prints: (variables, argv)."""
    line = next(line for line in stdout.splitlines() if line.startswith("+ "))
    words = shlex.split(line[2:])
    env = {}
    while "=" in words[0] and not words[0].startswith("/"):
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    return env, words


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def dry_run(launch_args: list[str]) -> tuple[dict[str, str], list[str]]:
    """`competesmoe launch ARGS --dry-run`, with the image's paths mapped onto this checkout."""
    from competesmoe.launcher.cli import main

    args = [str(ROOT / a[len(IMAGE_ROOT):]) if a.startswith(IMAGE_ROOT) else a for a in launch_args]
    assert args[0] == "launch", args
    out = io.StringIO()
    with contextlib.redirect_stdout(out):  # the real CLI, in this process (a subprocess costs seconds)
        assert main(["launch", "--dry-run", *args[1:]]) == 0
    return underlying(out.getvalue())


def train_args(argv: list[str]) -> list[str]:
    return argv[argv.index("train") + 1:]


def check_torchrun_nodes(nodes: list[tuple[dict, list[str]]], nnodes: int, endpoint: str, nproc: str) -> None:
    assert len(nodes) == nnodes
    for rank, (env, argv) in enumerate(nodes):
        assert argv[1:3] == ["-m", "torch.distributed.run"], argv
        assert option(argv, "--nnodes") == str(nnodes) and option(argv, "--nproc_per_node") == nproc
        assert option(argv, "--rdzv_backend") == "c10d" and option(argv, "--rdzv_endpoint") == endpoint
        assert option(argv, "--rdzv_conf") == f"is_host={int(rank == 0)}"
        assert argv[argv.index("train") - 2:argv.index("train")] == ["-m", "competesmoe.launcher.cli"]
        assert env["OMP_NUM_THREADS"] == "1"
    assert len({option(argv, "--rdzv_id") for _, argv in nodes}) == 1
    assert len({tuple(train_args(argv)) for _, argv in nodes}) == 1, "every node trains the same job"


# ---------------------------------------------------------------------------------------------- compose


def test_compose_nodes_and_tensorboard():
    spec = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = spec["services"]
    nodes = {name: s for name, s in services.items() if s.get("command", [None])[0] == "launch"}
    assert len(nodes) == 2
    dockerfile = (DOCKER / "Dockerfile.cpu").read_text()
    assert 'ENTRYPOINT ["competesmoe"]' in dockerfile  # so `command: [launch, ...]` is `competesmoe launch ...`
    build = services["prepare"]["build"]
    assert (DOCKER / build["context"] / build["dockerfile"]).resolve() == DOCKER / "Dockerfile.cpu"
    by_rank = {}
    for name, service in nodes.items():
        command = [str(word) for word in service["command"]]
        assert service["hostname"] == name and "runs:/workspace/runs" in service["volumes"]
        by_rank[int(option(command, "--node-rank"))] = (name, command)
    assert sorted(by_rank) == [0, 1]
    master = option(by_rank[0][1], "--master-addr")
    assert master == by_rank[0][0] and all(option(c, "--master-addr") == master for _, c in by_rank.values())
    ran = [dry_run(by_rank[r][1]) for r in sorted(by_rank)]
    check_torchrun_nodes(ran, 2, f"{master}:29500", "1")
    assert all(env["GLOO_SOCKET_IFNAME"] == "eth0" for env, _ in ran)

    board = services["tensorboard"]
    assert board["entrypoint"] == ["tensorboard"] and option(board["command"], "--logdir") == "/workspace/runs"
    assert all(p.startswith("127.0.0.1:") for p in board["ports"]), "TensorBoard only on the host's loopback"
    assert "runs:/workspace/runs:ro" in board["volumes"] and "runs" in spec["volumes"]


def image_args(args: list[str]) -> list[str]:
    """A spec's arguments with the image's paths mapped onto this checkout."""
    return [str(ROOT / a[len(IMAGE_ROOT):]) if a.startswith(IMAGE_ROOT) else a for a in args]


def check_prepare_matches_training(prepare_args: list[str], train: list[str], tmp_path: Path | None = None) -> None:
    """`competesmoe prepare ARGS` prepares the very directory `train` reads; with tmp_path it really runs
    (output_dir moved under tmp_path) and leaves a finished preparation there."""
    from competesmoe.data.meta import load_meta
    from competesmoe.launcher.cli import main
    from competesmoe.launcher.config import load_config

    assert prepare_args == train, "prepare gets the training's config and overrides"
    prepare_cfg = load_config(prepare_args[0], prepare_args[1:])
    train_cfg = load_config(train[0], train[1:])
    assert prepare_cfg.data.prepared_path(prepare_cfg.output_dir) == train_cfg.data.prepared_path(train_cfg.output_dir)
    if tmp_path is not None:
        moved = [a for a in prepare_args if not a.startswith("output_dir=")] + [f"output_dir={tmp_path / 'run'}"]
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            assert main(["prepare", *moved]) == 0
        assert load_meta(tmp_path / "run" / "data")["tokenizer"]["kind"] == train_cfg.data.tokenizer


def test_compose_prepares_before_the_nodes(tmp_path):
    services = yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]
    prepare = [str(word) for word in services["prepare"]["command"]]
    assert prepare[0] == "prepare" and "restart" not in services["prepare"]
    for name in ("node0", "node1"):
        assert services[name]["depends_on"]["prepare"] == {"condition": "service_completed_successfully"}
        _, argv = dry_run([str(word) for word in services[name]["command"]])
        check_prepare_matches_training(image_args(prepare[1:]), train_args(argv), tmp_path if name == "node0" else None)
    assert "runs:/workspace/runs" in services["prepare"]["volumes"]


def test_compose_nodes_may_pin_memory_for_rdma():
    services = yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]
    for name in ("node0", "node1"):
        assert "IPC_LOCK" in services[name]["cap_add"] and services[name]["ulimits"]["memlock"] == -1
    assert "/dev/infiniband" in (DOCKER / "compose.yaml").read_text()  # the note for RDMA hosts


# ---------------------------------------------------------------------------------------------- Slurm

SRUN = r"""#!/bin/bash
# srun stand-in: run the command once per node of the allocation (once on the first with --ntasks=1),
# with that node's SLURM_NODEID
nodes=$SLURM_NNODES
echo "SRUN cpus-per-task=${SRUN_CPUS_PER_TASK:-unset}"  # srun's own --cpus-per-task (Slurm >= 22.05)
while [[ "$1" == -* ]]; do [ "$1" = --ntasks=1 ] && nodes=1; shift; done
for ((node = 0; node < nodes; node++)); do
  SLURM_NODEID=$node SLURM_PROCID=$node "$@" || exit $?
done
"""
# the pause makes the script's reader finish before the second host is written, as with a long node list:
# a reader that stops early (`head -n 1`) then kills the job with SIGPIPE under pipefail (CI saw exit 141)
SCONTROL = """#!/bin/bash
[ "$1 $2" = "show hostnames" ] && { printf 'gpu-a01\\n'; sleep 0.3; printf 'gpu-a02\\n'; }
"""
COMPETESMOE = """#!/bin/bash
# the real CLI, told to print its command only; prepare just says what it would prepare (its arguments as JSON)
sub=$1; shift
[ "$sub" = prepare ] && exec "{python}" -c 'import json, sys; print("PREPARE", json.dumps(sys.argv[1:]))' "$@"
exec "{python}" -m competesmoe.launcher.cli "$sub" --dry-run "$@"
"""


def stub(folder: Path, name: str, text: str) -> None:
    path = folder / name
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def run_sbatch(tmp_path, args=("configs/switch-small.yaml", "output_dir=/shared/runs/s"),
               **env) -> tuple[list[tuple[dict, list[str]]], list[str]]:
    import json
    import sys

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    stub(bin_dir, "srun", SRUN)
    stub(bin_dir, "scontrol", SCONTROL)
    stub(bin_dir, "competesmoe", COMPETESMOE.format(python=sys.executable))
    slurm = {"SLURM_JOB_NODELIST": "gpu-a[01-02]", "SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": "8",
             "SLURM_JOB_ID": "4242", "SLURM_CPUS_PER_TASK": "32"}
    result = subprocess.run(["bash", str(DOCKER / "slurm" / "train.sbatch"), *args], cwd=ROOT, capture_output=True,
                            text=True, timeout=300,
                            env={**os.environ, **slurm, **env, "PATH": f"{bin_dir}:{os.environ['PATH']}"})
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout.splitlines()
    lines = [line for line in out if line.startswith("+ ")]
    prepares = [line for line in out if line.startswith("PREPARE")]
    assert len(lines) == 2 and len(prepares) == 1, result.stdout
    assert out.index(prepares[0]) < out.index(lines[0]), "prepare runs before the nodes start"
    # every step's task gets the job's cores (recent srun does not inherit sbatch's --cpus-per-task)
    assert [line for line in out if line.startswith("SRUN ")] == ["SRUN cpus-per-task=32"] * 2, result.stdout
    return [underlying(line) for line in lines], json.loads(prepares[0][len("PREPARE "):])


def test_sbatch_parses():
    assert subprocess.run(["bash", "-n", str(DOCKER / "slurm" / "train.sbatch")]).returncode == 0
    text = (DOCKER / "slurm" / "train.sbatch").read_text()
    assert re.search(r"^#SBATCH --ntasks-per-node=1$", text, re.M)  # one launcher per node


def test_sbatch_torchrun_on_every_node(tmp_path):
    nodes, prepare = run_sbatch(tmp_path, IFNAME="lo")
    check_prepare_matches_training(prepare, train_args(nodes[0][1]))
    check_torchrun_nodes(nodes, 2, "gpu-a01:29500", "8")
    assert {option(argv, "--rdzv_id") for _, argv in nodes} == {"4242"}
    assert train_args(nodes[0][1]) == ["configs/switch-small.yaml", "output_dir=/shared/runs/s"]
    assert all(env["NCCL_SOCKET_IFNAME"] == "lo" for env, _ in nodes)


def test_sbatch_deepspeed_per_node(tmp_path):
    nodes, _ = run_sbatch(tmp_path, LAUNCHER="deepspeed")
    for rank, (env, argv) in enumerate(nodes):
        assert argv[1:3] == ["-m", "deepspeed.launcher.runner"] and "--no_ssh" in argv
        assert option(argv, "--node_rank") == str(rank) and option(argv, "--master_addr") == "gpu-a01"
        assert option(argv, "--num_gpus") == "8" and "NCCL_SOCKET_IFNAME" not in env


# ---------------------------------------------------------------------------------------------- Kubernetes


def test_kubernetes_indexed_job():
    docs = list(yaml.safe_load_all((DOCKER / "k8s" / "train-job.yaml").read_text()))
    service = next(d for d in docs if d["kind"] == "Service")
    job = next(d for d in docs if d["kind"] == "Job")
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"]
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"]
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in service["spec"]["selector"].items())
    assert pod["subdomain"] == service["metadata"]["name"] and pod["restartPolicy"] == "Never"
    container = pod["containers"][0]
    rank_env = next(e for e in container["env"] if e["name"] == "NODE_RANK")
    assert "job-completion-index" in rank_env["valueFrom"]["fieldRef"]["fieldPath"]
    command = [str(word) for word in container["command"]]
    assert command[0] == "competesmoe"
    master = option(command, "--master-addr")
    assert master == f"{job['metadata']['name']}-0.{service['metadata']['name']}"  # pod 0's stable DNS name
    port = option(command, "--master-port")
    assert int(port) in [p["port"] for p in service["spec"]["ports"]]
    assert option(command, "--nnodes") == str(spec["completions"])
    gpus = container["resources"]["limits"]["nvidia.com/gpu"]
    assert option(command, "--nproc") == str(gpus)
    nodes = [dry_run([w.replace("$(NODE_RANK)", str(index)) for w in command[1:]])
             for index in range(spec["completions"])]
    check_torchrun_nodes(nodes, spec["completions"], f"{master}:{port}", str(gpus))
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert "/dev/shm" in mounts and option(command, "--ifname") == "eth0"
    out = next(a for a in train_args(nodes[0][1]) if a.startswith("output_dir="))
    assert any(out.split("=", 1)[1].startswith(m) for m in mounts), "output_dir on the shared volume"
    # every pod prepares first (an init container; the prepare lock on the shared volume lets one do the work)
    (init,) = pod["initContainers"]
    assert init["command"][:2] == ["competesmoe", "prepare"] and init["image"] == container["image"]
    check_prepare_matches_training(image_args(init["command"][2:]), train_args(nodes[0][1]))
    assert {(m["name"], m["mountPath"]) for m in init["volumeMounts"]} <= \
        {(m["name"], m["mountPath"]) for m in container["volumeMounts"]}
    # NCCL over RDMA: memory pinning allowed, and the spec says where the HCAs come from
    assert "IPC_LOCK" in container["securityContext"]["capabilities"]["add"]
    assert "rdma/hca" in (DOCKER / "k8s" / "train-job.yaml").read_text()


def test_kubernetes_pods_wait_for_pod_0s_name_until_the_rendezvous_timeout(monkeypatch, capsys):
    """backoffLimit 0: a pod other than 0 that gave up on pod 0's DNS name at once (a slow image pull on pod 0)
    would fail the whole Job; its preflight retries until the rendezvous would time out anyway."""
    import socket

    from competesmoe.common.errors import UserError
    from competesmoe.launcher import launch

    real, calls = socket.getaddrinfo, []

    def not_yet(host, *args, **kwargs):
        calls.append(host)
        if host == "nowhere" or host == "competesmoe-0.competesmoe" and len(calls) < 3:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real("127.0.0.1", *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", not_yet)
    monkeypatch.setattr(launch, "RESOLVE_RETRY_S", 0.01)
    plan = launch.Plan("torchrun-rdzv", [], {}, master_addr="competesmoe-0.competesmoe", node_rank=1)
    launch.preflight(plan, launch.LaunchOptions(master_port=29500))
    assert len(calls) == 3 and capsys.readouterr().err.count("does not resolve yet") == 1
    assert launch.RENDEZVOUS_TIMEOUT == 600  # torchrun's c10d join timeout

    with pytest.raises(UserError, match="master address nowhere does not resolve .* after 0 s"):
        launch.check_route("nowhere", 29500, "master address", wait_s=0.05)


@pytest.mark.parametrize("spec", ["compose.yaml", "k8s/train-job.yaml"])
def test_config_paths_exist_in_image(spec):
    text = (DOCKER / spec).read_text()
    for path in re.findall(r"/opt/competesmoe/(\S+\.yaml)", text):
        assert (ROOT / path).is_file(), path


# ---------------------------------------------------------------------------------------------- hostile arguments
# A config path and overrides full of what shells, YAML and the orchestrators read must reach `competesmoe train`
# (and `prepare`) byte for byte on every node, and reach the config as the same text.


def hostile_args(tmp_path: Path, count: int = 4) -> list[str]:
    """[config, *overrides], the first `count` of them (as many as the spec has run arguments): spaces, both quotes,
    $, ${}, $(...), backquotes, ;, |, &, globs, #, a backslash, YAML's flow and mapping syntax, Slurm's %j and
    unicode. A shell that read any of them would create CANARY. The last override lets any world size run."""
    import shutil

    canary = tmp_path / "CANARY"
    folder = tmp_path / "cfg dir 'q' \"dq\" $HOME ;& ü"
    folder.mkdir(exist_ok=True)
    config = folder / "switch small $(touch CANARY) `touch CANARY`.yaml"  # a shell would touch ROOT/CANARY
    shutil.copy(ROOT / "configs" / "switch-small.yaml", config)
    return [str(config),
            f"output_dir=/shared/runs/a b'c\"d $HOME ${{HOME}} $(touch {canary}) `touch {canary}`;touch {canary} | & "
            f"* ? ~ \\ ü 東京 #3",
            "data.prepared_dir=/shared/prep/$$ $(NODE_RANK) $(HOME) %x-%j [a, b] {c: d}: e - f",
            "parallel.expert_parallel_size=1"][:count]


def check_hostile_arrival(tmp_path: Path, sent: list[str], train: list[str]) -> None:
    """What `train` got is what was sent, and the config reads the text of each override as it was typed."""
    from competesmoe.launcher.config import load_config

    assert train == sent
    cfg = load_config(train[0], train[1:])
    typed = {"output_dir": cfg.output_dir, "data.prepared_dir": cfg.data.prepared_dir,
             "parallel.expert_parallel_size": str(cfg.parallel.expert_parallel_size)}
    for override in sent[1:]:
        key, value = override.split("=", 1)
        assert typed[key] == value, key
    assert not (tmp_path / "CANARY").exists() and not (ROOT / "CANARY").exists(), "a shell ran part of an argument"


def test_sbatch_passes_hostile_arguments_byte_for_byte(tmp_path):
    sent = hostile_args(tmp_path)
    for launcher in ("torchrun", "deepspeed"):
        nodes, prepare = run_sbatch(tmp_path, args=sent, LAUNCHER=launcher)
        assert prepare == sent
        for _, argv in nodes:
            check_hostile_arrival(tmp_path, sent, train_args(argv))


def yaml_single_quoted(text: str) -> str:
    """An argument as docker/compose.yaml and docker/k8s/train-job.yaml tell users to write one: a YAML
    single-quoted string (' doubled), every $ doubled (both compose and Kubernetes read $)."""
    return "'" + text.replace("'", "''").replace("$", "$$") + "'"


def kubernetes_expand(text: str, env: dict[str, str]) -> str:
    """What the kubelet does to a container's command and args (kubernetes third_party/forked/golang/expansion/
    expand.go): $$ is $, $(NAME) is NAME's value where the container defines it (else left as written), any other
    $ stays."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "$" and i + 1 < len(text):
            close = text.find(")", i + 2) if text[i + 1] == "(" else -1
            if text[i + 1] == "$":
                out.append("$")
            elif close >= 0:
                name = text[i + 2:close]
                out.append(env.get(name, f"$({name})"))
                i = close + 1
                continue
            else:
                out.append(text[i:i + 2])
            i += 2
            continue
        out.append(text[i])
        i += 1
    return "".join(out)


COMPOSE_DOLLAR = re.compile(r"\$(\$|[_A-Za-z][_A-Za-z0-9]*|\{[^}]*\}|)")


def compose_interpolate(text: str, env: dict[str, str]) -> str:
    """What docker compose does to every string of its file (compose-spec 'Interpolation'): $$ is $, $NAME and
    ${NAME} are NAME's value (empty when unset), any other $ is an error."""
    def one(match: re.Match) -> str:
        token = match.group(1)
        if token == "$":
            return "$"
        if not token:
            raise ValueError(f"invalid interpolation format in {text!r}")
        return env.get(token.strip("{}").split(":")[0], "")

    return COMPOSE_DOLLAR.sub(one, text)


def with_run_args(spec_text: str, original: list[str], sent: list[str]) -> str:
    """The spec file's text with its run arguments (written as single-quoted YAML strings) replaced, as a user
    edits them, by `sent` written the way the file's header says."""
    assert len(original) == len(sent)
    for old, new in zip(original, sent):
        quoted = f"'{old}'"
        assert quoted in spec_text, f"{old} is not written as a single-quoted YAML string"
        spec_text = spec_text.replace(quoted, yaml_single_quoted(new))
    return spec_text


def strings_mapped(node, fn):
    if isinstance(node, dict):
        return {k: strings_mapped(v, fn) for k, v in node.items()}
    if isinstance(node, list):
        return [strings_mapped(v, fn) for v in node]
    return fn(node) if isinstance(node, str) else node


def test_compose_passes_hostile_arguments_byte_for_byte(tmp_path):
    text = (DOCKER / "compose.yaml").read_text()
    assert "$$" in text and "single-quoted" in text  # the header tells how to write an argument
    original = [str(w) for w in yaml.safe_load(text)["services"]["prepare"]["command"][1:]]
    sent = hostile_args(tmp_path, len(original))
    env = {"HOME": "/home/someone", "NODE_RANK": "5"}
    edited = yaml.safe_load(with_run_args(text, original, sent))
    services = strings_mapped(edited, lambda s: compose_interpolate(s, env))["services"]
    assert [str(w) for w in services["prepare"]["command"][1:]] == sent
    for name in ("node0", "node1"):
        _, argv = dry_run([str(word) for word in services[name]["command"]])
        check_hostile_arrival(tmp_path, sent, train_args(argv))
    # the control: written as they are, without the $$, compose would have changed them (or refused the file)
    unescaped = with_run_args(text, original, sent).replace("$$", "$")
    with pytest.raises(ValueError):
        strings_mapped(yaml.safe_load(unescaped), lambda s: compose_interpolate(s, env))


def test_kubernetes_passes_hostile_arguments_byte_for_byte(tmp_path):
    text = (DOCKER / "k8s" / "train-job.yaml").read_text()
    assert "$$" in text and "single-quoted" in text
    pod = next(d for d in yaml.safe_load_all(text) if d["kind"] == "Job")["spec"]["template"]["spec"]
    original = [str(w) for w in pod["initContainers"][0]["command"][2:]]
    sent = hostile_args(tmp_path, len(original))
    edited = next(d for d in yaml.safe_load_all(with_run_args(text, original, sent)) if d["kind"] == "Job")
    pod = edited["spec"]["template"]["spec"]
    for index in range(edited["spec"]["completions"]):
        env = {"NODE_RANK": str(index), "HOME": "/root"}
        init = [kubernetes_expand(str(w), env) for w in pod["initContainers"][0]["command"]]
        assert init[2:] == sent
        command = [kubernetes_expand(str(w), env) for w in pod["containers"][0]["command"]]
        _, argv = dry_run(command[1:])
        check_hostile_arrival(tmp_path, sent, train_args(argv))
    # the control: without the $$, the kubelet would have put node ranks and HOME into them
    every = hostile_args(tmp_path)
    assert [kubernetes_expand(arg, {"NODE_RANK": "1", "HOME": "/root"}) for arg in every] != every
