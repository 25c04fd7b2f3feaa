"""Raw text files: which ones `data.inputs` names, how to open them, and their cheap fingerprint.

Compression is read from a file's first bytes (gzip, bzip2, zstd), its format from its name once a
.gz/.bz2/.zst suffix is dropped (.txt or .jsonl). The fingerprint of a file is its size, its mtime and the
sha256 of a few sampled blocks: enough to notice a corpus that changed since it was prepared without
reading it all (a preparation of terabytes must not be re-hashed at every start).
"""

from __future__ import annotations

import bz2
import glob
import gzip
import hashlib
import io
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

from competesmoe.common.errors import UserError

FORMATS = (".txt", ".jsonl")
COMPRESSED_SUFFIXES = (".gz", ".bz2", ".zst")
FINGERPRINT_BLOCK = 1 << 16
FINGERPRINT_BLOCKS = 3  # first, middle and last block of each file
HEAD_BYTES = 1 << 16  # how much check_readable decompresses
_MAGIC = ((b"BZh", "bz2"), (b"\x1f\x8b", "gzip"), (b"\x28\xb5\x2f\xfd", "zstd"))
DECOMPRESS_ERRORS = (OSError, EOFError, ValueError, zlib.error)


def compression(path: Path) -> str:
    """'bz2', 'gzip', 'zstd' or 'none', from the file's first bytes."""
    with open(path, "rb") as f:
        magic = f.read(4)
    return next((kind for prefix, kind in _MAGIC if magic.startswith(prefix)), "none")


def open_binary(path: Path, kind: str | None = None):
    """A binary stream of the file's decompressed bytes (readline works on it)."""
    kind = kind or compression(path)
    if kind == "bz2":
        return bz2.open(path, "rb")
    if kind == "gzip":
        return gzip.open(path, "rb")
    if kind == "zstd":
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), read_across_frames=True,
                                                                              closefd=True))
    return open(path, "rb")


@dataclass(frozen=True)
class InputFile:
    path: Path
    format: str  # ".txt" or ".jsonl"


def input_format(path: Path) -> str | None:
    """'.txt' or '.jsonl' for a supported name (after an optional compression suffix), else None."""
    name = path.name.lower()
    for suffix in COMPRESSED_SUFFIXES:
        if name.endswith(suffix):
            name = name[:-len(suffix)]
            break
    return next((fmt for fmt in FORMATS if name.endswith(fmt)), None)


def _supported(paths) -> list[Path]:
    return [p for p in paths if p.is_file() and input_format(p)]


def resolve_inputs(patterns: list[str]) -> list[InputFile]:
    """The files `data.inputs` names, in a fixed order (each entry's matches sorted; a file named twice counts once).

    A named file must be .txt/.jsonl (optionally compressed); directories are searched recursively and
    globs expanded (`**` recursive), both keeping the supported files. An entry that names nothing usable
    is refused with its index.
    """
    found: dict[Path, InputFile] = {}
    hint = "name .txt or .jsonl files (optionally .gz/.bz2/.zst), directories holding them, or globs"
    for i, pattern in enumerate(patterns):
        where = f"data.inputs[{i}] = {pattern!r}"
        path = Path(pattern).expanduser()
        if glob.has_magic(pattern):
            files = _supported(sorted(Path(p) for p in glob.glob(str(path), recursive=True)))
            if not files:
                raise UserError(f"{where} matches no .txt/.jsonl file; {hint}")
        elif path.is_dir():
            files = _supported(sorted(path.rglob("*")))
            if not files:
                raise UserError(f"{where} is a directory without .txt/.jsonl files; {hint}")
        elif path.exists():
            if not input_format(path):
                raise UserError(f"{where} is neither .txt nor .jsonl (nor a .gz/.bz2/.zst of one); {hint}")
            files = [path]
        else:
            raise UserError(f"{where} does not exist; {hint}")
        for f in files:
            resolved = f.resolve()
            found.setdefault(resolved, InputFile(resolved, input_format(f)))
    return list(found.values())


def check_readable(path: Path) -> str | None:
    """Why a file cannot be prepared (empty, unreadable, corrupt, no text), or None when it can."""
    try:
        if path.stat().st_size == 0:
            return "is empty"
        kind = compression(path)
        with open_binary(path, kind) as f:
            head = f.read(HEAD_BYTES)
    except PermissionError:
        return "is not readable (permission denied)"
    except DECOMPRESS_ERRORS as err:
        return f"could not be read as {kind} ({err})"
    if not head.strip():
        return "holds no text"
    return None


def fingerprint(path: Path) -> dict:
    """{path, size, mtime_ns, blocks}: blocks hashes the first, middle and last FINGERPRINT_BLOCK bytes."""
    st = os.stat(path)
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            last = max(0, st.st_size - FINGERPRINT_BLOCK)
            for k in range(FINGERPRINT_BLOCKS):
                f.seek(last * k // (FINGERPRINT_BLOCKS - 1))
                digest.update(f.read(FINGERPRINT_BLOCK))
        blocks = digest.hexdigest()
    except OSError as err:  # recorded as it is: a file skipped as unreadable must stay so
        blocks = f"unreadable: {err.strerror}"
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "blocks": blocks}


def fingerprint_difference(recorded: list[dict], paths: list[Path]) -> str | None:
    """What differs between the recorded fingerprints and the files now (first difference), or None."""
    now_paths = [str(p) for p in paths]
    was_paths = [r.get("path") for r in recorded]
    if now_paths != was_paths:
        added = sorted(set(now_paths) - set(was_paths))
        removed = sorted(set(was_paths) - set(now_paths))
        if added:
            return f"{added[0]} is new ({len(added)} file(s) added)"
        if removed:
            return f"{removed[0]} is gone ({len(removed)} file(s) removed)"
        return "the files are in another order"
    for was, path in zip(recorded, paths):
        try:
            now = fingerprint(path)
        except OSError as err:
            return f"{path} cannot be found ({err.strerror})"
        for key, what in (("size", "its size"), ("blocks", "its content"), ("mtime_ns", "its modification time")):
            if now[key] != was.get(key):
                return f"{path} changed ({what} differs)"
    return None
