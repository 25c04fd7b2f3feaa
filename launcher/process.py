"""Running a child command in the foreground: SIGTERM is passed on to it, Ctrl-C lets it finish."""

from __future__ import annotations

import os
import signal
import subprocess


def run_child(command: list[str], env: dict[str, str] | None = None, cwd: str | None = None) -> int:
    """Run `command` (an argument list, never through a shell) with `env` on top of ours; its exit code.

    A SIGTERM sent to us (a scheduler's preemption) is forwarded, so the child can save and exit. On Ctrl-C
    the child received the same SIGINT from the terminal: wait for it to finish rather than orphan it.
    """
    child = subprocess.Popen(command, env={**os.environ, **(env or {})}, cwd=cwd)

    def forward(signum, _frame):
        child.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        return child.wait()
    except KeyboardInterrupt:
        return child.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
        if child.poll() is None:
            child.kill()
