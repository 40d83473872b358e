"""Shared test helpers: small synthetic image-folder datasets and the reliability summary file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

COLOURS = {"blue": (30, 30, 200), "green": (30, 200, 30), "red": (200, 30, 30)}


def coloured_image_folder(root: Path, per_class: tuple[int, int], seed: int = 0) -> Path:
    """Class-coloured noise images (32x32 PNG) in train/<class>/ and test/<class>/, classes blue/green/red.

    ``per_class`` is (train, test) images per class; each image is noise plus its class colour at a
    random strength, so a small network learns the classes in a few epochs.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in zip(("train", "test"), per_class):
        for name, colour in COLOURS.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 90, (32, 32, 3)) + np.array(colour) * rng.uniform(0.4, 1.0)
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i:04d}.png")
    return root


def channel_image_folder(root: Path, per_class: tuple[int, int], names: tuple[str, str, str]) -> Path:
    """Noise images (32x32 PNG) whose class c brightens colour channel c, in train|test/<name>/<i>.png."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in zip(("train", "test"), per_class):
        for c, name in enumerate(names):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 60, (32, 32, 3)) + 90 * np.eye(3, dtype=np.int64)[c]
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")
    return root


def add_to_reliability_summary(section: str, data: dict) -> None:
    """Merge ``data`` into ``section`` of the JSON file named by $DENSENET_RELIABILITY_JSON, if set."""
    path = os.environ.get("DENSENET_RELIABILITY_JSON")
    if not path:
        return
    path = Path(path)
    summary = json.loads(path.read_text()) if path.is_file() else {}
    summary.setdefault(section, {}).update(data)
    path.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
