"""Two real "hosts" on one machine: network namespaces with their own addresses joined by a veth
pair, 2 ranks each, a 20-step EP-2 job across them through `competesmoe launch`, three ways:
the deepspeed launcher per node (--no-ssh), torchrun with c10d rendezvous, and the deepspeed
launcher over ssh (pdsh, with an sshd started in each namespace); torchrun also with EP 4, so the
all-to-all and the competition gathers cross the hosts. The losses must equal (bitwise) the same
job on one host with 4 ranks.

Everything runs inside the namespaces (`ip netns exec`); nothing in the main namespace talks to
their addresses (it has no route there). Every namespace, link and process made here is removed
at the end, failed or not. Needs root and iproute2 (skipped otherwise); the ssh variant also needs
Debian's openssh-server and pdsh (skipped without them).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support import ROOT, SMALL, TINY, competesmoe, records

pytestmark = pytest.mark.slow  # real training runs / launchers: see tests/conftest.py

STEPS = 20
SUBNET = "10.213.57"  # only ever inside the namespaces made here
ADDRS = [f"{SUBNET}.1", f"{SUBNET}.2"]
IFNAME = "csnet0"  # the veth end is called the same in both namespaces
PREFIX = "csmoe-"
JOB = [*(a for a in SMALL if not a.startswith("train.max_steps=")), f"train.max_steps={STEPS}",
       "parallel.expert_parallel_size=2"]
TIMEOUT = 600


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=60)


def netns_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 (ip) is not installed"
    probe = f"{PREFIX}probe-{os.getpid()}"
    made = sh("ip", "netns", "add", probe, check=False)
    if made.returncode:
        return f"cannot make a network namespace: {made.stderr.strip()}"
    sh("ip", "netns", "del", probe, check=False)
    return None


SKIP = netns_unavailable()


def kill_namespace_processes(ns: str) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = [int(p) for p in sh("ip", "netns", "pids", ns, check=False).stdout.split()]
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + 5
        while pids and time.time() < deadline and sh("ip", "netns", "pids", ns, check=False).stdout.split():
            time.sleep(0.1)


def remove_stale_namespaces() -> None:
    """Namespaces left by an earlier run of this file that was killed (its pid is gone)."""
    for line in sh("ip", "netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        parts = name.split("-")
        if name.startswith(PREFIX) and len(parts) == 3 and parts[1].isdigit():
            if not Path(f"/proc/{parts[1]}").exists():
                kill_namespace_processes(name)
                sh("ip", "netns", "del", name, check=False)


class Hosts:
    """Two namespaces, each with lo and one veth end (IFNAME) holding its address."""

    def __init__(self):
        self.names = [f"{PREFIX}{os.getpid()}-{i}" for i in range(2)]
        self.procs: list[subprocess.Popen] = []

    def up(self) -> None:
        for ns in self.names:
            sh("ip", "netns", "add", ns)
        a, b = self.names
        sh("ip", "link", "add", IFNAME, "netns", a, "type", "veth", "peer", "name", IFNAME, "netns", b)
        for ns, addr in zip(self.names, ADDRS):
            sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", IFNAME)
            sh("ip", "-n", ns, "link", "set", IFNAME, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")

    def start(self, node: int, cmd: list[str], log: Path, env: dict | None = None, cwd: Path = ROOT) -> subprocess.Popen:
        proc = subprocess.Popen(["ip", "netns", "exec", self.names[node], *cmd], cwd=cwd,
                                stdout=open(log, "w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
        self.procs.append(proc)
        return proc

    def down(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        for ns in self.names:
            kill_namespace_processes(ns)
            sh("ip", "netns", "del", ns, check=False)  # takes the veth pair with it
        for proc in self.procs:
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def hosts():
    if SKIP:
        pytest.skip(SKIP)
    remove_stale_namespaces()
    h = Hosts()
    try:
        h.up()
        yield h
    finally:
        h.down()
    leftover = sh("ip", "netns", "list").stdout
    assert not any(ns in leftover for ns in h.names), leftover


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data") / "prepared"


@pytest.fixture(scope="module")
def one_host_runs(tmp_path_factory, data_dir):
    """The same job as 4 ranks on one host (loopback, main namespace), once per EP size."""
    cache: dict[int, dict[int, float]] = {}

    def run_for(ep: int) -> dict[int, float]:
        if ep not in cache:
            run = tmp_path_factory.mktemp(f"onehost_ep{ep}") / "run"
            result = competesmoe("launch", "--nproc", "4", "--launcher", "torchrun", TINY, f"output_dir={run}",
                                 f"data.prepared_dir={data_dir}", *JOB, f"parallel.expert_parallel_size={ep}",
                                 timeout=TIMEOUT)
            assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
            cache[ep] = losses(run)
        return cache[ep]

    return run_for


@pytest.fixture(scope="module")
def one_host(one_host_runs):
    return one_host_runs(2)


def losses(run: Path) -> dict[int, float]:
    train = records(run, "train")
    assert any(r["competing_layers"] for r in train)
    return {r["step"]: r["loss"] for r in train}


def launch_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "competesmoe.launcher.cli", "launch", *args]


def wait_all(procs: list[subprocess.Popen], logs: list[Path]) -> None:
    deadline = time.time() + TIMEOUT
    for proc, log in zip(procs, logs):
        try:
            code = proc.wait(timeout=max(1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            code = None
        if code != 0:
            tails = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in logs)
            pytest.fail(f"node {log.name} exited {code}\n{tails}")


def assert_equal_curves(a: dict[int, float], b: dict[int, float]) -> None:
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    worst = max(abs(a[s] - b[s]) for s in a)
    assert a == b, f"largest loss difference {worst:.2e}"  # bitwise: same ranks, same gloo algorithms


def per_node(hosts, tmp_path, data_dir, extra: list[str], overrides: tuple[str, ...] = ()) -> Path:
    run = tmp_path / "run"
    logs = [tmp_path / f"node{i}.log" for i in range(2)]
    procs = []
    for node in range(2):
        cmd = launch_cmd(*extra, "--nnodes", "2", "--nproc", "2", "--node-rank", str(node),
                         "--master-addr", ADDRS[0], "--master-port", "29510", "--ifname", IFNAME,
                         TINY, f"output_dir={run}", f"data.prepared_dir={data_dir}", *JOB, *overrides)
        procs.append(hosts.start(node, cmd, logs[node]))
    wait_all(procs, logs)
    first = logs[0].read_text().splitlines()[0]
    assert first.startswith("+ ") and f"GLOO_SOCKET_IFNAME={IFNAME}" in first, first
    return run


def test_deepspeed_no_ssh_two_hosts(hosts, tmp_path, data_dir, one_host):
    run = per_node(hosts, tmp_path, data_dir, ["--no-ssh"])
    assert "--no_ssh" in (tmp_path / "node1.log").read_text().splitlines()[0]
    assert_equal_curves(losses(run), one_host)


@pytest.mark.parametrize("ep", [2, 4])
def test_torchrun_rendezvous_two_hosts(hosts, tmp_path, data_dir, one_host_runs, ep):
    """EP 2 keeps each all-to-all inside a host; EP 4 sends it (and the competition gathers) across."""
    run = per_node(hosts, tmp_path, data_dir, ["--launcher", "torchrun"], (f"parallel.expert_parallel_size={ep}",))
    assert "--rdzv_backend c10d" in (tmp_path / "node0.log").read_text().splitlines()[0]
    assert_equal_curves(losses(run), one_host_runs(ep))


# ---------------------------------------------------------------------------------------------
# over ssh: an sshd in each namespace, a private key and client config (nothing in ~/.ssh)

SSHD = shutil.which("sshd") or ("/usr/sbin/sshd" if Path("/usr/sbin/sshd").exists() else None)


@pytest.fixture(scope="module")
def ssh_hosts(hosts, tmp_path_factory):
    if SSHD is None or shutil.which("pdsh") is None or shutil.which("ssh-keygen") is None:
        pytest.skip("needs openssh-server, openssh-client and pdsh (apt-get install openssh-server pdsh)")
    conf = tmp_path_factory.mktemp("ssh")
    sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(conf / "id"))
    sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(conf / "host_key"))
    (conf / "authorized_keys").write_text((conf / "id.pub").read_text())
    os.chmod(conf / "authorized_keys", 0o600)
    made_run_dir = not Path("/run/sshd").exists()
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation directory
    for node, addr in enumerate(ADDRS):
        (conf / f"sshd{node}.conf").write_text(
            f"ListenAddress {addr}\nPort 22\nHostKey {conf / 'host_key'}\nPidFile {conf / f'sshd{node}.pid'}\n"
            f"AuthorizedKeysFile {conf / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
            "PrintMotd no\n")
        hosts.start(node, [SSHD, "-D", "-e", "-f", str(conf / f"sshd{node}.conf")], conf / f"sshd{node}.log")
    (conf / "ssh_config").write_text(
        f"Host {SUBNET}.*\n  User root\n  IdentityFile {conf / 'id'}\n  IdentitiesOnly yes\n"
        "  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n")
    env = {"PDSH_SSH_ARGS_APPEND": f"-F {conf / 'ssh_config'}"}
    deadline = time.time() + 20  # until both sshds answer, seen from namespace 0
    while True:
        probes = [subprocess.run(["ip", "netns", "exec", hosts.names[0], "ssh", "-F", str(conf / "ssh_config"),
                                  "-o", "BatchMode=yes", "-o", "ConnectTimeout=3", addr, "true"],
                                 capture_output=True, timeout=30) for addr in ADDRS]
        if all(p.returncode == 0 for p in probes):
            break
        if time.time() > deadline:
            pytest.fail("sshd in the namespaces did not answer: " + " | ".join(p.stderr.decode() for p in probes))
        time.sleep(0.3)
    yield conf, env
    if made_run_dir:
        shutil.rmtree("/run/sshd", ignore_errors=True)


ODD = "; $(touch PWNED) 'q' \"d\" `touch PWNED` $HOME é 日本"
"""Text a shell would act on (;, $( ), quotes, backquotes, $VAR) plus spaces and unicode."""


def test_deepspeed_pdsh_two_hosts(hosts, ssh_hosts, tmp_path, data_dir, one_host):
    """Over pdsh, from a working directory with a space, with a relative config path and an output_dir full of
    shell syntax: each reaches the other host byte for byte, nothing in them runs."""
    conf, env = ssh_hosts
    work = tmp_path / "work dir"
    config = Path(f"conf{ODD}") / "tiny cpu.yaml"
    (work / config.parent).mkdir(parents=True)
    shutil.copy(TINY, work / config)
    (work / "hostfile").write_text(f"# two namespaces\n{ADDRS[0]} slots=2\n{ADDRS[1]} slots=2\n")
    run, log = tmp_path / f"run{ODD}", tmp_path / "launcher.log"
    proc = hosts.start(0, launch_cmd("--hostfile", "hostfile", "--master-port", "29511", "--ifname", IFNAME,
                                     str(config), f"output_dir={run}", f"data.prepared_dir={data_dir}", *JOB),
                       log, env, cwd=work)
    wait_all([proc], [log])
    first = log.read_text().splitlines()[0]
    assert "--launcher pdsh" in first and "DS_ENV_FILE=" in first, first
    assert_equal_curves(losses(run), one_host)  # the run dir of exactly that name holds the job's metrics
    assert not [p for p in (tmp_path, work, ROOT, Path("/"), Path.home()) if (p / "PWNED").exists()]


def test_unreachable_host_fails_early(hosts, ssh_hosts, tmp_path):
    """A hostfile naming a host with no sshd: one line naming it, before anything starts."""
    conf, env = ssh_hosts
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(f"{ADDRS[0]} slots=2\n{SUBNET}.3 slots=2\n")  # .3 is on the veth's subnet, nobody's
    log = tmp_path / "launcher.log"
    start = time.time()
    proc = hosts.start(0, launch_cmd("--hostfile", str(hostfile), TINY, f"output_dir={tmp_path / 'run'}"), log,
                       {**env, "PDSH_SSH_ARGS_APPEND": env["PDSH_SSH_ARGS_APPEND"] + " -o ConnectTimeout=3"})
    assert proc.wait(timeout=60) == 2, log.read_text()
    errors = [line for line in log.read_text().splitlines() if "error" in line]
    assert len(errors) == 1 and f"host {SUBNET}.3" in errors[0] and "unreachable" in errors[0], errors
    assert time.time() - start < 40
    assert not (tmp_path / "run").exists()


def test_unroutable_master_fails_early(hosts, tmp_path):
    """Node 1 cannot reach the master address (no route from its namespace): one line, nothing started."""
    log = tmp_path / "node1.log"
    proc = hosts.start(1, launch_cmd("--no-ssh", "--nnodes", "2", "--node-rank", "1", "--master-addr", "10.99.0.1",
                                     "--ifname", IFNAME, TINY, f"output_dir={tmp_path / 'run'}"), log)
    assert proc.wait(timeout=60) == 2, log.read_text()
    errors = [line for line in log.read_text().splitlines() if "error" in line]
    assert len(errors) == 1 and "master address 10.99.0.1 is unreachable" in errors[0], errors
    proc = hosts.start(1, launch_cmd("--launcher", "torchrun", "--nnodes", "2", "--node-rank", "1", "--master-addr",
                                     ADDRS[0], "--ifname", "eth9", TINY, f"output_dir={tmp_path / 'run'}"), log)
    assert proc.wait(timeout=60) == 2, log.read_text()
    assert f"network interface eth9 does not exist on this host (it has: lo, {IFNAME})" in log.read_text()


# ---------------------------------------------------------------------------------------------
# planning alone (no namespaces needed): the commands and the one-line refusals


def plan_of(*args: str, **kw):
    from competesmoe.launcher.launch import LaunchOptions, plan

    return plan(LaunchOptions(**kw), ["c.yaml"], "/tmp/w")


def test_one_host_command_is_unchanged():
    from competesmoe.launcher.launch import launch_command

    p = plan_of(nproc=3, master_port=1234)
    assert p.mode == "local" and p.command == launch_command("deepspeed", 3, 1234, ["c.yaml"])
    p = plan_of(launcher="torchrun", nproc=3, master_port=1234)
    assert p.command == launch_command("torchrun", 3, 1234, ["c.yaml"])
    assert p.env == {"OMP_NUM_THREADS": "1"}
    assert plan_of(threads=2, ifname="eth1").env == {"OMP_NUM_THREADS": "2", "GLOO_SOCKET_IFNAME": "eth1",
                                                     "NCCL_SOCKET_IFNAME": "eth1"}


def test_ssh_plan_exports_our_variables(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# cluster\nw0 slots=4\n\nw1 slots=4  # second\n")
    p = plan_of(hostfile=str(hostfile), ifname="ib0")
    assert p.mode == "ssh" and p.ssh_hosts == ["w0", "w1"]
    assert p.command[p.command.index("--master_addr") + 1] == "w0"  # the first host by default
    assert "--no_ssh_check" in p.command and "--launcher" in p.command  # we check ssh ourselves, all hosts
    env_file = p.env["DS_ENV_FILE"]
    assert "GLOO_SOCKET_IFNAME=ib0" in p.files[env_file] and "OMP_NUM_THREADS=1" in p.files[env_file]
    assert f"PATH={os.path.dirname(sys.executable)}:$PATH" in p.files[env_file]


def test_world_size_of_each_shape(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("w0 slots=4\nw1 slots=2\n")
    assert plan_of(nproc=3).world_size == 3
    assert plan_of(hostfile=str(hostfile)).world_size == 6  # each host's slots
    assert plan_of(hostfile=str(hostfile), nproc=1).world_size == 2  # --nproc caps every host
    assert plan_of(nnodes=3, nproc=2, node_rank=1, master_addr="m").world_size == 6
    assert plan_of(launcher="torchrun", nnodes=2, nproc=4, node_rank=0, master_addr="m").world_size == 8
    assert plan_of(nnodes=2, node_rank=0, master_addr="m").listen_port == 29500  # node 0 must be free to listen
    assert plan_of(nnodes=2, node_rank=1, master_addr="m").listen_port is None


@pytest.mark.parametrize("content,needle", [
    ("w0 slots=2\nw1 slots=two\n", "line 2: expected 'HOSTNAME slots=N'"),
    ("w0 slots=2\nw0 slots=2\n", "line 2: w0 is listed twice"),
    ("w0 slots=0\n", "line 1: w0 has slots=0"),
    ("# nothing\n\n", "lists no hosts"),
])
def test_bad_hostfile(tmp_path, content, needle):
    from competesmoe.common.errors import UserError

    hostfile = tmp_path / "hosts"
    hostfile.write_text(content)
    with pytest.raises(UserError, match=re.escape(needle)):
        plan_of(hostfile=str(hostfile))


@pytest.mark.parametrize("kw,needle", [
    (dict(hostfile="/nonexistent/hosts"), "hostfile /nonexistent/hosts does not exist"),
    (dict(nnodes=2), "needs --hostfile (ssh/pdsh) or --no-ssh --node-rank R"),
    (dict(nnodes=2, no_ssh=True), "give it --node-rank"),
    (dict(nnodes=2, node_rank=1), "--no-ssh needs --master-addr"),
    (dict(nnodes=2, node_rank=2, master_addr="m"), "--node-rank (2) must be in [0, 2)"),
    (dict(launcher="torchrun", nnodes=2), "needs --master-addr"),
    (dict(launcher="torchrun", nnodes=2, master_addr="m", no_ssh=True), "--no-ssh belongs to the deepspeed"),
    (dict(nproc=0), "--nproc (0) must be at least 1"),
])
def test_inconsistent_options(kw, needle):
    from competesmoe.common.errors import UserError

    with pytest.raises(UserError, match=re.escape(needle)):
        plan_of(**kw)


def test_cli_error_is_one_line(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("w0 slots=2\nw1\n")
    result = competesmoe("launch", "--hostfile", str(hostfile), TINY, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"competesmoe: error: hostfile {hostfile} line 2: expected 'HOSTNAME slots=N', got 'w1'")
