"""Fixtures shared by the test modules (plain helpers live in tests/helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from densenet.trainer import SIGTERM_AFTER_STEP_ENV


@pytest.fixture
def isolated_run(tmp_path, monkeypatch) -> Path:
    """A test that trains: its own decoded-image cache, no SIGTERM test hook set from outside, and
    ``tmp_path`` as the working directory (so default ``runs/`` folders land there)."""
    monkeypatch.setenv("DENSENET_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(SIGTERM_AFTER_STEP_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="module")
def module_cache(tmp_path_factory):
    """$DENSENET_CACHE in a folder of the module's own while its module-scoped fixtures train."""
    patch = pytest.MonkeyPatch()
    path = tmp_path_factory.mktemp("cache")
    patch.setenv("DENSENET_CACHE", str(path))
    yield path
    patch.undo()
