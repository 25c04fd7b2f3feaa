"""A run's output_dir: one run at a time, never a fresh start on top of another run, and the resolved config written
beside the user's files without replacing any of them.

- The lock: rank 0 holds an exclusive `fcntl.flock` on `<output_dir>/.competesmoe.lock` from before anything is
  written until it exits (the kernel drops it when the process dies, so a crashed run leaves nothing stale; the
  holder's pid and host in the file are only for the message). A second run on the same output_dir stops at once
  with one line naming them, instead of interleaving metrics and checkpoints with the first.
- Another run: published checkpoints or a metrics.jsonl with records. A start that failed before its first record
  (or a crash at step 1) leaves neither, so it never blocks the rerun.
- The resolved config goes to config.yaml when that file is absent or ours (its first line is CONFIG_MARKER), else to
  config.resolved.yaml (same rule), and the run says so: `train myrun/config.yaml output_dir=myrun` keeps the user's
  commented file as it was.
"""

from __future__ import annotations

import fcntl
import os
import socket
import sys
from pathlib import Path

import yaml

from competesmoe.common.errors import UserError
from competesmoe.launcher.checkpoint import CHECKPOINTS
from competesmoe.launcher.checkpoint.layout import published_tags
from competesmoe.launcher.config import Config, to_dict

LOCK_FILE = ".competesmoe.lock"
METRICS_FILE = "metrics.jsonl"
CONFIG_FILES = ("config.yaml", "config.resolved.yaml")
"""Where the resolved config goes: the first of these that is absent or ours."""
CONFIG_MARKER = "# Written by `competesmoe train`: the resolved config of the run in this folder (rewritten at each start).\n"


def check_writable(run_dir: Path) -> None:
    """Create output_dir and write a file in it, or one line saying why not (every rank writes checkpoint files)."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write_probe_{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as err:
        raise UserError(f"output_dir {run_dir} is not writable ({err.strerror}); choose another output_dir") from None


class RunDir:
    """Rank 0's hold on an output_dir (a context manager): the lock, the checks made under it, and where the
    resolved config goes."""

    def __init__(self, cfg: Config, run_dir: Path):
        self.cfg = cfg
        self.run_dir = run_dir
        self.config_path = None
        self._handle = None

    def __enter__(self) -> "RunDir":
        self._lock()
        try:
            self._check_not_another_run()
            self.config_path = self._config_target()
        except BaseException:
            self.release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()  # closing the file drops the flock
            self._handle = None

    def _lock(self) -> None:
        path = self.run_dir / LOCK_FILE
        handle = open(path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "a process that has not written its name yet"
            handle.close()
            raise UserError(f"output_dir {self.run_dir} is in use by another run ({holder}; lock file {path}); wait "
                            f"for it to finish or choose another output_dir") from None
        except OSError as err:  # a file system without locks: say so, and go on unprotected
            print(f"competesmoe: warning: cannot lock {path} ({err.strerror}); nothing stops a second run on "
                  f"output_dir {self.run_dir}", file=sys.stderr)
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on host {socket.gethostname()}\n")
        handle.flush()
        self._handle = handle

    def _check_not_another_run(self) -> None:
        if self.cfg.resume != "none":
            return
        metrics = self.run_dir / METRICS_FILE
        if published_tags(self.run_dir / CHECKPOINTS) or (metrics.is_file() and metrics.stat().st_size > 0):
            raise UserError(f"output_dir {self.run_dir} already holds a run; continue it with resume=auto "
                            f"or choose a new output_dir")

    def _config_target(self) -> Path:
        for name in CONFIG_FILES:
            path = self.run_dir / name
            if not path.exists() or written_by_us(path):
                return path
        raise UserError(f"output_dir {self.run_dir}: {' and '.join(CONFIG_FILES)} are files competesmoe did not "
                        f"write; move one of them, or choose another output_dir (the resolved config goes there)")

    def write_config(self) -> None:
        """The resolved config, under CONFIG_MARKER; one line when it cannot go to config.yaml."""
        self.config_path.write_text(CONFIG_MARKER + yaml.safe_dump(to_dict(self.cfg), sort_keys=False))
        if self.config_path.name != CONFIG_FILES[0]:
            print(f"competesmoe: {self.run_dir / CONFIG_FILES[0]} is not a file competesmoe wrote, so it is left as "
                  f"it is; the resolved config is in {self.config_path}", file=sys.stderr, flush=True)


def written_by_us(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.readline() == CONFIG_MARKER
    except OSError:
        return False
