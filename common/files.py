"""File helpers shared by data preparation, checkpoints and the commands' output folders: content hashes, atomic
writes, folders claimed before anything is written into them."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from competesmoe.common.errors import UserError


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes, read in chunks (constant memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def fsync_path(path: str | Path) -> None:
    """Flush a file's (or a directory's) data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | Path, text: str) -> None:
    """Replace `path` with `text` so a reader sees the old content or the new, never a part."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    fsync_path(tmp)
    os.replace(tmp, path)


def claim_folder(folder: str | Path, marker: str, setting: str, made_by_us=lambda folder: False) -> Path:
    """Make `folder` one that only the command writing `marker` writes into, or refuse: it may be new, empty, hold
    the marker (we claimed it before) or be one `made_by_us(folder)` recognises (written before there were markers);
    anything else holds someone else's files, and UserError names `setting` (the option or config field that chose
    the folder) and the first of those files. The folder is created and the marker left in it."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{setting}: {folder} exists and is not a folder; set {setting} to a new or empty folder")
    if folder.is_dir():
        foreign = sorted(p.name for p in folder.iterdir())  # listed once: a concurrent claim may add the marker
        if foreign and marker not in foreign and not made_by_us(folder):
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise UserError(f"{setting}: {folder} already holds files this command did not write ({shown}); nothing "
                            f"was written: set {setting} to a new or empty folder")
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / marker).exists():  # created once: a finished folder's files keep their times
        (folder / marker).touch()
    return folder
