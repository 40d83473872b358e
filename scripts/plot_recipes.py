"""Test accuracy against wall-clock minutes for measured training runs, one line per run.

    .venv/bin/python scripts/plot_recipes.py runs/quick runs/cpu30 --out docs/cpu_recipes.png

Reads each run directory's metrics.csv (``elapsed_seconds`` is the wall time from the start of
training to the end of that epoch's evaluation) and config.json (the recipe, for the legend).
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="run directories")
    p.add_argument("--out", required=True, help="PNG file")
    args = p.parse_args()
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for run in map(Path, args.runs):
        rows = [r for r in csv.DictReader((run / "metrics.csv").open()) if r.get("test_acc")]
        config = json.loads((run / "config.json").read_text())["config"]
        minutes = [0.0] + [float(r["elapsed_seconds"]) / 60 for r in rows]
        accuracy = [10.0] + [100 * float(r["test_acc"]) for r in rows]
        label = f"{config.get('recipe') or run.name}: {accuracy[-1]:.2f}% in {minutes[-1]:.1f} min"
        ax.plot(minutes, accuracy, marker="o", label=label)
    for target in (85, 90, 93):
        ax.axhline(target, color="grey", linewidth=0.6, linestyle=":")
    ax.set_xlabel("wall-clock minutes (training + evaluation, 2-core CPU)")
    ax.set_ylabel("test top-1 (%), CIFAR-10 JPEG copy")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title("densenet train on the CPU: accuracy against time")
    fig.tight_layout()
    fig.savefig(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
