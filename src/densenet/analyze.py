"""``densenet analyze``: a model's make-up by name, the registry, the shipped models, trained weights.

``densenet analyze MODEL`` prints :func:`densenet.analysis.analyze_model`'s table (built on the
``meta`` device: nothing allocated); ``--list`` the registered names and the models shipped in the
package; ``--weights PATH|NAME`` analyses trained weights, and with ``--feature-reuse`` writes the
paper's Figure 5 maps (:func:`densenet.reuse.feature_reuse`) as JSON and PNG.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from densenet.analysis import analyze_model, format_analysis
from densenet.errors import ConfigError
from densenet.files import write_json_and_picture
from densenet.plots import plot_feature_reuse
from densenet.pretrained import pretrained_card, pretrained_names
from densenet.registry import create_model, describe_models
from densenet.reuse import feature_reuse, format_feature_reuse
from densenet.weights import load_model


def format_model_list(rows: list[dict[str, Any]]) -> str:
    """The registry as a table: name, parameters, classes, stem, description."""
    lines = [f"{'model':<22}{'params':>13}{'classes':>9}  {'stem':<10}description"]
    for row in rows:
        lines.append(f"{row['name']:<22}{row['params']:>13,}{row['num_classes'] or '-':>9}  "
                     f"{row['stem'] or '-':<10}{row['description']}")
    lines.append("Also: densenet-bc-L-k (L = 6n+4) and densenet-L-k (L = 3n+4) for any depth L and growth rate k.")
    shipped = pretrained_names()
    if shipped:
        lines += ["", "Trained weights shipped with the package (--weights NAME in predict, evaluate, export, analyze):",
                  f"{'name':<22}{'test top-1':>11}{'flip TTA':>10}{'6 views':>9}{'epochs':>8}{'train time':>12}"
                  "  recipe, machine"]
        for name in shipped:
            card = pretrained_card(name)
            six = card.get("test_acc_tta_translate")
            lines.append(f"{name:<22}{100 * card['test_acc']:>10.2f}%{100 * card['test_acc_tta']:>9.2f}%"
                         + (f"{100 * six:>8.2f}%" if six is not None else f"{'-':>9}")
                         + f"{round(card.get('fitted_epochs') or card['epochs'], 2):>8g}"
                         f"{card['wall_seconds'] / 60:>9.1f} min  {card['recipe']}, "
                         f"{card['machine']}")
    return "\n".join(lines)



def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", metavar="MODEL",
                        help="model name (see --list); without it the models are listed")
    parser.add_argument("--num-classes", type=int, default=None, metavar="N",
                        help="classifier outputs (default: the model's own, 10 or 1000)")
    parser.add_argument("--input-size", type=int, default=None, metavar="S",
                        help="square input side in pixels (default: 32 for CIFAR-stem models, 224 otherwise)")
    parser.add_argument("--json", action="store_true", help="print the same data as JSON")
    parser.add_argument("--list", action="store_true", help="list the registered models with parameter counts")
    parser.add_argument("--weights", default=None, metavar="PATH",
                        help="analyse trained weights (weights or run directory, .safetensors, checkpoint) instead of MODEL")
    parser.add_argument("--feature-reuse", action="store_true",
                        help="with --weights: per-block feature-reuse heat maps (paper's Figure 5), PNG + JSON")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="where feature_reuse.json/.png go (default: beside the weights)")


def run(args: argparse.Namespace) -> int:
    if getattr(args, "weights", None) or getattr(args, "feature_reuse", False):
        return _analyze_weights(args)
    if args.list or not args.model:
        rows = describe_models()
        print(json.dumps(rows, indent=2) if args.json else format_model_list(rows))
        return 0
    if args.num_classes is not None and args.num_classes < 1:
        raise ConfigError(f"--num-classes must be at least 1, got {args.num_classes}")
    if args.input_size is not None and args.input_size < 1:
        raise ConfigError(f"--input-size must be positive, got {args.input_size}")
    with torch.device("meta"):  # shapes and counts only: no weights allocated, nothing computed
        model = create_model(args.model, num_classes=args.num_classes)
    data = analyze_model(model, args.input_size)
    print(json.dumps(data, indent=2) if args.json else format_analysis(data))
    return 0


def _analyze_weights(args: argparse.Namespace) -> int:
    """``densenet analyze`` with ``--weights``: the trained model's analysis, or its feature-reuse maps."""
    if not args.weights:
        raise ConfigError("--feature-reuse needs trained weights: add --weights PATH")
    if args.model:
        raise ConfigError("give either a MODEL name or --weights, not both")
    if Path(args.weights).suffix == ".onnx":
        raise ConfigError("--weights for analyze must be PyTorch weights (a weights or run directory, "
                          ".safetensors or checkpoint), not ONNX")
    model, _meta = load_model(args.weights)
    if not args.feature_reuse:
        data = analyze_model(model, args.input_size)
        print(json.dumps(data, indent=2) if args.json else format_analysis(data))
        return 0

    data = feature_reuse(model)
    data["weights"] = str(args.weights)
    weights = Path(args.weights)
    out = Path(args.out) if args.out else (weights if weights.is_dir() else weights.parent)
    data["files"] = write_json_and_picture(out, "feature_reuse", data, lambda png: plot_feature_reuse(data, png),
                                           "the feature-reuse map")
    written = "".join(f"\nwrote {file}" for file in data["files"])
    print(json.dumps(data, indent=2) if args.json else format_feature_reuse(data) + written)
    return 0
