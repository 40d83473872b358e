"""Pictures drawn with matplotlib's Agg backend: training curves, confusion matrices, feature-reuse
heat maps, model comparisons and sweeps.

Every ``plot_*`` function writes a PNG file (atomically) and returns its path; none opens a window.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

from densenet.files import atomic_write_bytes


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path, title: str = "", tight: bool = True) -> Path:
    """Title ``fig`` (when given), lay it out tightly (unless told not to), write it as PNG atomically."""
    if title:
        fig.suptitle(title)
    if tight:
        fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return atomic_write_bytes(path, buffer.getvalue())


def plot_curves(history: list[dict], path: str | os.PathLike, title: str = "") -> Path:
    """Loss and accuracy per epoch, train and test (and validation when present).

    ``history`` holds one dict per epoch with ``epoch``, ``train_loss``, ``train_acc`` and
    optionally ``test_loss``/``test_acc``/``val_loss``/``val_acc`` (accuracies as fractions);
    missing or None values are left out of the lines.
    """
    plt = _pyplot()
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    try:
        for split, style in (("train", "-"), ("val", "--"), ("test", "-")):
            for ax, key, scale in ((ax_loss, "loss", 1.0), (ax_acc, "acc", 100.0)):
                points = [
                    (row["epoch"], row[f"{split}_{key}"] * scale)
                    for row in history
                    if row.get(f"{split}_{key}") is not None
                ]
                if points:
                    xs, ys = zip(*points)
                    ax.plot(xs, ys, style, marker="o", markersize=3, label=split)
        ax_loss.set_title("loss")
        ax_acc.set_title("top-1 accuracy (%)")
        for ax in (ax_loss, ax_acc):
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend()
        return _save(fig, path, title)
    finally:
        plt.close(fig)


def plot_confusion(matrix, classes: list[str], path: str | os.PathLike, title: str = "") -> Path:
    """A confusion matrix (rows: true class, columns: predicted), coloured by row fraction.

    Cells show counts when there are at most 20 classes.
    """
    import numpy as np

    plt = _pyplot()
    counts = np.asarray(matrix, dtype=np.int64)
    totals = counts.sum(axis=1, keepdims=True)
    fractions = counts / np.maximum(totals, 1)
    n = len(classes)
    size = max(5.0, min(0.55 * n + 2, 24.0))
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    try:
        image = ax.imshow(fractions, cmap="Blues", vmin=0.0, vmax=1.0)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
        if n <= 20:
            ax.set_xticks(range(n), classes, rotation=45, ha="right")
            ax.set_yticks(range(n), classes)
            for i in range(n):
                for j in range(n):
                    colour = "white" if fractions[i, j] > 0.5 else "black"
                    ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=8, color=colour)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(title or "confusion matrix")
        return _save(fig, path)
    finally:
        plt.close(fig)


def plot_feature_reuse(data: dict, path: str | os.PathLike, title: str = "") -> Path:
    """Feature-reuse heat maps (the DenseNet paper's Figure 5), one panel per dense block.

    ``data`` is :func:`densenet.reuse.feature_reuse`'s result. Cell (source s, target l) is the
    normalised mean absolute weight l gives to s; the last column is the block's consumer (the
    next transition, or the classifier). Cells where l does not read s are left white.
    """
    import numpy as np

    plt = _pyplot()
    blocks = data["blocks"]
    fig, axes = plt.subplots(1, len(blocks), figsize=(4.2 * len(blocks) + 1.0, 4.4), squeeze=False)
    try:
        image = None
        for ax, block in zip(axes[0], blocks):
            matrix = np.array([[np.nan if v is None else v for v in row] for row in block["normalized"]], dtype=float)
            image = ax.imshow(np.ma.masked_invalid(matrix), cmap="viridis", vmin=0.0, vmax=1.0,
                              interpolation="nearest", aspect="auto")
            n = block["layers"]
            step = max(1, (n + 1) // 8)
            columns = list(range(0, n, step)) + [n]
            consumer = "T" if block["consumer"].startswith("transition") else "C"
            ax.set_xticks(columns, [str(c + 1) for c in columns[:-1]] + [consumer])
            rows = list(range(0, n + 1, step))
            ax.set_yticks(rows, [str(r) for r in rows])
            ax.axvline(n - 0.5, color="white", linewidth=2)
            ax.set_xlabel(f"target layer (l); {consumer} = {block['consumer']}")
            ax.set_ylabel("source layer (s); 0 = block input")
            ax.set_title(f"{block['block']} ({n} layer{'s' if n != 1 else ''})")
        fig.colorbar(image, ax=list(axes[0]), fraction=0.03, pad=0.02, label="normalised mean |weight|")
        return _save(fig, path, title or f"feature reuse: {data.get('model', '')}", tight=False)
    finally:
        plt.close(fig)


def plot_comparison(rows: list[dict], path: str | os.PathLike, title: str = "") -> Path:
    """Bar charts of ``densenet compare``'s rows: parameters, MACs, training memory, images/s, accuracy."""
    plt = _pyplot()
    panels = [("params", 1e-6, "parameters (M)"), ("macs", 1e-9, "MACs per image (G)"),
              ("train_memory_mb", 1.0, "training memory (MiB)"),
              ("train_images_per_second", 1.0, "training images/s"),
              ("infer_images_per_second", 1.0, "inference images/s")]
    if any(row.get("test_acc") is not None for row in rows):
        panels.append(("test_acc", 100.0, "test accuracy (%)"))
    names = [row["model"] for row in rows]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.0 * len(panels) + 1.5, 0.5 * len(rows) + 2.0),
                             sharey=True, squeeze=False)
    try:
        colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for ax, (key, scale, label) in zip(axes[0], panels):
            values = [0.0 if row.get(key) is None else row[key] * scale for row in rows]
            bars = ax.barh(range(len(rows)), values, color=[colours[i % len(colours)] for i in range(len(rows))])
            ax.bar_label(bars, labels=["-" if row.get(key) is None else (f"{v:,.0f}" if v >= 1000 else f"{v:.3g}")
                                       for row, v in zip(rows, values)], fontsize=8, padding=2)
            ax.set_title(label, fontsize=10)
            ax.margins(x=0.3)
            ax.grid(axis="x", alpha=0.3)
        axes[0][0].set_yticks(range(len(rows)), names)
        axes[0][0].invert_yaxis()
        return _save(fig, path, title)
    finally:
        plt.close(fig)


def plot_sweep(data: dict, path: str | os.PathLike, title: str = "") -> Path:
    """Test accuracy against parameters and against MACs for ``densenet sweep``'s rows.

    Each point is labelled with its value of the swept parameter; runs without an accuracy yet
    are left out.
    """
    plt = _pyplot()
    rows = [r for r in data["rows"] if r.get("final_test_acc") is not None]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    try:
        for ax, key, scale, label in ((axes[0], "params", 1e-6, "parameters (M)"),
                                      (axes[1], "macs", 1e-9, "MACs per image (G)")):
            xs = [r[key] * scale for r in rows]
            ys = [100 * r["final_test_acc"] for r in rows]
            ax.plot(xs, ys, "-o")
            for r, x, y in zip(rows, xs, ys):
                ax.annotate(f"{data['param']}={r['value']}", (x, y), textcoords="offset points", xytext=(4, 4),
                            fontsize=8)
            ax.set_xlabel(label)
            ax.set_ylabel("final test accuracy (%)")
            ax.grid(alpha=0.3)
            if not rows:
                ax.text(0.5, 0.5, "no finished runs yet", transform=ax.transAxes, ha="center")
        return _save(fig, path, title or f"sweep of {data['param']} ({data['model']})")
    finally:
        plt.close(fig)
