"""ResNet baselines for CIFAR (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016).

The CIFAR adaptation used throughout the DenseNet-versus-ResNet literature: a 3x3 stride-1
convolution with 64 channels as the stem (no max-pooling), then four stages of 64, 128, 256 and
512 channels (times 4 for bottleneck blocks) with strides 1, 2, 2, 2, global average pooling and
a linear classifier. Residual blocks are the paper's: BasicBlock (two 3x3 convolutions) for
ResNet-18/34 and Bottleneck (1x1, 3x3, 1x1 with 4x expansion) for ResNet-50. A shortcut is the
identity when shapes agree, else a 1x1 projection with batch norm (the paper's option B). In the
bottleneck the stride sits on the 3x3 convolution, as in torchvision (He et al. put it on the
first 1x1; the parameter count is the same).

:mod:`densenet.registry` names them ``resnet18-cifar``, ``resnet34-cifar`` and ``resnet50-cifar``
(arch ``"resnet"``), so they work wherever a model name does.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import Tensor, nn

from densenet.errors import ConfigError

__all__ = ["ResNet", "BasicBlock", "Bottleneck", "resnet18_cifar", "resnet34_cifar", "resnet50_cifar"]

BLOCKS = ("basic", "bottleneck")


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU."""

    expansion = 1

    def __init__(self, in_channels: int, width: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_channels, width, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """conv1x1-BN-ReLU-conv3x3(stride)-BN-ReLU-conv1x1(4x)-BN, plus the shortcut, then ReLU."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int) -> None:
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_channels, out_channels, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


def _shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Module | None:
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(OrderedDict([
        ("0", nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)),
        ("1", nn.BatchNorm2d(out_channels)),
    ]))


class ResNet(nn.Module):
    """A CIFAR ResNet.

    Args:
        block: ``"basic"`` or ``"bottleneck"``.
        layers: residual blocks per stage, e.g. ``[2, 2, 2, 2]`` for ResNet-18.
        widths: base channels of each stage (bottleneck stages output 4x as many).
        num_classes: outputs of the linear classifier.
        stem_channels: output channels of the 3x3 stem convolution.

    Parameter names follow torchvision's ResNet (``conv1``, ``bn1``, ``layer1.0.conv1``, ...,
    ``downsample.0``, ``fc``). ``model.config`` holds the arguments plus ``"arch": "resnet"``,
    ``"name"`` and ``"stem": "cifar"``.
    """

    def __init__(
        self,
        block: str = "basic",
        layers: list[int] | tuple[int, ...] = (2, 2, 2, 2),
        widths: list[int] | tuple[int, ...] = (64, 128, 256, 512),
        num_classes: int = 10,
        stem_channels: int = 64,
        stem: str = "cifar",
    ) -> None:
        super().__init__()
        layers, widths = [int(n) for n in layers], [int(w) for w in widths]
        problems = []
        if block not in BLOCKS:
            problems.append(f"block must be one of {', '.join(BLOCKS)}, got {block!r}")
        if not layers or min(layers) < 1:
            problems.append(f"layers needs at least one stage of at least one block, got {layers}")
        if len(widths) != len(layers) or (widths and min(widths) < 1):
            problems.append(f"widths needs one positive width per stage ({len(layers)}), got {widths}")
        if int(num_classes) < 1:
            problems.append(f"num_classes must be at least 1, got {num_classes}")
        if int(stem_channels) < 1:
            problems.append(f"stem_channels must be at least 1, got {stem_channels}")
        if stem != "cifar":
            problems.append(f"only the cifar stem (3x3 conv, no pooling) is implemented, got {stem!r}")
        if problems:
            raise ConfigError("; ".join(problems))

        cls = BasicBlock if block == "basic" else Bottleneck
        self.conv1 = nn.Conv2d(3, stem_channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_channels)
        self.relu = nn.ReLU(inplace=True)
        channels = stem_channels
        for s, (n, width) in enumerate(zip(layers, widths), start=1):
            blocks = []
            for i in range(n):
                stride = 2 if (i == 0 and s > 1) else 1
                blocks.append(cls(channels, width, stride))
                channels = width * cls.expansion
            self.add_module(f"layer{s}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        self.num_features = channels
        self.num_stages = len(layers)
        self.config: dict[str, Any] = {
            "arch": "resnet",
            "name": None,
            "block": block,
            "layers": layers,
            "widths": widths,
            "num_classes": int(num_classes),
            "stem_channels": int(stem_channels),
            "stem": stem,
        }
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        for s in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{s}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))

    def stages(self) -> list[tuple[str, list[str]]]:
        """(stage name, module names) in order, for :mod:`densenet.analysis`."""
        result = [("stem", ["conv1", "bn1", "relu"])]
        result += [(f"layer{s}", [f"layer{s}"]) for s in range(1, self.num_stages + 1)]
        return result + [("head", ["avgpool", "fc"])]


def _named(model: ResNet, name: str) -> ResNet:
    model.config["name"] = name
    return model


def resnet18_cifar(num_classes: int = 10, **overrides: Any) -> ResNet:
    """ResNet-18 for 32x32 images: BasicBlock, 2-2-2-2 (11,173,962 parameters for 10 classes)."""
    kwargs = {"block": "basic", "layers": [2, 2, 2, 2], "num_classes": num_classes, **overrides}
    return _named(ResNet(**kwargs), "resnet18-cifar")


def resnet34_cifar(num_classes: int = 10, **overrides: Any) -> ResNet:
    """ResNet-34 for 32x32 images: BasicBlock, 3-4-6-3 (21,282,122 parameters for 10 classes)."""
    kwargs = {"block": "basic", "layers": [3, 4, 6, 3], "num_classes": num_classes, **overrides}
    return _named(ResNet(**kwargs), "resnet34-cifar")


def resnet50_cifar(num_classes: int = 10, **overrides: Any) -> ResNet:
    """ResNet-50 for 32x32 images: Bottleneck, 3-4-6-3 (23,520,842 parameters for 10 classes)."""
    kwargs = {"block": "bottleneck", "layers": [3, 4, 6, 3], "num_classes": num_classes, **overrides}
    return _named(ResNet(**kwargs), "resnet50-cifar")
