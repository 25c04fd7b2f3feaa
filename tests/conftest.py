"""Shared fixtures and the test tiers.

Unit tests (index math, brute-force references, EP equality on spawned gloo ranks) run in seconds. Modules that
start real training runs, launchers or several jobs carry `pytestmark = pytest.mark.slow`:
`python -m pytest -m "not slow"` is the quick loop (under 3 minutes on 2 cores); CI runs everything.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from support import ROOT


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def bundled_corpus_bytes() -> bytes:
    """The bundled Wikipedia fragment, decompressed (6 MB)."""
    from competesmoe.data.prepare import bundled_corpus, read_corpus

    return read_corpus(bundled_corpus())
