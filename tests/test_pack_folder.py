"""scripts/pack_folder.py: an image folder packed into one .npz comes back byte for byte."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "pack_folder.py"


def _run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    root = tmp_path / "src"
    for split, cls, n, quality in [("train", "cat", 3, 75), ("train", "dog", 2, 95), ("test", "cat", 2, 75)]:
        (root / split / cls).mkdir(parents=True)
        for i in range(n):
            pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / split / cls / f"{i:04d}.jpg", quality=quality)
    (root / "README.txt").write_bytes(b"not an image\n")
    return root


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_round_trip_is_exact_and_headers_are_shared(folder: Path, tmp_path: Path) -> None:
    pack = tmp_path / "pack.npz"
    done = _run("pack", folder, pack)
    assert done.returncode == 0, done.stderr
    # two JPEG qualities give two header tables, the text file the empty header: 3 in all
    assert "8 files, 3 distinct headers" in done.stdout
    with np.load(pack) as z:
        assert z["bodies"].size < sum(len(b) for b in _files(folder).values())
    done = _run("unpack", pack, tmp_path / "back")
    assert done.returncode == 0, done.stderr
    assert _files(tmp_path / "back") == _files(folder)


def test_a_damaged_pack_is_refused(folder: Path, tmp_path: Path) -> None:
    pack = tmp_path / "pack.npz"
    assert _run("pack", folder, pack).returncode == 0
    with np.load(pack) as z:
        arrays = dict(z)
    arrays["bodies"] = arrays["bodies"].copy()
    arrays["bodies"][5] ^= 0xFF
    np.savez(pack, **arrays)
    done = _run("unpack", pack, tmp_path / "back")
    assert done.returncode != 0
    assert "sha256 mismatch" in done.stderr
    assert not (tmp_path / "back").exists()


def test_a_missing_or_truncated_pack_is_a_one_line_error(folder: Path, tmp_path: Path) -> None:
    pack = tmp_path / "pack.npz"
    assert _run("pack", folder, pack).returncode == 0
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(pack.read_bytes()[:100])
    for bad in (tmp_path / "missing.npz", truncated):
        done = _run("unpack", bad, tmp_path / "back")
        assert done.returncode != 0
        assert done.stderr.startswith(f"error: cannot read {bad}") and "Traceback" not in done.stderr
    assert not (tmp_path / "back").exists()
