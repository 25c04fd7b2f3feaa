"""The manifest, and the verification a checkpoint passes before anything of it is used.

A checkpoint verifies when its manifest is well formed and lists every file its layout needs, every listed
file has its recorded size and sha256, run_state.json is a complete record with a valid config, and every
`.pt` file loads weights-only (no code in it could run). Anything else is a CheckpointError naming the file.
"""

from __future__ import annotations

import json
import sys
import zipfile
from pathlib import Path, PurePosixPath

from competesmoe.common.errors import ConfigError, UserError
from competesmoe.common.files import fsync_path, sha256_file, write_atomic
from competesmoe.launcher.checkpoint import rng
from competesmoe.launcher.checkpoint.layout import MANIFEST, RUN_STATE, Checkpoint, CheckpointError, published_tags
from competesmoe.launcher.config import Config, config_from_dict
from competesmoe.parallel.deepspeed.safe_load import safe_load

RUN_STATE_FIELDS = {"step": int, "world_size": int, "ep_size": int, "zero_stage": int, "tokenizer": dict,
                    "config": dict}
"""What every run_state.json holds (optimizer_kind came later and is optional)."""


def write_manifest(tag_dir: Path) -> None:
    files = sorted(p for p in tag_dir.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {}
    for path in files:
        fsync_path(path)
        entries[str(path.relative_to(tag_dir))] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    write_atomic(tag_dir / MANIFEST, json.dumps({"files": entries}, indent=1))


def verify(tag_dir: Path) -> Checkpoint:
    """Check a checkpoint folder as the module docstring says; returns it with its run state."""
    listed = read_manifest(tag_dir)
    for name, expected in listed.items():
        check_file(tag_dir / name, expected)
    if RUN_STATE not in listed:
        raise CheckpointError(f"{tag_dir / MANIFEST} does not list {RUN_STATE}; the checkpoint is incomplete")
    saved = Checkpoint(tag_dir, *parse_run_state(read_text(tag_dir / RUN_STATE), tag_dir / RUN_STATE))
    missing = sorted(saved.required_files() - listed.keys())
    if missing:
        raise CheckpointError(f"{tag_dir / MANIFEST} does not list {', '.join(missing)}, which a checkpoint saved on "
                              f"{saved.describe_layout()} holds; the checkpoint is incomplete")
    for name in sorted(listed):
        if name.endswith(".pt"):
            check_loads_safely(tag_dir / name)
    return saved


def find_resumable(root: Path) -> Checkpoint | None:
    """The newest checkpoint under `root` that verifies; each newer one that does not gets one line on stderr."""
    for tag in published_tags(root):
        try:
            return verify(root / tag)
        except UserError as err:
            print(f"competesmoe: warning: skipping {tag}: {err}", file=sys.stderr, flush=True)
    return None


def read_manifest(tag_dir: Path) -> dict[str, dict]:
    """The manifest's {file name: {"bytes", "sha256"}}: a JSON object listing at least one file inside the folder."""
    path = tag_dir / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"checkpoint {tag_dir} has no {MANIFEST} (an unfinished save, or not a checkpoint)")
    try:
        files = json.loads(read_text(path)).get("files")
    except (TypeError, ValueError, AttributeError, RecursionError):
        files = None
    if not isinstance(files, dict) or not all(map(well_formed, files.values())):
        raise CheckpointError(f'{path} is not a checkpoint manifest (a JSON object {{"files": {{name: {{"bytes": '
                              f'size, "sha256": hex}}}}}}); the checkpoint is damaged')
    if not files:
        raise CheckpointError(f"{path} lists no files; the checkpoint is damaged")
    for name in files:
        parts = PurePosixPath(name).parts
        if PurePosixPath(name).is_absolute() or ".." in parts or not parts:
            raise CheckpointError(f"{path} lists {name!r}, which is not a file inside {tag_dir}; the checkpoint is "
                                  f"damaged")
    return files


def well_formed(entry) -> bool:
    return (isinstance(entry, dict) and isinstance(entry.get("bytes"), int) and not isinstance(entry["bytes"], bool)
            and isinstance(entry.get("sha256"), str))


def check_file(path: Path, expected: dict) -> None:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing")
    size = path.stat().st_size
    if size != expected["bytes"]:
        raise CheckpointError(f"checkpoint file {path} is truncated or changed ({size} of {expected['bytes']} bytes)")
    try:
        digest = sha256_file(path)
    except OSError as err:
        raise CheckpointError(f"checkpoint file {path} cannot be read ({err.strerror})") from None
    if digest != expected["sha256"]:
        raise CheckpointError(f"checkpoint file {path} is corrupt (sha256 mismatch)")


def parse_run_state(text: str | None, source: Path) -> tuple[dict, Config]:
    """(run state, its validated Config) from run_state.json's text (or an exported model's copy of it)."""
    try:
        run_state = json.loads(text)
    except (TypeError, ValueError, RecursionError):
        raise CheckpointError(f"{source} is not JSON; the checkpoint is damaged") from None
    return run_state, checked_config(run_state, source)


def read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return None


def checked_config(run_state, source: Path) -> Config:
    """The validated Config of a run state, after checking its fields' types."""
    if not isinstance(run_state, dict):
        raise CheckpointError(f"{source} is not a run state (a JSON object); the checkpoint is damaged")
    for field, kind in RUN_STATE_FIELDS.items():
        value = run_state.get(field)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise CheckpointError(f"{source}: {field} is missing or not a{'n' if kind is int else ''} "
                                  f"{kind.__name__}; the checkpoint is damaged")
    if run_state["world_size"] < 1 or run_state["ep_size"] < 1 or run_state["world_size"] % run_state["ep_size"]:
        raise CheckpointError(f"{source}: world_size {run_state['world_size']} is not a multiple of ep_size "
                              f"{run_state['ep_size']}; the checkpoint is damaged")
    if not isinstance(run_state["tokenizer"].get("vocab_size"), int):
        raise CheckpointError(f"{source}: tokenizer.vocab_size is missing; the checkpoint is damaged")
    try:  # the run's resume setting may name a folder that is gone; it plays no part here
        return config_from_dict({**run_state["config"], "resume": "none"})
    except ConfigError as err:
        raise CheckpointError(f"{source}: its config is not valid ({err})") from None


def check_loads_safely(path: Path) -> None:
    """Load a .pt weights-only (memory-mapped: the tensors are not read) so that one that would run code, or
    that torch cannot read, is refused before any rank loads it."""
    try:
        safe_load(path, map_location="cpu", extra_globals=rng.LEGACY_GLOBALS, mmap=zipfile.is_zipfile(path))
    except UserError as err:
        raise CheckpointError(str(err)) from None
    except Exception as err:  # noqa: BLE001 - whatever torch reports, the file is unusable
        reason = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise CheckpointError(f"checkpoint file {path} cannot be loaded ({reason[:160]})") from None
