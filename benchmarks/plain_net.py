"""A plain (non-dense) yardstick for the CPU recipes: the fast CIFAR trainers' network under `densenet train`.

The record CIFAR-10 trainers (Page's ResNet-9 descendants, Jordan's airbench) use a small plain
network: a patch-whitening stem, then three groups of conv3x3 - max-pool 2 - BN - GELU - conv3x3 -
BN - GELU of 64, 256 and 256 channels, a global max-pool and a bias-free linear head whose logits
are scaled by 1/9; BatchNorm weights frozen at 1 (only the biases train) and each convolution's
first filters initialised to the identity (Dirac). With our 54-channel 3x3 whitening stem at full
resolution it costs about as many multiply-adds per image as densenet-cpu-m4 (about 165 M against
162 M), so the two can be trained under the same recipe and the same wall-clock budget to see how
much of the CPU recipes' gap to those trainers is the dense shape and how much the data (the JPEG
copy) and the recipe.

This script registers the network as ``plain-cifar`` (arch ``"plain"``) and then runs the
``densenet`` command line with its arguments, so every flag and recipe works::

    python benchmarks/plain_net.py train --recipe cpu-30m --model plain-cifar --model-kwargs '{}' \
        --data-dir ../shared/data/cifar10-jpeg --out-dir runs/plain30

It is a measuring device, not a model the package ships: ``densenet evaluate`` outside this script
does not know the arch (run ``python benchmarks/plain_net.py evaluate ...`` instead).
"""

from __future__ import annotations

import sys
from collections import OrderedDict

import torch
from torch import Tensor, nn

from densenet.cli import main
from densenet.registry import register_arch, register_model

WIDTHS = (64, 256, 256)
STEM_CHANNELS = 54  # 2 x 3 x 3 x 3: the +- eigenvectors of 3x3 colour patches (densenet train --whiten)
LOGIT_SCALE = 1 / 9


def _norm(channels: int) -> nn.BatchNorm2d:
    norm = nn.BatchNorm2d(channels)  # momentum: --bn-momentum sets it for every BatchNorm
    norm.weight.requires_grad_(False)  # the trainers train only the BatchNorm biases
    return norm


def _group(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        pool=nn.MaxPool2d(2),
        norm1=_norm(out_channels), act1=nn.GELU(),
        conv2=nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
        norm2=_norm(out_channels), act2=nn.GELU(),
    ))


class PlainNet(nn.Module):
    """Whitening stem, three conv groups, global max-pool, linear head x 1/9 (``features.conv0`` is the stem)."""

    def __init__(self, num_classes: int = 10, widths: tuple[int, ...] = WIDTHS) -> None:
        super().__init__()
        layers: OrderedDict[str, nn.Module] = OrderedDict(
            conv0=nn.Conv2d(3, STEM_CHANNELS, 3, padding=1, bias=False), act0=nn.GELU())
        channels = STEM_CHANNELS
        for i, width in enumerate(widths, 1):
            layers[f"group{i}"] = _group(channels, width)
            channels = width
        layers["pool"] = nn.AdaptiveMaxPool2d(1)
        self.features = nn.Sequential(layers)
        self.classifier = nn.Linear(channels, num_classes, bias=False)
        for module in self.modules():
            if isinstance(module, nn.Conv2d) and module is not self.features.conv0:
                out_channels, in_channels = module.weight.shape[:2]
                nn.init.dirac_(module.weight[:min(in_channels, out_channels)])
        self.config = {"arch": "plain", "name": "plain-cifar", "num_classes": num_classes, "widths": list(widths)}

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(self.features(x), 1)) * LOGIT_SCALE


def _build(num_classes: int = 10, widths=WIDTHS, **_ignored) -> PlainNet:
    """The recipes' DenseNet keywords (activation, transition_pool) do not apply and are ignored."""
    return PlainNet(num_classes=num_classes, widths=tuple(widths))


register_arch("plain", _build)
register_model("plain-cifar", _build, "the fast CIFAR trainers' plain network (benchmarks/plain_net.py)")

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
