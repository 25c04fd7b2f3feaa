"""`competesmoe launch`: start `competesmoe train` on one host or many, printing the exact command first.

Four shapes, one entry point (`python -m competesmoe.launcher.cli train CONFIG overrides`):

- one host (default): the deepspeed launcher, or torchrun, on `--nproc` local ranks.
- deepspeed over ssh: `--hostfile F` (DeepSpeed's format, `host slots=N`); run once, on the first
  host; DeepSpeed's runner starts every host through pdsh. Each host is checked over ssh first.
  pdsh hands the remote side one shell command line that DeepSpeed joins from our arguments without
  quoting them, so the `train` arguments and the working directory travel as one shell-inert token
  (`remote-train TOKEN`: base64url of JSON) and arrive byte for byte; the runner itself runs from `/`.
- deepspeed per node: `--no-ssh --node-rank R` (with `--hostfile F`, or `--nnodes K`); run on every
  node with its own rank.
- torchrun with rendezvous: `--launcher torchrun --nnodes K --master-addr A`; run on every node
  (the c10d store lives at A:port; `--node-rank 0` marks the host of it).

Every rank gets OMP_NUM_THREADS=--threads (1 by default: oversubscribed CPU ranks are 2-3x slower)
and, with `--ifname IF`, GLOO_SOCKET_IFNAME/NCCL_SOCKET_IFNAME=IF. Bad hostfiles, missing network
interfaces, unresolvable or unroutable masters and hosts ssh cannot reach stop with one line.
"""

from __future__ import annotations

import base64
import fcntl
import ipaddress
import itertools
import json
import os
import re
import shlex
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from competesmoe.common.errors import UserError
from competesmoe.common.net import free_port
from competesmoe.launcher.process import run_child

TRAIN_MODULE = "competesmoe.launcher.cli"
DEFAULT_MULTINODE_PORT = 29500
SSH_TIMEOUT = 10  # seconds per host for the reachability check
RENDEZVOUS_TIMEOUT = 600
"""Seconds a node waits for the master address to resolve: torchrun's c10d rendezvous join timeout (its default), the
time the job gives its nodes to meet anyway. (Kubernetes publishes pod 0's name only once pod 0 exists: a slow image
pull there must not fail the other pods.)"""
RESOLVE_RETRY_S = 2.0
HOSTFILE_LINE = re.compile(r"^(\S+)\s+slots=(\d+)\s*(#.*)?$")  # DeepSpeed's format, stricter
HOSTNAME = re.compile(r"^[A-Za-z0-9._:-]+$")  # names and IPv4/IPv6 addresses; nothing a remote shell reads
IFNAME = re.compile(r"^[A-Za-z0-9._:@-]{1,15}$")  # Linux: at most 15 bytes (IFNAMSIZ - 1), no '/' or space
REMOTE_TRAIN = "remote-train"
DEEPSPEED_EXPORTED = ("MLFLOW", "PYTHON", "MV2", "UCX", "NCCL")
"""Prefixes of the variables DeepSpeed's runner exports to pdsh hosts by itself (runner.EXPORT_ENVS + CUDA's)."""
UNSAFE_IN_DOUBLE_QUOTES = re.compile(r'["$`\\\n]')
"""What DeepSpeed's export quoting ("value") would let a remote shell interpret."""


@dataclass
class LaunchOptions:
    launcher: str = "deepspeed"
    nproc: int | None = None
    nnodes: int | None = None
    node_rank: int | None = None
    master_addr: str | None = None
    master_port: int | None = None
    hostfile: str | None = None
    no_ssh: bool = False
    ifname: str | None = None
    local_addr: str | None = None
    rdzv_id: str = "competesmoe"
    threads: int = 1
    dry_run: bool = False


@dataclass
class Plan:
    """What will run: the command, the variables set for it, files written for it, checks to make."""

    mode: str  # local | ssh | no-ssh | torchrun-local | torchrun-rdzv
    command: list[str]
    env: dict[str, str]
    files: dict[str, str] = field(default_factory=dict)  # path -> content, written before the command
    ssh_hosts: list[str] = field(default_factory=list)
    master_addr: str | None = None
    node_rank: int | None = None
    world_size: int | None = None
    listen_port: int | None = None  # a port this host must be able to listen on (its rendezvous)
    cwd: str | None = None  # where the command runs (None: here)

    def shell(self) -> str:
        prefix = [f"{k}={shlex.quote(v)}" for k, v in self.env.items()]
        line = " ".join(prefix + [shlex.join(self.command)])
        return f"(cd {shlex.quote(self.cwd)} && {line})" if self.cwd else line


# ---------------------------------------------------------------------------------------------
# hostfile


def parse_hostfile(path: str) -> "OrderedDict[str, int]":
    """DeepSpeed's hostfile (`hostname slots=N` per line, # comments); one-line errors."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"hostfile {path} does not exist")
    hosts: OrderedDict[str, int] = OrderedDict()
    for number, raw in enumerate(file.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = HOSTFILE_LINE.match(line)
        if not match:
            raise UserError(f"hostfile {path} line {number}: expected 'HOSTNAME slots=N', got {line!r}")
        host, slots = match.group(1), int(match.group(2))
        if not HOSTNAME.match(host):
            raise UserError(f"hostfile {path} line {number}: host {host!r} is not a host name or address "
                            f"(letters, digits, '.', '-', ':' only)")
        if slots < 1:
            raise UserError(f"hostfile {path} line {number}: {host} has slots={slots}; it needs at least 1")
        if host in hosts:
            raise UserError(f"hostfile {path} line {number}: {host} is listed twice")
        hosts[host] = slots
    if not hosts:
        raise UserError(f"hostfile {path} lists no hosts (expected lines 'HOSTNAME slots=N')")
    return hosts


# ---------------------------------------------------------------------------------------------
# planning


def thread_env(opts: LaunchOptions) -> dict[str, str]:
    env = {"OMP_NUM_THREADS": str(opts.threads)}
    if opts.ifname:
        env["GLOO_SOCKET_IFNAME"] = opts.ifname
        env["NCCL_SOCKET_IFNAME"] = opts.ifname
    # DS_ACCELERATOR is left to each rank (`competesmoe train` picks cpu or cuda by itself): a CPU login
    # node must not tell GPU nodes to train on CPU.
    return env


def launch_command(launcher: str, nproc: int, port: int, train_args: list[str]) -> list[str]:
    """The one-host command (kept as it always was)."""
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", TRAIN_MODULE, "train", *train_args]
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(port), "--no_local_rank",
            "--module", TRAIN_MODULE, "train", *train_args]


def plan(opts: LaunchOptions, train_args: list[str], workdir: str | None = None) -> Plan:
    """Turn the options into one command; raises UserError for every inconsistent combination."""
    for name in ("nproc", "nnodes", "threads"):
        value = getattr(opts, name)
        if value is not None and value < 1:
            raise UserError(f"--{name} ({value}) must be at least 1")
    hosts = parse_hostfile(opts.hostfile) if opts.hostfile else None
    nnodes = opts.nnodes if opts.nnodes is not None else (len(hosts) if hosts else 1)
    if hosts and opts.nnodes is not None and opts.nnodes != len(hosts):
        raise UserError(f"--nnodes ({opts.nnodes}) disagrees with hostfile {opts.hostfile} ({len(hosts)} hosts)")
    if opts.node_rank is not None and not 0 <= opts.node_rank < nnodes:
        raise UserError(f"--node-rank ({opts.node_rank}) must be in [0, {nnodes}) for {nnodes} nodes")
    env = thread_env(opts)
    workdir = workdir or tempfile.gettempdir()

    if opts.launcher == "torchrun":
        if opts.no_ssh:
            raise UserError("--no-ssh belongs to the deepspeed launcher; torchrun never uses ssh")
        if hosts and any(slots != next(iter(hosts.values())) for slots in hosts.values()):
            raise UserError(f"torchrun starts the same --nproc on every node; hostfile {opts.hostfile} "
                            f"has different slots per host")
        nproc = opts.nproc or (next(iter(hosts.values())) if hosts else 2)
        if nnodes == 1 and opts.master_addr is None:
            return Plan("torchrun-local", launch_command("torchrun", nproc, opts.master_port or free_port(),
                                                         train_args), env, world_size=nproc,
                        listen_port=opts.master_port)
        master = opts.master_addr or (next(iter(hosts)) if hosts else None)
        if master is None:
            raise UserError("torchrun on several nodes needs --master-addr (the rendezvous host, node 0)")
        port = opts.master_port or DEFAULT_MULTINODE_PORT
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes),
                   "--nproc_per_node", str(nproc), "--rdzv_backend", "c10d",
                   "--rdzv_endpoint", f"{_bracket(master)}:{port}", "--rdzv_id", opts.rdzv_id]
        if opts.node_rank is not None:
            # node 0 hosts the c10d store: say so, rather than let torchrun guess from the hostname
            command += ["--rdzv_conf", f"is_host={int(opts.node_rank == 0)}"]
        local_addr = opts.local_addr
        if local_addr is None and opts.ifname:
            try:
                local_addr = interface_address(opts.ifname)
            except UserError:
                if not opts.dry_run:
                    raise
                local_addr = f"<address of {opts.ifname}>"  # a dry run elsewhere: filled in on the node
        if local_addr:
            command += ["--local_addr", local_addr]
        command += ["-m", TRAIN_MODULE, "train", *train_args]
        return Plan("torchrun-rdzv", command, env, master_addr=master, node_rank=opts.node_rank,
                    world_size=nnodes * nproc, listen_port=port if opts.node_rank == 0 else None)

    if opts.local_addr:
        raise UserError("--local-addr is for torchrun; the deepspeed launcher takes --master-addr")
    no_ssh = opts.no_ssh or opts.node_rank is not None
    if not hosts and nnodes == 1 and not no_ssh:
        nproc = opts.nproc or 2
        master = opts.master_addr or "127.0.0.1"
        command = launch_command("deepspeed", nproc, opts.master_port or free_port(), train_args)
        command[command.index("--master_addr") + 1] = master
        return Plan("local", command, env, world_size=nproc, listen_port=opts.master_port)
    port = opts.master_port or DEFAULT_MULTINODE_PORT
    base = [sys.executable, "-m", "deepspeed.launcher.runner"]
    tail = ["--no_local_rank", "--module", TRAIN_MODULE, "train", *train_args]
    files: dict[str, str] = {}
    if no_ssh:
        if opts.node_rank is None:
            raise UserError("--no-ssh starts one node: give it --node-rank (0 on the master node)")
        if opts.master_addr is None:
            raise UserError("--no-ssh needs --master-addr (the address of node 0, reachable from every node)")
        hostfile = opts.hostfile
        if hosts is None:  # DeepSpeed counts ranks per node from a hostfile even without ssh
            hostfile = os.path.join(workdir, "hostfile")
            files[hostfile] = "".join(f"node{i} slots={opts.nproc or 2}\n" for i in range(nnodes))
        command = base + ["--hostfile", hostfile, "--no_ssh", "--node_rank", str(opts.node_rank),
                          "--master_addr", opts.master_addr, "--master_port", str(port)]
        if opts.nproc:
            command += ["--num_gpus", str(opts.nproc)]
        world = nnodes * opts.nproc if opts.nproc else (sum(hosts.values()) if hosts else nnodes * 2)
        return Plan("no-ssh", command + tail, env, files, master_addr=opts.master_addr, node_rank=opts.node_rank,
                    world_size=world, listen_port=port if opts.node_rank == 0 else None)

    if hosts is None:
        raise UserError(f"--nnodes {nnodes} with the deepspeed launcher needs --hostfile (ssh/pdsh) "
                        f"or --no-ssh --node-rank R on every node")
    master = opts.master_addr or next(iter(hosts))
    if not HOSTNAME.match(master):
        raise UserError(f"--master-addr {master!r} is not a host name or address (letters, digits, '.', '-', ':')")
    if " " in sys.executable:
        raise UserError(f"this Python ({sys.executable}) lies under a path with a space, which DeepSpeed's pdsh "
                        f"launcher cannot start on the other hosts; install the environment under a path without "
                        f"spaces, or launch with --no-ssh --node-rank R on every host")
    # pdsh exports only a few variable families to the remote shells; DS_ENV_FILE lists ours, and puts
    # this Python's bin/ first on the remote PATH (the venv's ninja, compilers' wrappers, deepspeed).
    env_file = os.path.join(workdir, "deepspeed_env")
    bindir = os.path.dirname(sys.executable)
    files[env_file] = _deepspeed_env_file({**env, "PATH": f"{bindir}:$PATH"})
    command = base + ["--hostfile", os.path.abspath(opts.hostfile), "--launcher", "pdsh", "--no_ssh_check",
                      "--master_addr", master, "--master_port", str(port)]
    if opts.nproc:
        command += ["--num_gpus", str(opts.nproc)]
    # one host: DeepSpeed starts it locally, without pdsh, so there is nothing to reach over ssh
    world = len(hosts) * opts.nproc if opts.nproc else sum(hosts.values())
    remote_tail = ["--no_local_rank", "--module", TRAIN_MODULE, REMOTE_TRAIN, encode_train_args(train_args)]
    return Plan("ssh", command + remote_tail, {"DS_ENV_FILE": env_file, **env}, files,
                ssh_hosts=list(hosts) if len(hosts) > 1 else [], master_addr=master, world_size=world, cwd="/")


def encode_train_args(train_args: list[str], cwd: str | None = None) -> str:
    """The `train` arguments and the working directory as one token a shell leaves alone ([A-Za-z0-9_=-])."""
    payload = {"cwd": cwd or os.getcwd(), "argv": list(train_args)}
    return base64.urlsafe_b64encode(json.dumps(payload, ensure_ascii=False).encode("utf-8")).decode("ascii")


def decode_train_args(token: str) -> tuple[str, list[str]]:
    """(working directory, train arguments) from `encode_train_args`'s token."""
    try:
        payload = json.loads(base64.urlsafe_b64decode(token.encode("ascii")).decode("utf-8"))
        return str(payload["cwd"]), [str(a) for a in payload["argv"]]
    except (ValueError, KeyError, TypeError, UnicodeError):
        raise UserError(f"{REMOTE_TRAIN}: the argument is not a token made by `competesmoe launch`") from None


def _deepspeed_env_file(env: dict[str, str]) -> str:
    """Our variables after the user's own ~/.deepspeed_env and ./.deepspeed_env (which DS_ENV_FILE hides).

    DeepSpeed writes each as `export KEY="VALUE";` into the remote command line, so a value with `"`, `$`,
    a backquote, a backslash or a newline would be read by the remote shell: such values are refused (our PATH's
    `$PATH` is the one meant to expand there)."""
    lines: list[str] = []
    for folder in (os.path.expanduser("~"), "."):
        user_file = Path(folder) / ".deepspeed_env"
        if user_file.is_file():
            lines += [line for line in user_file.read_text().splitlines() if "=" in line]
    exported_by_deepspeed = {k: v for k, v in os.environ.items() if k.startswith(DEEPSPEED_EXPORTED)}
    for key, value in {**exported_by_deepspeed, **env}.items():
        shown = value[:-len(":$PATH")] if key == "PATH" and value.endswith(":$PATH") else value
        if UNSAFE_IN_DOUBLE_QUOTES.search(shown):
            raise UserError(f"environment variable {key}={shown!r} cannot reach the other hosts intact (DeepSpeed's "
                            f"pdsh launcher passes it through a shell in double quotes); remove \", $, ` and \\ "
                            f"from it, or launch with --no-ssh --node-rank R on every host")
    lines += [f"{k}={v}" for k, v in env.items()]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# early checks (skipped by --dry-run)


def interface_address(ifname: str) -> str:
    """The IPv4 address of a local interface; a one-line error naming the interfaces there are."""
    check_interface(ifname)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            packed = fcntl.ioctl(sock.fileno(), 0x8915, struct.pack("256s", ifname.encode()[:15]))  # SIOCGIFADDR
        except OSError:
            raise UserError(f"network interface {ifname} has no IPv4 address") from None
    return socket.inet_ntoa(packed[20:24])


def check_interface(ifname: str) -> None:
    names = [name for _, name in socket.if_nameindex()]
    if ifname not in names:
        raise UserError(f"network interface {ifname} does not exist on this host (it has: {', '.join(names)})")


def resolve(host: str, port: int, what: str, wait_s: float = RENDEZVOUS_TIMEOUT) -> list:
    """getaddrinfo of the address, retried while it does not resolve, for up to wait_s seconds (said once)."""
    deadline = time.monotonic() + wait_s
    for attempt in itertools.count():
        try:
            return socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        except socket.gaierror as err:
            left = deadline - time.monotonic()
            if left <= 0:
                raise UserError(f"{what} {host} does not resolve ({err.strerror}) after {wait_s:.0f} s; check the "
                                f"name, or that node 0 has started") from None
            if attempt == 0:
                print(f"competesmoe: {what} {host} does not resolve yet ({err.strerror}); retrying for up to "
                      f"{left:.0f} s", file=sys.stderr, flush=True)
            time.sleep(min(RESOLVE_RETRY_S, left))


def check_route(host: str, port: int, what: str, wait_s: float = RENDEZVOUS_TIMEOUT) -> None:
    """The address resolves (within wait_s) and this host has a route to it (a UDP connect sends no packet)."""
    infos = resolve(host, port, what, wait_s)
    last = None
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as sock:
            try:
                sock.connect(address)
                return
            except OSError as err:
                last = err
    raise UserError(f"{what} {host} is unreachable from this host ({last.strerror if last else 'no address'})")


def ssh_command(host: str) -> list[str]:
    """How pdsh will reach the host: ssh, plus whatever PDSH_SSH_ARGS_APPEND adds."""
    extra = shlex.split(os.environ.get("PDSH_SSH_ARGS_APPEND", ""))
    return ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={SSH_TIMEOUT}", *extra, host, "true"]


def check_ssh_hosts(hosts: list[str]) -> None:
    if shutil.which("pdsh") is None:
        raise UserError("the deepspeed launcher reaches hosts through pdsh, which is not installed "
                        "(apt-get install pdsh), or start each node with --no-ssh --node-rank R")
    if shutil.which("ssh") is None:
        raise UserError("ssh is not installed (apt-get install openssh-client)")

    def probe(host: str) -> tuple[str, subprocess.CompletedProcess | None]:
        try:
            return host, subprocess.run(ssh_command(host), capture_output=True, text=True,
                                        timeout=SSH_TIMEOUT + 5, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return host, None

    with ThreadPoolExecutor(max_workers=min(16, len(hosts))) as pool:
        for host, result in pool.map(probe, hosts):
            if result is None or result.returncode != 0:
                detail = "timed out" if result is None else (result.stderr.strip().splitlines() or ["ssh failed"])[-1]
                raise UserError(f"host {host} from the hostfile is unreachable over ssh ({detail}); "
                                f"passwordless ssh to every host is needed, or use --no-ssh --node-rank R")


def check_port_free(port: int) -> None:
    """Nothing listens on the port here yet (SO_REUSEADDR: lingering TIME_WAIT connections don't count)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("", port))
        except OSError as err:
            raise UserError(f"--master-port: port {port} is already in use on this host ({err.strerror}); "
                            f"choose another, or leave --master-port out on one host for a free one") from None


def preflight(p: Plan, opts: LaunchOptions) -> None:
    if p.listen_port is not None:
        check_port_free(p.listen_port)
    if opts.ifname:
        check_interface(opts.ifname)
    if p.mode == "ssh" and p.ssh_hosts:
        check_ssh_hosts(p.ssh_hosts)
    elif p.mode in ("no-ssh", "torchrun-rdzv") and p.master_addr and p.node_rank != 0:
        check_route(p.master_addr, opts.master_port or DEFAULT_MULTINODE_PORT, "master address")


# ---------------------------------------------------------------------------------------------
# running


def run_plan(p: Plan, opts: LaunchOptions, validate=None) -> int:
    if validate is not None and p.world_size is not None:
        validate(p.world_size)  # e.g. the world must be a multiple of the EP size: refuse before any rank starts
    print("+ " + p.shell(), flush=True)
    for path, content in p.files.items():
        print(f"# {path}: " + "; ".join(content.strip().splitlines()), flush=True)
    if p.mode == "ssh":
        cwd, train_args = decode_train_args(p.command[-1])
        print(f"# {REMOTE_TRAIN} token = in {shlex.quote(cwd)}: competesmoe train {shlex.join(train_args)}", flush=True)
    if opts.dry_run:
        return 0
    preflight(p, opts)
    for path, content in p.files.items():
        Path(path).write_text(content)
    return run_child(p.command, p.env, cwd=p.cwd)


def launch(opts: LaunchOptions, train_args: list[str], validate=None) -> int:
    """Plan, check (`validate(world_size)`, then the network unless --dry-run), print, run; the exit code."""
    with tempfile.TemporaryDirectory(prefix="competesmoe-launch-") as workdir:
        return run_plan(plan(opts, train_args, workdir), opts, validate)


def _bracket(host: str) -> str:
    try:
        return f"[{host}]" if ipaddress.ip_address(host).version == 6 else host
    except ValueError:
        return host
