"""The house's floors: imports only run downwards (common <- moe <- parallel <- launcher; data beside moe;
experiments on top, imported by nobody). Read from the source with ast, so nothing needs to be importable."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from support import ROOT

PACKAGES = ("common", "moe", "parallel", "data", "launcher", "experiments")
FORBIDDEN = {
    "common": {"moe", "parallel", "data", "launcher", "experiments"},
    "moe": {"parallel", "data", "launcher", "experiments"},
    "data": {"moe", "parallel", "launcher", "experiments"},
    "parallel": {"data", "launcher", "experiments"},
    "launcher": {"experiments"},
}
"""For each package, the packages it must not import (at module level or inside functions)."""


def imported_packages(path: Path) -> set[str]:
    """The competesmoe.<package> names a source file imports."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "competesmoe" and len(parts) > 1:
                found.add(parts[1])
    return found


def sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_only_run_downwards(package):
    wrong = {str(path.relative_to(ROOT)): sorted(imported_packages(path) & FORBIDDEN[package])
             for path in sources(package)}
    assert not {path: pkgs for path, pkgs in wrong.items() if pkgs}


def test_the_checker_sees_an_upward_import(tmp_path):
    upward = tmp_path / "bad.py"
    upward.write_text("def f():\n    from competesmoe.launcher.config import Config\n")
    assert imported_packages(upward) == {"launcher"}


def test_every_package_folder_is_checked():
    on_disk = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    assert on_disk - {"configs"} <= set(PACKAGES), on_disk
