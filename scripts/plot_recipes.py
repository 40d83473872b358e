"""Test accuracy against wall-clock minutes for measured training runs, one line per run.

    .venv/bin/python scripts/plot_recipes.py densenet-cpu-k96-10m densenet-cpu-m4-30m densenet-cpu-m4-90m --out docs/cpu_recipes.png

Each argument is a run directory or the name of a shipped model. A run directory gives its
metrics.csv (``elapsed_seconds`` is the wall time from the start of training to the end of that
epoch's evaluation) and config.json (the recipe, for the legend); a shipped model gives the same
figures from its model card.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from densenet.pretrained import pretrained_card, pretrained_names  # noqa: E402


def _tta_label(every: bool | None, final: bool | None, translate: bool | None = False) -> str:
    kind = "6-view TTA" if translate else "flip TTA"
    return f" ({kind})" if every else f" (last point with {kind})" if final else ""


def curve(run: str) -> tuple[str, float, list[float], list[float]]:
    """(recipe, with " (flip TTA)" when its evaluations used it (or only the last); mean training images/s; seconds at
    the end of each epoch's evaluation; test accuracy of each epoch)."""
    if not Path(run).is_dir() and run in pretrained_names():
        card = pretrained_card(run)
        tta = _tta_label(card.get("tta_in_training"), card.get("final_tta_in_training"),
                         card.get("tta_translate_in_training"))
        return (card["recipe"] + tta, card["images_per_second"], card["elapsed_seconds_per_epoch"],
                card["test_acc_per_epoch"])
    rows = [r for r in csv.DictReader((Path(run) / "metrics.csv").open()) if r.get("test_acc")]
    config = json.loads((Path(run) / "config.json").read_text())["config"]
    speed = sum(float(r["images_per_second"]) for r in rows) / max(len(rows), 1)
    tta = _tta_label(config.get("tta"), config.get("final_tta"), config.get("tta_translate"))
    return ((config.get("recipe") or Path(run).name) + tta, speed, [float(r["elapsed_seconds"]) for r in rows],
            [float(r["test_acc"]) for r in rows])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="run directories or shipped model names")
    p.add_argument("--out", required=True, help="PNG file")
    args = p.parse_args()
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for run in args.runs:
        recipe, speed, seconds, accuracies = curve(run)
        minutes = [0.0] + [s / 60 for s in seconds]
        accuracy = [10.0] + [100 * a for a in accuracies]
        label = f"{recipe}: {accuracy[-1]:.2f}% in {minutes[-1]:.1f} min, {len(seconds)} epochs at {speed:.0f} img/s"
        ax.plot(minutes, accuracy, marker="o", label=label)
    for target in (85, 90, 93):
        ax.axhline(target, color="grey", linewidth=0.6, linestyle=":")
    ax.set_xlabel("wall-clock minutes (training + evaluation, 2-core CPU)")
    ax.set_ylabel("test top-1 (%), CIFAR-10 JPEG copy")
    ax.set_ylim(40, 100)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    ax.set_title("densenet train on the CPU: accuracy against time")
    fig.tight_layout()
    fig.savefig(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
