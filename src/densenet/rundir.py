"""A training run's directory: its file names, in one place, and reading and writing them.

``densenet train`` writes (see docs/TRAINING.md, "Run directory"): ``config.json`` at the start;
``metrics.csv``, ``metrics.jsonl``, ``curves.png`` and ``checkpoint-last.pt`` every epoch;
``checkpoint-best.pt`` when the selected accuracy improves; ``model.safetensors`` + ``model.json``
at the end; ``tensorboard/`` with ``--tensorboard``. ``densenet evaluate --weights RUN`` adds
``confusion.json``. :class:`RunDir` names these files for train, report, sweep and compare;
:func:`read_run` gathers what a run recorded; :func:`find_resume_checkpoint` resolves ``--resume``.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from densenet.errors import ConfigError, ResourceError, WeightsError
from densenet.files import atomic_write_text, remove_stale_temporaries
from densenet.weights import CHECKPOINT_BEST, CHECKPOINT_LAST, META_FILE, WEIGHTS_FILE, load_checkpoint

__all__ = ["RunDir", "read_run", "find_resume_checkpoint", "default_out_dir"]


class _File:
    """A file of a run directory: ``RunDir(path).last`` is ``path / "checkpoint-last.pt"``."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, run: RunDir | None, owner: type) -> Path | _File:
        return self if run is None else run.path / self.name


class RunDir:
    """The files of one run directory (paths only; nothing is created until :meth:`create`)."""

    config = _File("config.json")  # every resolved setting, derived values, environment
    metrics_csv = _File("metrics.csv")  # one row per epoch
    metrics_jsonl = _File("metrics.jsonl")  # the same rows as JSON lines
    curves = _File("curves.png")
    last = _File(CHECKPOINT_LAST)  # every epoch and when a run stops
    best = _File(CHECKPOINT_BEST)  # when the selected accuracy improves
    weights = _File(WEIGHTS_FILE)  # the final weights ...
    meta = _File(META_FILE)  # ... and their description
    confusion = _File("confusion.json")  # written by densenet evaluate --weights RUN
    tensorboard = _File("tensorboard")  # with --tensorboard (no DIR)

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __str__(self) -> str:
        return str(self.path)

    def create(self) -> None:
        """Make the directory, and clear the temporary files a killed predecessor was writing."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ResourceError(f"cannot create the run directory {self.path}: {exc.strerror or exc}") from None
        remove_stale_temporaries(self.path)

    def write_config(self, info: dict[str, Any]) -> None:
        atomic_write_text(self.config, json.dumps(info, indent=2) + "\n")

    def write_metrics(self, history: list[dict]) -> None:
        """``metrics.jsonl`` and ``metrics.csv``: one row per epoch (atomically, every epoch)."""
        lines = "".join(json.dumps(row) + "\n" for row in history)
        atomic_write_text(self.metrics_jsonl, lines)
        columns: list[str] = []
        for row in history:
            columns.extend(k for k in row if k not in columns)
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for row in history:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
        atomic_write_text(self.metrics_csv, buffer.getvalue())


def default_out_dir(model: str) -> Path:
    """A new ``runs/<model>-<timestamp>`` directory name (not yet created)."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path = Path("runs") / f"{model}-{stamp}"
    n = 1
    while path.exists():
        n += 1
        path = Path("runs") / f"{model}-{stamp}-{n}"
    return path


def find_resume_checkpoint(resume: str | None, out_dir: str | None, model: str) -> Path | None:
    """The checkpoint a ``--resume`` value points at, or None to start afresh.

    ``auto``: ``out_dir/checkpoint-last.pt`` when ``out_dir`` is given; otherwise the newest
    ``runs/<model>-*/checkpoint-last.pt`` of an unfinished run; None when there is none. A path:
    a checkpoint file or a run directory, which must exist.
    """
    if not resume:
        return None
    if resume == "auto":
        if out_dir:
            candidate = RunDir(out_dir).last
            return candidate if candidate.is_file() else None
        candidates = sorted(Path("runs").glob(f"{model}-*/{CHECKPOINT_LAST}"), key=lambda p: p.stat().st_mtime)
        for path in reversed(candidates):
            try:
                if not load_checkpoint(path).get("finished"):
                    return path
            except WeightsError as exc:  # damaged: say so rather than silently resuming another run
                print(f"densenet train: warning: --resume auto skips {path.parent}: {exc}", file=sys.stderr)
                continue
        return None
    path = Path(resume)
    if path.is_dir():
        path = RunDir(path).last
    if not path.is_file():
        raise ConfigError(f"--resume: no checkpoint at {path}")
    return path


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None


def read_run(path: str | Path) -> dict[str, Any]:
    """What a run directory records, gathered into one dict.

    Keys: ``dir``, ``name``, ``settings`` (the training config), ``resolved``, ``environment``,
    ``history`` (one dict per epoch from ``metrics.jsonl``), ``meta`` (``model.json`` or None),
    ``model_config``, ``model_name``, ``final_test_acc``, ``final_test_views`` (the views of each test
    image it averaged: 1, 2 or 6; None for runs before it was recorded), ``best_acc``, ``best_epoch``,
    ``epochs_completed``, ``epochs``, ``finished``, ``stop_reason``, ``wall_seconds``,
    ``images_per_second`` (over all epochs), ``test_images`` (the test set training evaluated on),
    ``confusion`` (``confusion.json`` or None).
    """
    run = Path(path)
    if not run.is_dir():
        raise ConfigError(f"run directory not found: {run}")
    files = RunDir(run)
    config_file, meta_file, metrics_file = files.config, files.meta, files.metrics_jsonl
    if not config_file.is_file() and not meta_file.is_file():
        raise ConfigError(f"{run} is not a densenet train run directory (no config.json or model.json)")
    info = _read_json(config_file) if config_file.is_file() else {}
    meta = _read_json(meta_file) if meta_file.is_file() else None
    history = []
    if metrics_file.is_file():
        try:
            history = [json.loads(line) for line in metrics_file.read_text(encoding="utf-8").splitlines() if line]
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read {metrics_file}: {exc}") from None
    settings = info.get("config") or {}
    resolved = info.get("resolved") or {}
    training = (meta or {}).get("training") or {}
    model_config = (meta or {}).get("config") or resolved.get("model_config")
    tested = [row["test_acc"] for row in history if row.get("test_acc") is not None]
    final = training.get("final_test_acc", tested[-1] if tested else None)
    if tested and training.get("best_acc") is None:
        best = max(tested)
        best_epoch = next(row["epoch"] for row in history if row.get("test_acc") == best)
    else:
        best, best_epoch = training.get("best_acc"), training.get("best_epoch")
    seconds = sum(row.get("train_seconds") or 0.0 for row in history)
    images = sum((row.get("images_per_second") or 0.0) * (row.get("train_seconds") or 0.0) for row in history)
    confusion = _read_json(files.confusion) if files.confusion.is_file() else None
    return {
        "dir": str(run),
        "name": run.resolve().name,
        "settings": settings,
        "resolved": resolved,
        "environment": info.get("environment") or {},
        "history": history,
        "meta": meta,
        "model_config": model_config,
        "model_name": (model_config or {}).get("name") or settings.get("model") or run.name,
        "final_test_acc": final,
        "final_test_views": training.get("final_test_views"),
        "best_acc": best,
        "best_epoch": best_epoch,
        "epochs_completed": training.get("epochs_completed", len(history)),
        "epochs": settings.get("epochs", training.get("epochs")),
        "finished": training.get("finished", False),
        "stop_reason": training.get("stop_reason") or ("" if meta else "unfinished (no final weights)"),
        "wall_seconds": training.get("wall_seconds", history[-1].get("elapsed_seconds") if history else None),
        "images_per_second": images / seconds if seconds else None,
        "test_images": resolved.get("test_images"),
        "confusion": confusion,
    }
