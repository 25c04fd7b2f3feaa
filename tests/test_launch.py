"""`launch --hostfile` (deepspeed over pdsh) hands every host one shell command line that DeepSpeed joins from
our arguments without quoting them: what crosses that shell must arrive byte for byte or be refused.
(The two-host run with such arguments is tests/test_multinode.py::test_deepspeed_pdsh_two_hosts.)"""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from competesmoe.common.errors import UserError
from competesmoe.launcher.launch import (
    REMOTE_TRAIN,
    LaunchOptions,
    _deepspeed_env_file,
    decode_train_args,
    encode_train_args,
    plan,
)

NASTY = ["configs/my run.yaml", "output_dir=/tmp/a b;touch pwned", "data.path=$(touch pwned)", "x='q'\"q\"",
         "moe.router=`id`", "output_dir=/tmp/ünï cödé/日本", "a\\b", "back\\\\slash", "", " lead", "tab\there"]


def bash(line: str) -> str:
    return subprocess.run(["bash", "-c", line], capture_output=True, text=True, timeout=30, check=True).stdout


def test_train_arguments_travel_as_one_shell_inert_token(tmp_path):
    token = encode_train_args(NASTY, cwd="/work dir/$HOME;x")
    assert re.fullmatch(r"[A-Za-z0-9_=-]+", token)
    assert bash(f"printf %s {token}") == token  # what a remote shell makes of it: the token itself
    assert decode_train_args(token) == ("/work dir/$HOME;x", NASTY)


def test_ssh_plan_runs_the_runner_from_root_and_sends_only_the_token(tmp_path, monkeypatch):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("w0 slots=2\nw1 slots=2\n")
    monkeypatch.chdir(tmp_path)
    p = plan(LaunchOptions(hostfile="hosts"), NASTY, str(tmp_path))
    assert p.cwd == "/"  # DeepSpeed's remote `cd <cwd>;` is unquoted: `/` is the one safe choice
    assert p.command[p.command.index("--hostfile") + 1] == str(hostfile)  # absolute, since we run from /
    assert p.command[-2] == REMOTE_TRAIN and decode_train_args(p.command[-1]) == (str(tmp_path), NASTY)
    assert not any(arg in p.command for arg in NASTY)


@pytest.mark.parametrize("value", ["1", "eth0", "/opt/my env/bin:/usr/bin", "a,b=c", "ünï"])
def test_env_values_deepspeed_quotes_arrive_intact(value, monkeypatch):
    monkeypatch.setenv("NCCL_TEST_VALUE", value)
    text = _deepspeed_env_file({"OMP_NUM_THREADS": "1"})
    assert "OMP_NUM_THREADS=1" in text
    # DeepSpeed's add_export: strip, then "value" when it holds anything beyond [\w@%+=:,./-]
    quoted = value if re.fullmatch(r"[\w@%+=:,./-]*", value) else f'"{value}"'
    assert bash(f'export NCCL_TEST_VALUE={quoted}; printf %s "$NCCL_TEST_VALUE"') == value


@pytest.mark.parametrize("value", ['a"b', "$(touch pwned)", "`id`", "a\\b"])
def test_env_values_a_remote_shell_would_read_are_refused(value, monkeypatch):
    monkeypatch.setenv("PYTHONSOMETHING", value)
    with pytest.raises(UserError, match="environment variable PYTHONSOMETHING=.* cannot reach the other hosts"):
        _deepspeed_env_file({})


@pytest.mark.parametrize("line", ["w0;touch slots=2", "w$(id) slots=2", "`w` slots=2"])
def test_hostnames_a_shell_would_read_are_refused(tmp_path, line):
    hostfile = tmp_path / "hosts"
    hostfile.write_text(line + "\n")
    with pytest.raises(UserError, match="line 1: host .* is not a host name or address"):
        plan(LaunchOptions(hostfile=str(hostfile)), ["c.yaml"], str(tmp_path))


def test_remote_train_refuses_a_foreign_token():
    from support import competesmoe

    result = competesmoe(REMOTE_TRAIN, "bm90IGEgdG9rZW4=", timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"competesmoe: error: {REMOTE_TRAIN}: the argument is not a token "
                                                  f"made by `competesmoe launch`"]
    assert not os.path.exists("pwned")
