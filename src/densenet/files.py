"""Files written so that nothing is ever half-written: the bottom layer every command uses for output.

:func:`atomic_write_bytes` (and ``_text``) writes a temporary file in the target's directory,
flushes and syncs it, renames it over the target and syncs the directory, so readers (and a crash)
see either the old file or the new one. :func:`remove_stale_temporaries` clears what a killed
writer left behind in a directory this process owns. :func:`write_json_and_picture` writes a
command's result as ``NAME.json`` and ``NAME.png``.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from densenet.errors import ResourceError


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` so that readers see either the old or the new file, never half."""
    return _atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def _atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, _file_mode(path))
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.filename is None and exc.errno is not None:
            raise OSError(exc.errno, exc.strerror, str(path)) from exc  # name the file (disk full, ...)
        raise
    _fsync_dir(path.parent)
    return path


_TEMPORARY = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")  # what _atomic_write's mkstemp names look like


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Delete the temporary files of atomic writes that a killed process left in ``directory``.

    Only for a directory this process owns (a run directory): a live writer's file would go too.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    stale = [p for p in directory.iterdir() if _TEMPORARY.match(p.name) and p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def _file_mode(path: Path) -> int:
    """The target's current permissions, or those a new file gets (mkstemp's are owner-only)."""
    try:
        return path.stat().st_mode & 0o777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json_and_picture(folder: str | os.PathLike, name: str, data: Any, draw: Callable[[Path], object],
                           what: str) -> list[str]:
    """Write ``data`` as ``folder/name.json`` and ``draw(folder/name.png)``; return both paths.

    A write the machine refuses (read-only, disk full) is a :class:`ResourceError` naming ``what``.
    The JSON is written first: ``data`` does not yet list the files.
    """
    folder = Path(folder)
    json_path, png_path = folder / f"{name}.json", folder / f"{name}.png"
    try:
        atomic_write_text(json_path, json.dumps(data, indent=2) + "\n")
        draw(png_path)
    except OSError as exc:
        raise ResourceError(f"cannot write {what} to {folder}: {exc.strerror or exc} (use --out DIR)") from None
    return [str(json_path), str(png_path)]
