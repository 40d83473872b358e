"""``densenet evaluate``: loss, top-1/top-5 accuracy, per-class accuracy and the confusion matrix.

The Python API is :func:`densenet.inference.evaluate`; the command line loads weights with
:func:`densenet.weights.load_model`, the split with :func:`densenet.data.load_dataset`, prints a
report (or JSON) and writes ``confusion.json`` and ``confusion.png``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from densenet.data import load_dataset
from densenet.errors import ConfigError
from densenet.files import write_json_and_picture
from densenet.inference import align_classes, evaluate
from densenet.plots import plot_confusion
from densenet.runtime import AMP_DTYPES, resolve_device
from densenet.weights import load_model


def add_arguments(parser) -> None:
    parser.add_argument(
        "--weights", "--weights-dir", dest="weights", required=True, metavar="PATH",
        help="weights directory, model.safetensors, checkpoint (.pt), run directory, or .onnx (ONNX Runtime)",
    )
    parser.add_argument("--data-dir", default=None, help="dataset directory (default: $DENSENET_DATA, else ./data)")
    parser.add_argument("--split", choices=("test", "val"), default="test",
                        help="test set, or the validation hold-out the model was trained with")
    parser.add_argument("--tta", action="store_true", help="average the predictions of each image and its mirror")
    parser.add_argument("--tta-translate", action="store_true",
                        help="6-view TTA: the mirror pair plus the mirror pairs of the image moved one pixel "
                        "down-right and one up-left (implies --tta)")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    parser.add_argument("--amp", choices=tuple(AMP_DTYPES), default="none", help="autocast precision")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="where confusion.json and confusion.png go (default: beside the weights; NAME-evaluation/ here for a shipped model)")


def run(args) -> int:
    device = resolve_device(args.device)
    model, meta = load_model(args.weights, device=device)
    training = meta.get("training") or {}
    val_split = int(training.get("val_split") or 0)
    if args.split == "val" and val_split == 0:
        raise ConfigError("these weights were trained without a validation hold-out (--val-split); use --split test")
    dataset = load_dataset(
        args.data_dir,
        name=training.get("dataset", "cifar10"),
        split=args.split,
        val_split=val_split,
        seed=int(training.get("seed", 0)),
        image_size=int(meta.get("input_size", 32)),
    )
    dataset = align_classes(dataset, meta["classes"])
    result = evaluate(model, dataset, batch_size=args.batch_size, tta=args.tta, tta_translate=args.tta_translate, device=device, amp=args.amp)
    result["weights"] = str(args.weights)
    result["split"] = args.split
    result["data"] = str(dataset.root)

    weights_path = Path(args.weights)
    if args.out:
        out = Path(args.out)
    elif not weights_path.exists():  # a model shipped with the package: not into the package
        out = Path(f"{weights_path.name}-evaluation")
    else:
        out = weights_path if weights_path.is_dir() else weights_path.parent
    title = (f"{meta['config'].get('name') or 'model'} on {dataset.name} {args.split} "
             f"(top-1 {100 * result['top1']:.2f}%)")
    result["files"] = write_json_and_picture(
        out, "confusion", result, lambda png: plot_confusion(result["confusion"], result["classes"], png, title=title),
        "the confusion matrix")

    if args.json:
        json.dump(result, sys.stdout, indent=2)
        print()
    else:
        print(format_report(result))
    return 0


def format_report(result: dict) -> str:
    """A human-readable summary: totals, then one line per class."""
    lines = [
        f"{result.get('split', 'split')}: {result['num_samples']} images"
        + (" (6-view flip and translation TTA)" if result.get("tta_translate")
           else " (flip TTA)" if result.get("tta") else ""),
        f"loss   {result['loss']:.4f}",
        f"top-1  {100 * result['top1']:.2f}%"
        + (f" (single view {100 * result['single_view_top1']:.2f}%)" if result.get("tta") else ""),
        f"top-5  {100 * result['top5']:.2f}%",
        "",
        f"{'class':<16} {'correct':>8} {'total':>7} {'accuracy':>9}",
    ]
    for row in result["per_class"]:
        acc = "-" if row["accuracy"] is None else f"{100 * row['accuracy']:.2f}%"
        lines.append(f"{row['class']:<16} {row['correct']:>8} {row['total']:>7} {acc:>9}")
    for file in result.get("files", []):
        lines.append(f"wrote {file}")
    return "\n".join(lines)
