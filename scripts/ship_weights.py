"""Put trained weights into the package as a shipped model: fp16 safetensors + model.json with a card.

    python scripts/ship_weights.py runs/cpu30-weights densenet-cpu-s-30m \\
        --run-dir runs/cpu30 --data-dir ../shared/data/cifar10-jpeg \\
        --command "densenet train --recipe cpu-30m ..." --machine "2-core AMD EPYC (AVX-512), torch 2.13.0"

The weights are stored as fp16 (half the size); the card's accuracy is measured here on the full
test set by loading the shipped files back exactly as ``densenet evaluate --weights NAME`` does,
so that command reproduces it. The card also records the run's per-epoch test accuracy and wall
time (from the run directory's metrics.csv and model.json), and README.md beside the weights
is the same card for people.

    python scripts/ship_weights.py - densenet-cpu-s-30m --recard --data-dir ../shared/data/cifar10-jpeg

measures a shipped model's accuracies again (e.g. after a new kind of test-time augmentation is
added to the card) and rewrites its card, the weights unchanged; with ``--command`` it also
replaces the card's training command (when a recipe has changed since the run, so that the
command still trains what ships).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import torch

from densenet.data import load_dataset
from densenet.errors import ConfigError
from densenet.inference import evaluate
from densenet.pretrained import PRETRAINED_DIR
from densenet.registry import create_model
from densenet.weights import load_model, save_model


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("weights", help="the trained weights (a weights dir or run dir); with --recard, unused (-)")
    p.add_argument("name", help="the name users will load it by")
    p.add_argument("--data-dir", required=True, help="CIFAR-10 to measure the card's accuracy on")
    p.add_argument("--recard", action="store_true",
                   help="only measure the shipped model NAME's accuracies again and rewrite its card")
    p.add_argument("--run-dir", help="the training run directory (metrics.csv, config.json)")
    p.add_argument("--command", help="the exact training command (with --recard: a new one for the card)")
    p.add_argument("--machine", help="the machine it was trained on, in words")
    p.add_argument("--load", default="", help="the machine's load average during training, in words")
    p.add_argument("--arch-name", help="the registered name of the trained architecture, when the run built it "
                   "as another model with --model-kwargs (checked to be the same architecture)")
    p.add_argument("--process-seconds", type=float,
                   help="wall time of the whole densenet train process (/usr/bin/time), start-up included")
    args = p.parse_args()
    if args.recard:
        return recard(args.name, args.data_dir, args.command)
    missing = [f"--{k.replace('_', '-')}" for k in ("run_dir", "command", "machine", "process_seconds")
               if getattr(args, k) is None]
    if missing:
        p.error(f"shipping new weights needs {', '.join(missing)}")

    model, meta = load_model(args.weights)
    if args.arch_name:
        try:
            options = {k: model.config[k] for k in ("num_classes", "activation", "transition_pool", "drop_rate")}
            registered = create_model(args.arch_name, **options).config
        except ConfigError as e:
            p.error(f"--arch-name: {e}")
        if json.dumps({**model.config, "name": args.arch_name}, sort_keys=True) != json.dumps(registered, sort_keys=True):
            p.error(f"--arch-name {args.arch_name}: the trained model is not that architecture")
        model.config["name"] = args.arch_name
    run = Path(args.run_dir)
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    config = json.loads((run / "config.json").read_text())
    training = meta.get("training", {})
    out = PRETRAINED_DIR / args.name
    out.mkdir(parents=True, exist_ok=True)

    card = {
        "name": args.name,
        "recipe": training.get("recipe"),
        "command": args.command,
        "epochs": training.get("epochs_completed"),
        "fitted_epochs": training.get("fitted_epochs"),  # --fit-epochs: the last epoch may end early
        "wall_seconds": round(args.process_seconds, 1),
        "training_loop_seconds": round(float(training.get("wall_seconds") or 0.0), 1),
        "test_acc_per_epoch": [None if not r.get("test_acc") else round(float(r["test_acc"]), 4) for r in rows],
        "elapsed_seconds_per_epoch": [round(float(r["elapsed_seconds"]), 1) for r in rows],
        "images_per_second": round(sum(float(r["images_per_second"]) for r in rows) / max(len(rows), 1), 1),
        "parameters": sum(p.numel() for p in model.parameters()),
        "machine": args.machine,
        "load": args.load,
        "torch": torch.__version__,
        "tta_in_training": bool(config["config"].get("tta")),
        "final_tta_in_training": bool(config["config"].get("final_tta")),
        "tta_translate_in_training": bool(config["config"].get("tta_translate")),
        "dataset": "CIFAR-10 (JPEG copy): the 10,000 test images",
        "weights_dtype": "float16",
    }
    half = model.half()
    save_model(out, half, {**meta, "card": card})
    # measure what users will load: the fp16 file, read back as densenet evaluate reads it
    measure_and_write(out, half, meta, card, args.data_dir)
    return 0


def measure_and_write(out: Path, half: torch.nn.Module, meta: dict, card: dict, data_dir: str) -> None:
    """Measure the card's accuracies on the fp16 files in ``out`` as ``densenet evaluate --weights NAME``
    reads them (plain, flip TTA, 6-view flip and translation TTA), then write the card into
    model.json, the weights' header and README.md."""
    shipped, _ = load_model(out)
    test = load_dataset(data_dir, split="test")
    for suffix, options in (("", {}), ("_tta", dict(tta=True)), ("_tta_translate", dict(tta_translate=True))):
        top1 = float(evaluate(shipped, test, batch_size=500, **options)["top1"])
        card["test_acc" + suffix] = round(top1, 4)
        card["test_correct" + suffix] = int(round(top1 * len(test)))
    card["test_images"] = len(test)
    save_model(out, half, {**meta, "card": card})
    sha = json.loads((out / "model.json").read_text())["sha256"]
    (out / "README.md").write_text(render_card(card, sha))
    print(f"{card['name']}: {100 * card['test_acc']:.2f}% ({100 * card['test_acc_tta']:.2f}% with flip TTA, "
          f"{100 * card['test_acc_tta_translate']:.2f}% with 6 views) on {len(test)} test images; {out}")


def recard(name: str, data_dir: str, command: str | None = None) -> int:
    """Measure a shipped model's card accuracies again (after a new kind of evaluation is added),
    leaving its weights and the rest of its card (but for a new ``command``) as they are."""
    out = PRETRAINED_DIR / name
    model, meta = load_model(out)
    card = dict(meta["card"])
    if command:
        card["command"] = command
    measure_and_write(out, model.half(), meta, card, data_dir)
    return 0


def tta_note(card: dict) -> str:
    kind = "6-view TTA" if card.get("tta_translate_in_training") else "flip TTA"
    if card.get("tta_in_training"):
        return f", with {kind} as the run evaluated"
    return f", the last with {kind} as the run evaluated" if card.get("final_tta_in_training") else ""


def epochs_text(card: dict) -> str:
    """The epochs on a card: "5", or "5 (4.91 fitted: the last cut short)"."""
    fitted = card.get("fitted_epochs")
    if fitted and fitted != card["epochs"]:
        return f"{card['epochs']} ({fitted:.2f} fitted: the last cut short)"
    return str(card["epochs"])


def render_card(card: dict, sha256: str) -> str:
    per_epoch = ", ".join("-" if a is None else f"{100 * a:.2f}" for a in card["test_acc_per_epoch"])
    return f"""# {card['name']}

A DenseNet trained on the CPU by this project, shipped inside the package. Load it by name:
`densenet evaluate --weights {card['name']}`, `densenet predict --weights {card['name']} IMAGE`,
`densenet.load_model("{card['name']}")`, `torch.hub.load(".", "{card['name']}", source="local")`.

| | |
|---|---|
| test top-1 | **{100 * card['test_acc']:.2f}%** ({card['test_correct']:,} of {card['test_images']:,}): `densenet evaluate --weights {card['name']}` |
| with flip TTA | **{100 * card['test_acc_tta']:.2f}%** ({card['test_correct_tta']:,}): `densenet evaluate --weights {card['name']} --tta` |
| with 6-view TTA (flip and translation) | **{100 * card['test_acc_tta_translate']:.2f}%** ({card['test_correct_tta_translate']:,}): `densenet evaluate --weights {card['name']} --tta-translate` |
| data | {card['dataset']} |
| recipe | `{card['recipe']}` |
| command | `{card['command']}` |
| epochs | {epochs_text(card)} |
| training wall time | {card['wall_seconds']:.0f} s: the whole `densenet train` process, start-up, data loading and every evaluation included ({card['training_loop_seconds']:.0f} s from the first step to the final weights) |
| training images/s | {card['images_per_second']:.0f} (mean over epochs) |
| parameters | {card['parameters']:,} |
| machine | {card['machine']}; load {card['load'] or 'not recorded'} |
| torch | {card['torch']} |
| weights | float16 safetensors, SHA-256 `{sha256}` |

Test accuracy after each epoch (%{tta_note(card)}): {per_epoch}.
"""


if __name__ == "__main__":
    sys.exit(main())
