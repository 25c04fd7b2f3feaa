"""`competesmoe tensorboard`: serves runs on loopback; the scalars read back over HTTP are the ones
written, and the expert-load heatmap images show a collapsed router as one bright row."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import numpy as np
import pytest

from competesmoe.common.net import free_port
from competesmoe.launcher.metrics import MetricsWriter, expert_load_heatmap
from support import ROOT

EXPERTS, STEPS = 8, 12


def shares(step: int, collapse: bool) -> list[float]:
    if not collapse or step <= 4:
        return [1.0 / EXPERTS] * EXPERTS
    return [0.93] + [0.01] * (EXPERTS - 1)  # expert 0 takes (nearly) everything


def write_run(run_dir, collapse: bool) -> list[float]:
    run_dir.mkdir(parents=True)
    writer = MetricsWriter(run_dir, enabled=True)
    losses = []
    for step in range(1, STEPS + 1):
        loss = 5.0 - 0.1 * step + (0.5 if collapse else 0.0)
        losses.append(loss)
        layer = {"expert_fraction": shares(step, collapse), "router_entropy": 1.0, "competed": 0.0}
        writer.write({"step": step, "split": "train", "loss": loss, "lr": 1e-3}, [layer, layer])
    writer.close()
    return losses


def get(port: int, path: str, **query) -> bytes:
    url = f"http://127.0.0.1:{port}{path}" + (("?" + urllib.parse.urlencode(query)) if query else "")
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read()


def get_json(port: int, path: str, **query):
    return json.loads(get(port, path, **query))


def test_heatmap_shows_collapse_at_a_glance():
    balanced = expert_load_heatmap([shares(1, False)] * 10)
    collapsed = expert_load_heatmap([shares(10, True)] * 10)
    assert balanced.dtype == np.uint8 and balanced.shape[2] == 3 and balanced.shape[0] % EXPERTS == 0
    rows = lambda image: image.reshape(EXPERTS, -1, image.shape[1], 3).mean(axis=(1, 2, 3))  # noqa: E731
    assert np.ptp(rows(balanced)) < 1  # every expert the same colour
    brightness = rows(collapsed)
    assert brightness[0] > 150 and brightness[1:].max() < 80  # one bright row on dark


@pytest.mark.slow
def test_serves_scalars_and_heatmaps_on_loopback(tmp_path):
    runs = {"balanced": write_run(tmp_path / "balanced", False), "collapsed": write_run(tmp_path / "collapsed", True)}
    port = free_port()
    log = open(tmp_path / "tensorboard.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "competesmoe.launcher.cli", "tensorboard", "--port", str(port),
                             str(tmp_path / "balanced"), str(tmp_path / "collapsed")], cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 90
        while True:
            try:
                listed = get_json(port, "/data/runs")  # "balanced/.", "collapsed/." (--logdir_spec names)
                if sorted(name.split("/")[0] for name in listed) == sorted(runs):
                    break
            except OSError:
                pass
            assert proc.poll() is None, (tmp_path / "tensorboard.log").read_text()[-3000:]
            assert time.time() < deadline, "TensorBoard did not list the runs in 90 s"
            time.sleep(0.5)
        names = {name.split("/")[0]: name for name in listed}
        for run, losses in runs.items():
            run = names[run]
            scalars = get_json(port, "/data/plugin/scalars/scalars", run=run, tag="train/loss")
            assert [s[1] for s in scalars] == list(range(1, STEPS + 1))
            assert [s[2] for s in scalars] == pytest.approx(losses, abs=1e-6)
            tags = get_json(port, "/data/plugin/images/tags")[run]
            assert {"moe/layer0/expert_load_heatmap", "moe/layer1/expert_load_heatmap"} <= set(tags)
        entries = get_json(port, "/data/plugin/images/images", run=names["collapsed"],
                           tag="moe/layer0/expert_load_heatmap")
        last = max(entries, key=lambda e: e["step"])
        assert last["step"] == STEPS
        from PIL import Image

        image = np.asarray(Image.open(io.BytesIO(get(port, "/data/plugin/images/individualImage?" + last["query"]))))
        expected = expert_load_heatmap([shares(s, True) for s in range(1, STEPS + 1)])
        assert np.array_equal(image[..., :3], expected)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            log.close()
    with pytest.raises(OSError):  # stopped: nothing listens any more
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_missing_run_dir_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "competesmoe.launcher.cli", "tensorboard", str(tmp_path / "nope")],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "does not exist" in result.stderr and "Traceback" not in result.stderr
