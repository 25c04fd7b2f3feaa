"""launcher/run_dir.py: one run per output_dir (a stale lock is taken over), a failed start leaves nothing that blocks
a rerun, and the resolved config never replaces a file we did not write."""

import os

import pytest

from competesmoe.common.errors import UserError
from competesmoe.launcher.config import load_config
from competesmoe.launcher.run_dir import CONFIG_MARKER, LOCK_FILE, RunDir
from support import TINY


def claim(out, *overrides):
    return RunDir(load_config(TINY, [f"output_dir={out}", *overrides]), out)


def test_a_lock_left_by_a_dead_run_is_taken_over(tmp_path):
    (tmp_path / LOCK_FILE).write_text("pid 999999 on host this-host\n")  # written, never flocked: its holder died
    with claim(tmp_path):
        assert (tmp_path / LOCK_FILE).read_text().startswith(f"pid {os.getpid()} on host ")
        with pytest.raises(UserError, match=f"in use by another run \\(pid {os.getpid()} on host"):
            with claim(tmp_path):
                pass
    with claim(tmp_path):  # released at exit
        pass


def test_a_failed_start_does_not_block_the_rerun(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")  # a crash before the first record
    with claim(tmp_path):
        pass
    (tmp_path / "metrics.jsonl").write_text('{"split": "train", "step": 1}\n')
    with pytest.raises(UserError, match="already holds a run; continue it with resume=auto"):
        with claim(tmp_path):
            pass


def test_the_resolved_config_goes_beside_the_users_config(tmp_path, capsys):
    mine = b"# my commented config\ntrain: {max_steps: 3}\n"
    (tmp_path / "config.yaml").write_bytes(mine)
    with claim(tmp_path) as run_dir:
        run_dir.write_config()
    assert (tmp_path / "config.yaml").read_bytes() == mine
    written = (tmp_path / "config.resolved.yaml").read_text()
    assert written.startswith(CONFIG_MARKER) and "max_steps" in written
    assert "config.resolved.yaml" in capsys.readouterr().err
    with claim(tmp_path) as run_dir:  # ours now: rewritten at the next start
        assert run_dir.config_path == tmp_path / "config.resolved.yaml"
