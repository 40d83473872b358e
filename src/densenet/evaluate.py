"""``densenet evaluate``: loss, top-1/top-5 accuracy, per-class accuracy and the confusion matrix.

The Python API is :func:`evaluate`; the command line loads weights with
:func:`densenet.weights.load_model`, the split with :func:`densenet.data.load_dataset`, prints a
report (or JSON) and writes ``confusion.json`` and ``confusion.png``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from densenet.errors import ConfigError, DataError, ResourceError
from densenet.runtime import AMP_DTYPES, autocast, resolve_device  # noqa: F401  (re-exported)


def fast_inference_model(model: torch.nn.Module, device: torch.device, amp: str = "none") -> torch.nn.Module:
    """The exact, faster inference equivalent of ``model`` where it is measured to help, else ``model``.

    On the CPU in float32 that is :func:`densenet.models.optimize_for_inference` (folded batch
    norms, one preallocated map per dense block, cache-sized chunks; same outputs to float32
    rounding; see docs/BENCHMARKS.md). Elsewhere (CUDA, autocast) the model itself, until measured.
    """
    from densenet.models import optimize_for_inference

    if torch.device(device).type == "cpu" and amp == "none":
        return optimize_for_inference(model)
    return model


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    dataset,
    *,
    batch_size: int = 500,
    tta: bool = False,
    device: str | torch.device | None = None,
    mean=None,
    std=None,
    amp: str = "none",
    channels_last: bool = True,
) -> dict:
    """Evaluate ``model`` on ``dataset`` (a :class:`densenet.data.Dataset`).

    Images are normalised with ``mean``/``std`` (default: ``model.meta``'s, else the dataset's).
    With ``tta`` the logits of each image and of its horizontal mirror are averaged. Returns a
    dict: ``num_samples``, ``loss`` (mean cross-entropy), ``top1``, ``top5`` (fractions),
    ``classes``, ``per_class`` (one dict per class: ``class``, ``total``, ``correct``,
    ``accuracy``) and ``confusion`` (rows: true class, columns: predicted; lists of ints).
    The model's training mode is restored afterwards.
    """
    from densenet.augment import Augmenter

    if batch_size < 1:
        raise ConfigError(f"batch size must be positive, got {batch_size}")
    if len(dataset) == 0:
        raise DataError(f"the {getattr(dataset, 'split', '')} split is empty".replace("  ", " "))
    meta = getattr(model, "meta", None) or {}
    mean = mean if mean is not None else meta.get("mean", dataset.mean)
    std = std if std is not None else meta.get("std", dataset.std)
    if device is None:
        device = next(model.parameters()).device
    device = resolve_device(device)
    normalise = Augmenter(mean, std, channels_last=channels_last)
    num_classes = len(dataset.classes)
    k = min(5, num_classes)

    was_training = model.training
    model.eval()
    runner = fast_inference_model(model, device, amp)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    top1 = torch.zeros((), dtype=torch.long, device=device)
    top5 = torch.zeros((), dtype=torch.long, device=device)
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.long, device=device)
    try:
        for start in range(0, len(dataset), batch_size):
            images = dataset.images[start : start + batch_size].to(device, non_blocking=True)
            labels = dataset.labels[start : start + batch_size].to(device, non_blocking=True)
            x = normalise(images, train=False)
            with autocast(device, amp):
                logits = runner(x).float()
                if tta:
                    logits = 0.5 * (logits + runner(x.flip(3)).float())
            if logits.shape[1] != num_classes:
                raise ConfigError(
                    f"the model has {logits.shape[1]} outputs but the data has {num_classes} classes"
                )
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").double()
            ranked = logits.topk(k, dim=1).indices
            hits = ranked == labels[:, None]
            top1 += hits[:, 0].sum()
            top5 += hits.any(dim=1).sum()
            confusion += torch.bincount(labels * num_classes + ranked[:, 0], minlength=num_classes**2)
    finally:
        model.train(was_training)

    n = len(dataset)
    matrix = confusion.view(num_classes, num_classes).cpu()
    totals = matrix.sum(dim=1).tolist()
    correct = matrix.diagonal().tolist()
    return {
        "num_samples": n,
        "loss": float(loss_sum) / n,
        "top1": int(top1) / n,
        "top5": int(top5) / n,
        "tta": bool(tta),
        "classes": list(dataset.classes),
        "per_class": [
            {"class": c, "total": t, "correct": r, "accuracy": (r / t if t else None)}
            for c, t, r in zip(dataset.classes, totals, correct)
        ],
        "confusion": matrix.tolist(),
    }


def align_classes(dataset, classes: list[str]):
    """``dataset`` with labels renumbered to the model's class order; other class sets are an error."""
    if list(dataset.classes) == list(classes):
        return dataset
    if sorted(dataset.classes) != sorted(classes):
        only_data = sorted(set(dataset.classes) - set(classes))[:3]
        only_model = sorted(set(classes) - set(dataset.classes))[:3]
        raise DataError(
            f"the data's classes do not match the model's ({len(dataset.classes)} vs {len(classes)}; "
            f"only in the data: {only_data}, only in the model: {only_model})"
        )
    index = {c: i for i, c in enumerate(classes)}
    mapping = torch.tensor([index[c] for c in dataset.classes], dtype=torch.long)
    return dataclasses.replace(dataset, labels=mapping[dataset.labels], classes=list(classes))


# --- command line -----------------------------------------------------------------------------


def add_arguments(parser) -> None:
    parser.add_argument(
        "--weights", "--weights-dir", dest="weights", required=True, metavar="PATH",
        help="weights directory, model.safetensors, checkpoint (.pt), run directory, or .onnx (ONNX Runtime)",
    )
    parser.add_argument("--data-dir", default=None, help="dataset directory (default: $DENSENET_DATA, else ./data)")
    parser.add_argument("--split", choices=("test", "val"), default="test",
                        help="test set, or the validation hold-out the model was trained with")
    parser.add_argument("--tta", action="store_true", help="average the predictions of each image and its mirror")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    parser.add_argument("--amp", choices=tuple(AMP_DTYPES), default="none", help="autocast precision")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="where confusion.json and confusion.png go (default: beside the weights; NAME-evaluation/ here for a shipped model)")


def run(args) -> int:
    from densenet.data import load_dataset
    from densenet.plots import plot_confusion
    from densenet.weights import atomic_write_text, load_model

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
    result = evaluate(model, dataset, batch_size=args.batch_size, tta=args.tta, device=device, amp=args.amp)
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
    try:
        atomic_write_text(out / "confusion.json", json.dumps(result, indent=2) + "\n")
        plot_confusion(
            result["confusion"], result["classes"], out / "confusion.png",
            title=f"{meta['config'].get('name') or 'model'} on {dataset.name} {args.split} "
                  f"(top-1 {100 * result['top1']:.2f}%)",
        )
    except OSError as exc:
        raise ResourceError(f"cannot write the confusion matrix to {out}: {exc.strerror or exc} (use --out DIR)") from None
    result["files"] = [str(out / "confusion.json"), str(out / "confusion.png")]

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
        + (" (flip TTA)" if result.get("tta") else ""),
        f"loss   {result['loss']:.4f}",
        f"top-1  {100 * result['top1']:.2f}%",
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
