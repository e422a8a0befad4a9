"""The test suite's own layout: what tests share lives in ``tests/helpers/``, and no test module
imports another (a test module's names are its own, free to change with its tests)."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def _imported_test_modules(path: Path) -> set[str]:
    names = set()
    package = path.relative_to(TESTS.parent).parent.parts  # ("tests", "train") for tests/train/x.py
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            # a relative import (``from .test_x import y``, ``from . import test_x``) names its module
            # from the importer's package
            base = ".".join(package[: len(package) - node.level + 1]) if node.level else ""
            if node.module:
                names.add(".".join(part for part in (base, node.module) if part))
            else:
                names.update(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {n for n in names if n == "tests" or n.startswith("tests.")}


def test_test_modules_import_only_the_shared_helpers():
    offending = {
        f"{path.relative_to(TESTS)}: {name}"
        for path in TESTS.rglob("*.py")
        if "helpers" not in path.relative_to(TESTS).parts
        for name in _imported_test_modules(path)
        if not name.startswith("tests.helpers")
    }
    assert not offending, sorted(offending)
