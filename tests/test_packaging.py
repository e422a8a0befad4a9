"""What ``pip install`` puts into site-packages: the library only. The training loop (``train/``)
runs from a checkout (``python -m train`` from the repository root), so no generic top-level name
such as ``train`` can shadow, or be shadowed by, a user's own module."""

from __future__ import annotations

from pathlib import Path

import pytest
import setuptools

REPO = Path(__file__).resolve().parent.parent


def test_only_the_lowmem_optim_package_is_installed():
    tomllib = pytest.importorskip("tomllib")
    find = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    packages = setuptools.find_packages(str(REPO), include=find["include"], exclude=find.get("exclude", ()))
    assert "lowmem_optim" in packages and "lowmem_optim.projection" in packages
    assert {name.split(".")[0] for name in packages} == {"lowmem_optim"}, packages
