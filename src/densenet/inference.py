"""Inference: the fused, exact equivalent of a DenseNet, and evaluation of a model on a dataset.

:func:`optimize_for_inference` turns a trained :class:`densenet.models.DenseNet` into an
:class:`InferenceDenseNet` (batch norms folded into scales and shifts, one preallocated map per
dense block, cache-sized chunks on the CPU): the same outputs to float32 rounding, faster.
:func:`fast_inference_model` picks it where it is measured to help. :func:`evaluate` runs a model
over a :class:`densenet.data.Dataset` (loss, top-1/top-5, per-class accuracy, confusion matrix):
the one evaluation loop that ``densenet evaluate``, ``train``, ``report`` and ``compare`` share.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from densenet.augment import Augmenter
from densenet.errors import ConfigError, DataError
from densenet.models import DenseNet, _DenseBlock, _DenseLayer, _Transition
from densenet.runtime import autocast, resolve_device

__all__ = ["CHUNK_BYTES", "InferenceDenseNet", "optimize_for_inference", "fast_inference_model", "evaluate",
           "tta_logits", "tta_views", "views_label", "align_classes"]


CHUNK_BYTES = 16 * 2**20
"""CPU batches are run in chunks whose largest dense-block map is about this size (L3-friendly)."""


def _scale_shift(norm: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """Per-channel (scale, shift) with ``norm(x) == x * scale + shift`` in eval mode, as (1, C, 1, 1)."""
    scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
    shift = norm.bias - norm.running_mean * scale
    return scale.view(1, -1, 1, 1), shift.view(1, -1, 1, 1)


def _frozen(t: Tensor, memory_format: torch.memory_format = torch.contiguous_format) -> nn.Parameter:
    """A detached copy as a parameter without gradient (so ``.to()``/``.parameters()`` see it)."""
    return nn.Parameter(t.detach().clone().contiguous(memory_format=memory_format), requires_grad=False)


def _act(x: Tensor, gelu: bool) -> Tensor:
    """The model's activation on a temporary map: GELU, or ReLU in place."""
    return F.gelu(x) if gelu else x.relu_()


def _bn_act(x: Tensor, scale: Tensor, shift: Tensor, gelu: bool = False) -> Tensor:
    """act(x * scale + shift): an eval-mode batch norm and the activation in two cheap passes."""
    return _act(torch.addcmul(shift, x, scale), gelu)


class _InferenceLayer(nn.Module):
    """A dense layer for inference: norm2 folded into conv1 (conv1 -> norm2 is conv-then-BN)."""

    def __init__(self, layer: _DenseLayer, memory_format: torch.memory_format) -> None:
        super().__init__()
        self.gelu = isinstance(layer.relu1, nn.GELU)
        scale, shift = _scale_shift(layer.norm1)
        self.scale1, self.shift1 = _frozen(scale), _frozen(shift)
        self.bottleneck = layer.bottleneck
        if layer.bottleneck:
            scale2, shift2 = _scale_shift(layer.norm2)
            self.weight1 = _frozen(layer.conv1.weight * scale2.view(-1, 1, 1, 1), memory_format)
            self.bias1 = _frozen(shift2.flatten())
            self.weight2 = _frozen(layer.conv2.weight, memory_format)
        else:
            self.weight1 = _frozen(layer.conv1.weight, memory_format)

    def forward(self, x: Tensor) -> Tensor:
        out = _bn_act(x, self.scale1, self.shift1, self.gelu)
        if not self.bottleneck:
            return F.conv2d(out, self.weight1, None, padding=1)
        out = _act(F.conv2d(out, self.weight1, self.bias1), self.gelu)
        return F.conv2d(out, self.weight2, None, padding=1)


class _InferenceBlock(nn.Module):
    """A dense block writing every layer's channels into one preallocated map.

    Layer l reads the channel prefix ``[0, c_l)`` of the block's output map, already filled by
    the block input and the earlier layers, and writes its k channels right after it: the map is
    built once instead of being concatenated again by every layer.
    """

    def __init__(self, block: _DenseBlock, memory_format: torch.memory_format) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_InferenceLayer(layer, memory_format) for layer in block.values())
        first = next(iter(block.values()))
        self.in_channels = first.norm1.num_features
        self.out_channels = self.in_channels + sum(
            (layer.conv2 if layer.bottleneck else layer.conv1).out_channels for layer in block.values())

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        fmt = torch.channels_last if _is_channels_last(x) else torch.contiguous_format
        out = torch.empty((n, self.out_channels, h, w), dtype=x.dtype, device=x.device, memory_format=fmt)
        out[:, :c].copy_(x)
        for layer in self.layers:
            new = layer(out[:, :c])
            out[:, c : c + new.shape[1]].copy_(new)
            c += new.shape[1]
        return out


class _InferenceTransition(nn.Module):
    """BN and activation, the 1x1 convolution and the 2x2 pooling in the transition's order.

    Pooling and a bias-free 1x1 convolution are both linear and act on different axes, so an
    average pool always runs before the convolution (a quarter of the work, the same result); a
    max-pool is not linear: it stays where the transition's ``order`` puts it.
    """

    def __init__(self, transition: _Transition, memory_format: torch.memory_format) -> None:
        super().__init__()
        scale, shift = _scale_shift(transition.norm)
        self.scale, self.shift = _frozen(scale), _frozen(shift)
        self.weight = _frozen(transition.conv.weight, memory_format)
        self.max_pool = isinstance(transition.pool, nn.MaxPool2d)
        self.gelu = isinstance(transition.relu, nn.GELU)
        self.order = transition.order

    def _pool(self, x: Tensor) -> Tensor:
        return F.max_pool2d(x, 2) if self.max_pool else F.avg_pool2d(x, 2)

    def forward(self, x: Tensor) -> Tensor:
        if self.order == "pool-norm-conv":
            return F.conv2d(_bn_act(self._pool(x), self.scale, self.shift, self.gelu), self.weight)
        x = _bn_act(x, self.scale, self.shift, self.gelu)
        if self.order == "norm-pool-conv" or not self.max_pool:
            return F.conv2d(self._pool(x), self.weight)
        return F.max_pool2d(F.conv2d(x, self.weight), 2)


class InferenceDenseNet(nn.Module):
    """An inference-only DenseNet made by :func:`optimize_for_inference` (see there).

    It computes the same function as its source model in eval mode (to float32 rounding), never
    records gradients and holds copies of the weights (changing the source later does not change it).
    """

    def __init__(self, model: DenseNet, channels_last: bool = True) -> None:
        super().__init__()
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.channels_last = bool(channels_last)
        self.config = dict(model.config)
        self.gelu = model.config.get("activation", "relu") == "gelu"
        self.stem_pool = bool(model.config.get("stem_pool", False))
        self.stem_stride = 4 if model.config["stem"] == "imagenet" else (
            int(model.config["stem_stride"]) * (2 if self.stem_pool else 1))
        f = model.features
        if hasattr(f, "norm0"):  # ImageNet stem: conv0 -> norm0 folds into conv0
            scale, shift = _scale_shift(f.norm0)
            self.stem_weight = _frozen(f.conv0.weight * scale.view(-1, 1, 1, 1), fmt)
            self.stem_bias = _frozen(shift.flatten())
        else:
            self.stem_weight = _frozen(f.conv0.weight, fmt)
            self.stem_bias = None
        self.stem_conv = dict(stride=f.conv0.stride, padding=f.conv0.padding)
        stages = []
        for name, module in f.named_children():
            if name.startswith("denseblock"):
                stages.append(_InferenceBlock(module, fmt))
            elif name.startswith("transition"):
                stages.append(_InferenceTransition(module, fmt))
        self.stages = nn.ModuleList(stages)
        scale, shift = _scale_shift(f.norm5)
        self.scale5, self.shift5 = _frozen(scale), _frozen(shift)
        self.classifier_weight = _frozen(model.classifier.weight)
        self.classifier_bias = _frozen(model.classifier.bias)
        self.eval()

    def _largest_map_elements(self, h: int, w: int) -> int:
        """Elements per image of the widest dense-block map for an h x w input."""
        h, w = math.ceil(h / self.stem_stride), math.ceil(w / self.stem_stride)
        largest = 0
        for stage in self.stages:
            if isinstance(stage, _InferenceBlock):
                largest = max(largest, stage.out_channels * h * w)
            else:
                h, w = h // 2, w // 2
        return largest

    def _forward(self, x: Tensor) -> Tensor:
        x = F.conv2d(x, self.stem_weight, self.stem_bias, **self.stem_conv)
        if self.stem_bias is not None:
            x = F.max_pool2d(_act(x, self.gelu), kernel_size=3, stride=2, padding=1)
        elif self.stem_pool:
            x = F.max_pool2d(x, kernel_size=2, stride=2)
        for stage in self.stages:
            x = stage(x)
        x = _bn_act(x, self.scale5, self.shift5, self.gelu)
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return F.linear(x, self.classifier_weight, self.classifier_bias)

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            chunk = len(x)
            if x.device.type == "cpu":
                per_image = self._largest_map_elements(x.shape[2], x.shape[3]) * x.element_size()
                chunk = max(1, CHUNK_BYTES // max(per_image, 1))
            if len(x) <= chunk:
                return self._forward(x)
            return torch.cat([self._forward(part) for part in x.split(chunk)])


def _is_channels_last(x: Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def optimize_for_inference(model: nn.Module, *, channels_last: bool = True) -> nn.Module:
    """An inference-only equivalent of ``model`` that runs faster; other models come back as they are.

    For a :class:`DenseNet` it returns an :class:`InferenceDenseNet` on the same device and dtype,
    computing the same function as ``model.eval()`` up to float32 rounding:

    - norm2 is folded into conv1 (conv1 -> norm2 is a convolution followed by a batch norm), and
      an ImageNet stem's norm0 into conv0;
    - the other batch norms (norm1, the transitions', norm5), which precede the activation, become
      one multiply-add and an in-place ReLU (or a GELU);
    - each dense block fills one preallocated map instead of concatenating per layer;
    - transitions with average pooling pool before their 1x1 convolution (a quarter of the work, same result);
    - on the CPU, large batches run in chunks whose feature maps stay in the cache;
    - weights and inputs are channels_last unless ``channels_last=False``.

    The result never records gradients; use the original model for training or saliency.
    """
    if not isinstance(model, DenseNet):
        return model
    param = next(model.parameters())
    return InferenceDenseNet(model, channels_last=channels_last).to(device=param.device, dtype=param.dtype)




def fast_inference_model(model: torch.nn.Module, device: torch.device, amp: str = "none") -> torch.nn.Module:
    """The exact, faster inference equivalent of ``model`` where it is measured to help, else ``model``.

    On the CPU in float32 that is :func:`optimize_for_inference` (folded batch
    norms, one preallocated map per dense block, cache-sized chunks; same outputs to float32
    rounding; see docs/BENCHMARKS.md). Elsewhere (CUDA, autocast) the model itself, until measured.
    """
    if torch.device(device).type == "cpu" and amp == "none":
        return optimize_for_inference(model)
    return model


def tta_views(tta: bool, translate: bool = False) -> int:
    """How many times :func:`tta_logits` (or plain inference, without ``tta``) runs the model per image."""
    return (6 if translate else 2) if tta or translate else 1


def views_label(views: int) -> str:
    """'1 view', '6 views': how an accuracy's views of each image are named in messages and reports."""
    return f"{views} view{'s' if views != 1 else ''}"


def tta_logits(runner, x: Tensor, translate: bool = False, plain: Tensor | None = None) -> Tensor:
    """Test-time augmentation of a normalised batch ``x``: the mean of the float32 logits of each
    image and its mirror; with ``translate`` (6 views, the fast CIFAR trainers' multi-view TTA) that
    pair counts half, the other half the mean of two more mirror pairs: the image moved one pixel
    down-right and one pixel up-left, its edge filled by reflection. ``plain``: ``runner(x).float()``
    if the caller has it already (it is not computed again)."""
    plain = runner(x).float() if plain is None else plain
    logits = 0.5 * (plain + runner(x.flip(3)).float())
    if not translate:
        return logits
    h, w = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    moved = torch.zeros_like(logits)
    for view in (padded[..., :h, :w], padded[..., 2:, 2:]):
        view = torch.empty_like(x).copy_(view)  # x's memory format, contiguous
        moved += runner(view).float() + runner(view.flip(3)).float()
    return 0.5 * logits + 0.125 * moved


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    dataset,
    *,
    batch_size: int = 500,
    tta: bool = False,
    tta_translate: bool = False,
    device: str | torch.device | None = None,
    mean=None,
    std=None,
    amp: str = "none",
    channels_last: bool = True,
) -> dict:
    """Evaluate ``model`` on ``dataset`` (a :class:`densenet.data.Dataset`).

    Images are normalised with ``mean``/``std`` (default: ``model.meta``'s, else the dataset's).
    With ``tta`` the logits of each image and of its horizontal mirror are averaged; with
    ``tta_translate`` (which implies ``tta``) also those of the image moved by a pixel each way
    along the diagonal, and of their mirrors (:func:`tta_logits`, 6 views). Returns a
    dict: ``num_samples``, ``loss`` (mean cross-entropy), ``top1``, ``top5`` (fractions),
    ``single_view_top1`` (the top-1 of the image alone, which TTA's first view computes anyway),
    ``classes``, ``per_class`` (one dict per class: ``class``, ``total``, ``correct``,
    ``accuracy``) and ``confusion`` (rows: true class, columns: predicted; lists of ints).
    The model's training mode is restored afterwards.
    """
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
    tta = bool(tta or tta_translate)

    was_training = model.training
    model.eval()
    runner = fast_inference_model(model, device, amp)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    top1 = torch.zeros((), dtype=torch.long, device=device)
    plain_top1 = torch.zeros((), dtype=torch.long, device=device)
    top5 = torch.zeros((), dtype=torch.long, device=device)
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.long, device=device)
    try:
        for start in range(0, len(dataset), batch_size):
            images = dataset.images[start : start + batch_size].to(device, non_blocking=True)
            labels = dataset.labels[start : start + batch_size].to(device, non_blocking=True)
            x = normalise(images, train=False)
            with autocast(device, amp):
                plain = runner(x).float()
                logits = tta_logits(runner, x, tta_translate, plain) if tta else plain
            if logits.shape[1] != num_classes:
                raise ConfigError(
                    f"the model has {logits.shape[1]} outputs but the data has {num_classes} classes"
                )
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").double()
            ranked = logits.topk(k, dim=1).indices
            hits = ranked == labels[:, None]
            top1 += hits[:, 0].sum()
            # as a plain evaluation would rank it (the same topk), so the two agree exactly
            plain_top1 += (plain.topk(k, dim=1).indices[:, 0] == labels).sum() if tta else hits[:, 0].sum()
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
        "tta": tta,
        "tta_translate": bool(tta_translate),
        "single_view_top1": int(plain_top1) / n,
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
