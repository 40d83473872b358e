"""The textbook DenseNet-121 for CIFAR, as tutorials write it: the yardstick of benchmarks/compare.py.

Each bottleneck layer returns ``torch.cat([x, out], 1)``, so the block's feature map is rebuilt
(copied) by every layer; NCHW, float32, eager, BN-ReLU-Conv modules called one after the other;
training is the plain loop (``zero_grad``, forward, cross-entropy, backward, SGD step). The
architecture is the same as ``densenet121-cifar`` (6,956,298 parameters, channels in the same
order), so :func:`load_from_densenet` can copy our weights into it and both must compute the same
function.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Bottleneck(nn.Module):
    def __init__(self, in_planes: int, growth_rate: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, 4 * growth_rate, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4 * growth_rate)
        self.conv2 = nn.Conv2d(4 * growth_rate, growth_rate, kernel_size=3, padding=1, bias=False)

    def forward(self, x):
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return torch.cat([x, out], 1)


class Transition(nn.Module):
    def __init__(self, in_planes: int, out_planes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(in_planes)
        self.conv = nn.Conv2d(in_planes, out_planes, kernel_size=1, bias=False)

    def forward(self, x):
        return F.avg_pool2d(self.conv(F.relu(self.bn(x))), 2)


class ReferenceDenseNet(nn.Module):
    """DenseNet-121 with a 3x3 stem for 32x32 images (k=32, blocks 6-12-24-16, compression 0.5)."""

    def __init__(self, nblocks=(6, 12, 24, 16), growth_rate: int = 32, reduction: float = 0.5,
                 num_classes: int = 10) -> None:
        super().__init__()
        planes = 2 * growth_rate
        self.conv1 = nn.Conv2d(3, planes, kernel_size=3, padding=1, bias=False)
        stages = []
        for i, n in enumerate(nblocks):
            layers = []
            for _ in range(n):
                layers.append(Bottleneck(planes, growth_rate))
                planes += growth_rate
            stages.append(nn.Sequential(*layers))
            if i < len(nblocks) - 1:
                out_planes = int(math.floor(planes * reduction))
                stages.append(Transition(planes, out_planes))
                planes = out_planes
        self.stages = nn.Sequential(*stages)
        self.bn = nn.BatchNorm2d(planes)
        self.linear = nn.Linear(planes, num_classes)

    def forward(self, x):
        out = self.stages(self.conv1(x))
        out = F.avg_pool2d(F.relu(self.bn(out)), 4)
        return self.linear(out.view(out.size(0), -1))


def reference_densenet121_cifar(num_classes: int = 10) -> ReferenceDenseNet:
    return ReferenceDenseNet(num_classes=num_classes)


def load_from_densenet(reference: ReferenceDenseNet, model: nn.Module) -> ReferenceDenseNet:
    """Copy a ``densenet121-cifar`` model's parameters and buffers into ``reference``.

    Both register their tensors in the same order (stem, layers, transitions, final BN,
    classifier), so the state dicts are matched by position, checking every shape.
    """
    ours = list(model.state_dict().values())
    theirs = reference.state_dict()
    if len(ours) != len(theirs):
        raise ValueError(f"{len(ours)} tensors in the model, {len(theirs)} in the reference")
    converted = {}
    for (key, want), value in zip(theirs.items(), ours):
        if want.shape != value.shape:
            raise ValueError(f"{key}: reference shape {tuple(want.shape)}, model shape {tuple(value.shape)}")
        converted[key] = value.clone()
    reference.load_state_dict(converted)
    return reference


def reference_train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x, y) -> None:
    """The textbook step: zero_grad, forward, cross-entropy, backward, optimizer step."""
    optimizer.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()


def reference_infer(model: nn.Module, x):
    """The textbook inference: eval mode was set by the caller; no_grad forward."""
    with torch.no_grad():
        return model(x)


# ---- the textbook data pipeline: per-image transforms in a Dataset, collated by a DataLoader ----


class RandomCrop:
    """Pad by ``padding`` zero pixels, then crop ``size`` x ``size`` at a random position."""

    def __init__(self, size: int, padding: int) -> None:
        self.size, self.padding = size, padding

    def __call__(self, img):
        from PIL import ImageOps

        img = ImageOps.expand(img, border=self.padding, fill=0)
        w, h = img.size
        top = int(torch.randint(0, h - self.size + 1, size=(1,)).item())
        left = int(torch.randint(0, w - self.size + 1, size=(1,)).item())
        return img.crop((left, top, left + self.size, top + self.size))


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, img):
        from PIL import Image

        return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if torch.rand(1) < self.p else img


class ToTensor:
    """HWC uint8 PIL image -> CHW float tensor in [0, 1]."""

    def __call__(self, img):
        import numpy as np

        t = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True))
        return t.view(img.size[1], img.size[0], 3).permute(2, 0, 1).contiguous().float().div(255)


class Normalize:
    def __init__(self, mean, std) -> None:
        self.mean, self.std = mean, std

    def __call__(self, t):
        mean = torch.as_tensor(self.mean, dtype=t.dtype).view(-1, 1, 1)
        std = torch.as_tensor(self.std, dtype=t.dtype).view(-1, 1, 1)
        return t.sub(mean).div(std)


class Compose:
    def __init__(self, transforms) -> None:
        self.transforms = transforms

    def __call__(self, x):
        for t in self.transforms:
            x = t(x)
        return x


class ImageArrayDataset:
    """Images as an (N, H, W, 3) uint8 array and integer labels; each item is transformed on its own."""

    def __init__(self, images_hwc, labels, transform) -> None:
        self.images, self.labels, self.transform = images_hwc, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def train_transform(mean, std) -> Compose:
    """The tutorial CIFAR augmentation: RandomCrop(32, padding=4), flip, ToTensor, Normalize."""
    return Compose([RandomCrop(32, padding=4), RandomHorizontalFlip(), ToTensor(), Normalize(mean, std)])


def collate(items):
    """What the DataLoader's default collate does with (tensor, int) pairs."""
    images, labels = zip(*items)
    return torch.stack(images), torch.tensor(labels)
