"""A prepared data directory's `meta.json`: what `prepare` made (source, tokenizer, splits), read in one place.

`prepare` writes it last, so a directory without it is never mistaken for a finished preparation.
"""

from __future__ import annotations

import json
from pathlib import Path

from competesmoe.common.errors import UserError

META_FILE = "meta.json"
DOCUMENTS = "text_document"  # the dataset prefix of a preparation from data.inputs (Megatron's naming)


def is_documents(meta: dict) -> bool:
    """A preparation from data.inputs (one dataset of documents), not a 90/5/5 split of data.path."""
    return "datasets" in meta


def read_meta(prepared_dir: str | Path) -> dict | None:
    """The meta.json of `prepared_dir`, or None where there is none; UserError if it is not a JSON mapping."""
    path = Path(prepared_dir) / META_FILE
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        raise UserError(f"{path} is unreadable or not JSON; delete {prepared_dir} and prepare again, or set "
                        f"data.prepared_dir to another directory") from None
    if not isinstance(meta, dict):
        raise UserError(f"{path} is not a data preparation's meta.json; set data.prepared_dir to another directory")
    return meta


def load_meta(prepared_dir: str | Path) -> dict:
    """The meta.json of a finished preparation; UserError naming the directory where there is none."""
    meta = read_meta(prepared_dir)
    if meta is None:
        raise UserError(f"{Path(prepared_dir) / META_FILE} does not exist: {prepared_dir} is not a finished data "
                        f"preparation; run the prepare step first (data.prepared_dir)")
    return meta


def corpus_name(prepared_dir: str | Path) -> str:
    """The file name of the corpus a preparation was made from (for messages), else the directory."""
    try:
        meta = load_meta(prepared_dir)
        return str(prepared_dir) if is_documents(meta) else Path(meta["source"]["path"]).name
    except (UserError, KeyError, TypeError):
        return str(prepared_dir)
