"""Feature reuse inside the dense blocks of a trained DenseNet (Huang et al. 2017, Figure 5).

Layer l of a dense block reads the concatenation [x_0, x_1, ..., x_{l-1}] of the block's input
x_0 and the outputs of the l-1 layers before it. Its first convolution (the 1x1 bottleneck, or
the 3x3 of a basic layer) therefore has one slice of input channels per source s. The strength
of the connection s -> l is the mean absolute weight of that slice (over output channels, the
slice's input channels and the kernel), normalised per target layer by dividing by the largest
value over that layer's sources, so that every column has a 1.

The block's output (all L+1 sources) is read by the next transition's 1x1 convolution, or, for
the last block, by the classifier (which sees norm5 of those channels after pooling); that
consumer is the last column of each map. Batch-norm scales in front of the convolutions are not
folded in: the map shows the convolution weights, as in the paper.

``densenet analyze --weights PATH --feature-reuse [--out DIR]`` (:mod:`densenet.analyze`) writes
``feature_reuse.json`` and ``feature_reuse.png``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from densenet.errors import ConfigError

__all__ = ["feature_reuse", "format_feature_reuse"]


def _mean_abs(weight: torch.Tensor, start: int, stop: int) -> float:
    """Mean absolute value of ``weight[:, start:stop]`` (conv or linear weight)."""
    return float(weight[:, start:stop].detach().abs().double().mean())


def _normalise(column: list[float | None]) -> list[float | None]:
    top = max((v for v in column if v is not None), default=0.0)
    return [None if v is None else (v / top if top > 0 else 0.0) for v in column]


def _block_reuse(name: str, block: nn.Module, consumer_name: str, consumer_weight: torch.Tensor) -> dict[str, Any]:
    layers = list(block.children())
    c0 = layers[0].conv1.in_channels
    growth = (layers[0].conv2 if getattr(layers[0], "bottleneck", False) else layers[0].conv1).out_channels
    n = len(layers)
    # source s covers input channels [bounds[s], bounds[s + 1])
    bounds = [0] + [c0 + s * growth for s in range(n + 1)]
    for i, layer in enumerate(layers):
        if layer.conv1.in_channels != c0 + i * growth:
            raise ConfigError(f"{name}.denselayer{i + 1} reads {layer.conv1.in_channels} channels, "
                              f"expected {c0 + i * growth}: not a dense block")
    if consumer_weight.shape[1] != bounds[-1]:
        raise ConfigError(f"{consumer_name} reads {consumer_weight.shape[1]} channels but {name} outputs {bounds[-1]}")

    raw_columns = []
    for target, layer in enumerate(layers, start=1):  # layer `target` reads sources 0..target-1
        weight = layer.conv1.weight
        raw_columns.append([_mean_abs(weight, bounds[s], bounds[s + 1]) if s < target else None
                            for s in range(n + 1)])
    raw_columns.append([_mean_abs(consumer_weight, bounds[s], bounds[s + 1]) for s in range(n + 1)])
    normalised_columns = [_normalise(col) for col in raw_columns]

    def rows(columns):  # matrix[s][t]: source s (rows) -> target t (columns)
        return [[col[s] for col in columns] for s in range(n + 1)]

    return {
        "block": name,
        "layers": n,
        "input_channels": c0,
        "growth_rate": growth,
        "bottleneck": bool(getattr(layers[0], "bottleneck", False)),
        "consumer": consumer_name,
        "sources": ["input"] + [str(s) for s in range(1, n + 1)],
        "targets": [str(t) for t in range(1, n + 1)] + [consumer_name],
        "raw": rows(raw_columns),
        "normalized": rows(normalised_columns),
    }


def feature_reuse(model: nn.Module) -> dict[str, Any]:
    """The feature-reuse maps of every dense block of ``model`` (a :class:`densenet.models.DenseNet`).

    Returns a JSON-ready dict with ``model`` and ``blocks``; each block has ``sources``
    (``"input"``, then layers ``"1"``..``"L"``), ``targets`` (layers ``"1"``..``"L"``, then the
    consumer: ``"transitionN"`` or ``"classifier"``), and two matrices indexed ``[source][target]``:
    ``raw`` (mean absolute weights) and ``normalized`` (each target column divided by its maximum).
    Cells where the target does not read the source (s >= l) are None.
    """
    config = getattr(model, "config", None) or {}
    features = getattr(model, "features", None)
    name = config.get("name") or type(model).__name__
    if config.get("arch") != "densenet" or features is None:
        raise ConfigError(f"feature reuse needs a DenseNet; {name} is a {config.get('arch') or type(model).__name__}")
    children = list(features.named_children())
    blocks = []
    for i, (child_name, block) in enumerate(children):
        if not child_name.startswith("denseblock"):
            continue
        following = [(n, m) for n, m in children[i + 1:] if n.startswith(("transition", "denseblock"))]
        if following and following[0][0].startswith("transition"):
            consumer_name, consumer_weight = following[0][0], following[0][1].conv.weight
        else:
            consumer_name, consumer_weight = "classifier", model.classifier.weight
        blocks.append(_block_reuse(child_name, block, consumer_name, consumer_weight))
    return {
        "model": name,
        "config": dict(config),
        "measure": "mean |w| of the target's first convolution over the source's input channels, "
                   "divided by the target's maximum over its sources",
        "blocks": blocks,
    }


def format_feature_reuse(data: dict[str, Any]) -> str:
    """A text summary: per block, each source's mean normalised weight and the consumer's column."""
    lines = [f"feature reuse of {data['model']} ({data['measure']})"]
    for block in data["blocks"]:
        n = block["layers"]
        norm = block["normalized"]
        lines.append("")
        kind = "bottleneck" if block["bottleneck"] else "basic"
        lines.append(f"{block['block']}: {n} {kind} layer{'s' if n != 1 else ''}, "
                     f"{block['input_channels']} input channels, k={block['growth_rate']}, read by {block['consumer']}")
        lines.append(f"  {'source':<8}{'mean over later layers':>24}{block['consumer']:>16}")
        for s, label in enumerate(block["sources"]):
            later = [v for v in norm[s][:n] if v is not None]
            mean = f"{sum(later) / len(later):.3f}" if later else "-"
            lines.append(f"  {label:<8}{mean:>24}{norm[s][n]:>16.3f}")
    return "\n".join(lines)
