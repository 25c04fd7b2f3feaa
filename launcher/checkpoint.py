"""Crash-safe checkpoints around DeepSpeed's: write aside, verify, publish atomically, `latest` last.

A save goes to `<root>/.staging/<tag>/` (DeepSpeed's files, one expert file per EP rank, per-rank RNG,
`run_state.json`), then rank 0 writes `manifest.json` (every file's size and sha256), renames the
directory to `<root>/<tag>` and only then replaces `<root>/latest`. A crash at any point leaves the
previous checkpoint published and loadable; a truncated or corrupt file is found at load by the
manifest, and `resume=auto` falls back to the newest good checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import torch.distributed as dist

from competesmoe.common.errors import UserError
from competesmoe.common.files import fsync_path, sha256_file, write_atomic

FAULT_KILL_IN_PUBLISH = "COMPETESMOE_FAULT_KILL_IN_PUBLISH"
"""Fault injection for tests: rank 0 SIGKILLs itself while publishing this tag (staged, not yet visible)."""

STAGING = ".staging"
MANIFEST = "manifest.json"
RUN_STATE = "run_state.json"
LATEST = "latest"


class CheckpointError(UserError):
    """A checkpoint that cannot be used; the message names the file."""


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def write_manifest(tag_dir: Path) -> None:
    files = sorted(p for p in tag_dir.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {}
    for path in files:
        fsync_path(path)
        entries[str(path.relative_to(tag_dir))] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    write_atomic(tag_dir / MANIFEST, json.dumps({"files": entries}, indent=1))


def verify(tag_dir: Path) -> dict:
    """Check every file against the manifest; returns the run state. Raises CheckpointError naming the file."""
    manifest_path = tag_dir / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {tag_dir} has no {MANIFEST} (an unfinished save); "
                              f"resume from another checkpoint")
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (ValueError, KeyError):
        raise CheckpointError(f"{manifest_path} is corrupt; resume from another checkpoint") from None
    for name, expected in files.items():
        path = tag_dir / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint file {path} is missing; resume from another checkpoint")
        if path.stat().st_size != expected["bytes"]:
            raise CheckpointError(f"checkpoint file {path} is truncated ({path.stat().st_size} of "
                                  f"{expected['bytes']} bytes); resume from another checkpoint")
        if sha256_file(path) != expected["sha256"]:
            raise CheckpointError(f"checkpoint file {path} is corrupt (sha256 mismatch); resume from another checkpoint")
    return json.loads((tag_dir / RUN_STATE).read_text())


def published_tags(root: Path) -> list[str]:
    """Published checkpoint tags, newest first."""
    if not root.is_dir():
        return []
    return sorted((p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("step")), reverse=True)


def find_resumable(root: Path) -> tuple[Path, dict] | None:
    """The newest checkpoint that verifies (rank 0 only); corrupt newer ones are reported and skipped."""
    for tag in published_tags(root):
        try:
            return root / tag, verify(root / tag)
        except CheckpointError as err:
            print(f"competesmoe: warning: skipping {tag}: {err}", flush=True)
    return None


def agree(value, rank: int):
    """Rank 0's value on every rank (small Python objects)."""
    box = [value if rank == 0 else None]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    return box[0]


def prepare_staging(root: Path, tag: str, rank: int) -> Path:
    staging = root / STAGING
    if rank == 0:
        shutil.rmtree(staging / tag, ignore_errors=True)
        staging.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    return staging


def publish(root: Path, tag: str, run_state: dict, keep: int) -> None:
    """Rank 0, after every rank finished writing: manifest, rename, then `latest`, then prune."""
    staged = root / STAGING / tag
    (staged / RUN_STATE).write_text(json.dumps(run_state, indent=1))
    write_manifest(staged)
    if os.environ.get(FAULT_KILL_IN_PUBLISH) == tag:
        os.kill(os.getpid(), signal.SIGKILL)
    final = root / tag
    replaced = root / STAGING / f"{tag}.replaced"
    if final.exists():  # saving the same step again (e.g. a resumed run that had already finished)
        shutil.rmtree(replaced, ignore_errors=True)
        os.rename(final, replaced)
    os.rename(staged, final)
    fsync_path(root)
    shutil.rmtree(replaced, ignore_errors=True)
    write_atomic(root / LATEST, tag)
    for old in published_tags(root)[keep:]:
        shutil.rmtree(root / old, ignore_errors=True)
