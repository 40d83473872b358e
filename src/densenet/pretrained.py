"""Trained weights shipped inside the package, usable by name wherever a weights path is accepted.

Each shipped model is a folder of ``src/densenet/pretrained/`` named after it, holding the usual
``model.safetensors`` (fp16 tensors) + ``model.json`` pair that ``densenet train`` writes, with a
``card`` entry in ``model.json``: the recipe, the exact command, epochs, test accuracy on the full
CIFAR-10 (JPEG copy) test set, training time, machine and the weights' SHA-256. ``README.md`` in
the same folder is the card for people.

:func:`resolve_weights` turns a name into its folder; a path that exists on disk always wins over
a shipped name, so a user's own ``./densenet-cpu-s-30m`` folder is never shadowed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from densenet.errors import WeightsError

PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained"


def pretrained_names() -> list[str]:
    """Names of the shipped models, sorted."""
    if not PRETRAINED_DIR.is_dir():
        return []
    return sorted(p.name for p in PRETRAINED_DIR.iterdir() if (p / "model.json").is_file())


def pretrained_card(name: str) -> dict:
    """The model card (``card`` of ``model.json``) of a shipped model."""
    path = PRETRAINED_DIR / name / "model.json"
    if name not in pretrained_names():
        raise WeightsError(f"no shipped model named {name!r}; shipped: {', '.join(pretrained_names()) or 'none'}")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise WeightsError(f"{path}: cannot read the model card ({exc})") from None
    card = meta.get("card")
    if not isinstance(card, dict):
        raise WeightsError(f"{path} has no model card")
    return card


def resolve_weights(path_or_name: str | os.PathLike) -> Path:
    """An existing path as given, else the folder of the shipped model of that name, else the path.

    A path that neither exists nor names a shipped model is returned unchanged, so that the
    loader's own "weights not found" message names it.
    """
    path = Path(path_or_name)
    if path.exists():
        return path
    name = str(path_or_name).strip().lower()
    if name in pretrained_names():
        return PRETRAINED_DIR / name
    return path
