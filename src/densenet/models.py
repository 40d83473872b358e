"""The DenseNet family (Huang et al., "Densely Connected Convolutional Networks", CVPR 2017).

One :class:`DenseNet` class builds every member of the family from its hyper-parameters: the
ImageNet models (121/161/169/201/264), the CIFAR models of the paper (basic DenseNet L-k and
DenseNet-BC L-k) and the small demo model. Parameter and buffer names follow torchvision's
``DenseNet`` exactly, so its checkpoints load with :func:`load_state_dict_compat`.

Models are made by name with :func:`create_model` (``list_models()`` gives the names; the
generic names ``densenet-bc-{L}-{k}`` and ``densenet-{L}-{k}`` work for any valid depth), or from
a saved ``model.config`` with :func:`model_from_config`.
"""

from __future__ import annotations

import contextlib
import difflib
import math
import re
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from densenet.errors import ConfigError, WeightsError

__all__ = [
    "DenseNet",
    "create_model",
    "list_models",
    "describe_models",
    "model_from_config",
    "register_model",
    "register_arch",
    "load_state_dict_compat",
    "count_parameters",
    "whiten_stem",
    "optimize_for_inference",
    "InferenceDenseNet",
    "densenet121_cifar",
    "densenet_bc_mini",
    "densenet121",
    "densenet161",
    "densenet169",
    "densenet201",
    "densenet264",
    "densenet_bc",
    "densenet_basic",
]

STEMS = ("imagenet", "cifar")


# --------------------------------------------------------------------------------------------
# building blocks


@contextlib.contextmanager
def _running_stats_kept(norm: nn.BatchNorm2d) -> Iterator[None]:
    """Restore ``norm``'s running statistics on exit.

    Used around the recomputation of a checkpointed layer in the backward pass: the recomputed
    batch norm must normalise with the batch statistics again, but it must not count the batch a
    second time in its running mean/variance.
    """
    saved = [(buf, buf.clone()) for buf in (norm.running_mean, norm.running_var, norm.num_batches_tracked)
             if buf is not None]
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, value in saved:
                buf.copy_(value)


class _DenseLayer(nn.Module):
    """One layer H_l of a dense block.

    It takes the list of all feature maps produced so far in the block (the block input first),
    concatenates them along the channels and returns only its ``growth_rate`` new channels.
    With a bottleneck (``bn_size`` > 0): BN-ReLU-Conv1x1(bn_size*k)-BN-ReLU-Conv3x3(k);
    without: BN-ReLU-Conv3x3(k). Dropout, if any, follows the last convolution.
    """

    def __init__(self, in_channels: int, growth_rate: int, bn_size: int, drop_rate: float,
                 memory_efficient: bool) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU(inplace=True)
        if bn_size:
            width = bn_size * growth_rate
            self.conv1 = nn.Conv2d(in_channels, width, kernel_size=1, bias=False)
            self.norm2 = nn.BatchNorm2d(width)
            self.relu2 = nn.ReLU(inplace=True)
            self.conv2 = nn.Conv2d(width, growth_rate, kernel_size=3, padding=1, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_channels, growth_rate, kernel_size=3, padding=1, bias=False)
        self.bottleneck = bool(bn_size)
        self.drop_rate = float(drop_rate)
        self.memory_efficient = bool(memory_efficient)

    def _concat_conv1(self, *inputs: Tensor) -> Tensor:
        """Concatenation, norm1, relu1 and conv1: the part whose input grows with depth."""
        x = inputs[0] if len(inputs) == 1 else torch.cat(inputs, dim=1)
        return self.conv1(self.relu1(self.norm1(x)))

    def _body(self, *inputs: Tensor) -> Tensor:
        """The whole layer but dropout: concatenation to the last convolution."""
        out = self._concat_conv1(*inputs)
        if self.bottleneck:
            out = self.conv2(self.relu2(self.norm2(out)))
        return out

    def _recompute_contexts(self) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        """Selective checkpointing: convolution outputs are kept, everything else is recomputed.

        The recomputation in backward must not count the batch a second time in the running
        statistics of norm1/norm2, so they are restored around it.
        """
        forward_context, recompute_context = create_selective_checkpoint_contexts(_keep_convolutions)
        norms = [self.norm1, self.norm2] if self.bottleneck else [self.norm1]
        return forward_context, _recompute_guarded(recompute_context, norms)

    def forward(self, inputs: list[Tensor]) -> Tensor:
        if self.memory_efficient and torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
            if torch.compiler.is_compiling():
                # The compiled backward does its own recomputation (and does not replay buffer
                # updates): checkpoint the growing part only, without the eager-only contexts.
                out = checkpoint(self._concat_conv1, *inputs, use_reentrant=False, preserve_rng_state=False)
                if self.bottleneck:
                    out = self.conv2(self.relu2(self.norm2(out)))
            else:
                # Keep only the inputs (already stored by earlier layers) and the convolution
                # outputs; the concatenation and the BN/ReLU maps are recomputed in backward from
                # them, which costs elementwise passes but no convolution. Nothing random happens
                # inside (dropout comes after), so the RNG state need not be saved.
                out = checkpoint(self._body, *inputs, use_reentrant=False, preserve_rng_state=False,
                                 context_fn=self._recompute_contexts)
        else:
            out = self._body(*inputs)
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return out


_CONVOLUTIONS = (torch.ops.aten.convolution.default, torch.ops.aten.mkldnn_convolution.default)


def _keep_convolutions(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    """Selective-checkpoint policy: save convolution outputs, recompute the cheap operations."""
    return CheckpointPolicy.MUST_SAVE if op in _CONVOLUTIONS else CheckpointPolicy.PREFER_RECOMPUTE


@contextlib.contextmanager
def _recompute_guarded(recompute_context: contextlib.AbstractContextManager,
                       norms: list[nn.BatchNorm2d]) -> Iterator[None]:
    """``recompute_context`` with the running statistics of ``norms`` restored afterwards."""
    with contextlib.ExitStack() as stack:
        for norm in norms:  # entered first: the copies are taken outside the recomputation
            stack.enter_context(_running_stats_kept(norm))
        stack.enter_context(recompute_context)
        yield


class _DenseBlock(nn.ModuleDict):
    """``num_layers`` dense layers; returns the concatenation of its input and every layer's output."""

    def __init__(self, num_layers: int, in_channels: int, growth_rate: int, bn_size: int,
                 drop_rate: float, memory_efficient: bool) -> None:
        super().__init__()
        for i in range(num_layers):
            layer = _DenseLayer(in_channels + i * growth_rate, growth_rate, bn_size, drop_rate,
                                memory_efficient)
            self.add_module(f"denselayer{i + 1}", layer)

    def forward(self, x: Tensor) -> Tensor:
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, dim=1)


class _Transition(nn.Sequential):
    """BN-ReLU-Conv1x1 to ``out_channels``, then 2x2 average pooling (stride 2)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(OrderedDict([
            ("norm", nn.BatchNorm2d(in_channels)),
            ("relu", nn.ReLU(inplace=True)),
            ("conv", nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)),
            ("pool", nn.AvgPool2d(kernel_size=2, stride=2)),
        ]))


# --------------------------------------------------------------------------------------------
# the model


class DenseNet(nn.Module):
    """A DenseNet, configured by its hyper-parameters.

    Args:
        growth_rate: k, the channels each dense layer adds.
        block_config: number of layers in each dense block.
        num_init_features: output channels of the stem convolution.
        bn_size: bottleneck width factor (the 1x1 conv outputs ``bn_size * k`` channels);
            0 or None gives the basic layer BN-ReLU-Conv3x3.
        compression: theta; a transition outputs ``floor(theta * C)`` of its C input channels.
        drop_rate: dropout probability after each dense layer (0 disables it).
        num_classes: outputs of the linear classifier.
        stem: ``"imagenet"`` (7x7/2 conv, BN, ReLU, 3x3/2 max-pool) or ``"cifar"`` (one 3x3
            conv with stride ``stem_stride``, nothing else).
        stem_stride: stride of the CIFAR stem convolution (1 as in the paper).
        memory_efficient: keep only each layer's convolution outputs for backward and recompute
            its concatenation and BN/ReLU maps there (see :meth:`set_memory_efficient`).

    ``model.config`` holds these arguments (plus ``"arch"`` and ``"name"``) as a JSON-ready dict.
    """

    def __init__(
        self,
        growth_rate: int = 32,
        block_config: tuple[int, ...] | list[int] = (6, 12, 24, 16),
        num_init_features: int = 64,
        bn_size: int | None = 4,
        compression: float = 0.5,
        drop_rate: float = 0.0,
        num_classes: int = 1000,
        stem: str = "imagenet",
        stem_stride: int = 1,
        memory_efficient: bool = False,
    ) -> None:
        super().__init__()
        bn_size = int(bn_size or 0)
        block_config = [int(n) for n in block_config]
        _check_config(growth_rate, block_config, num_init_features, bn_size, compression, drop_rate,
                      num_classes, stem, stem_stride)

        if stem == "imagenet":
            layers = [
                ("conv0", nn.Conv2d(3, num_init_features, kernel_size=7, stride=2, padding=3, bias=False)),
                ("norm0", nn.BatchNorm2d(num_init_features)),
                ("relu0", nn.ReLU(inplace=True)),
                ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
            ]
        else:
            layers = [("conv0", nn.Conv2d(3, num_init_features, kernel_size=3, stride=stem_stride,
                                          padding=1, bias=False))]
        self.features = nn.Sequential(OrderedDict(layers))

        channels = num_init_features
        for b, num_layers in enumerate(block_config, start=1):
            block = _DenseBlock(num_layers, channels, growth_rate, bn_size, drop_rate, memory_efficient)
            self.features.add_module(f"denseblock{b}", block)
            channels += num_layers * growth_rate
            if b < len(block_config):
                out_channels = math.floor(compression * channels)
                self.features.add_module(f"transition{b}", _Transition(channels, out_channels))
                channels = out_channels
        self.features.add_module("norm5", nn.BatchNorm2d(channels))
        self.classifier = nn.Linear(channels, num_classes)
        self.num_features = channels

        self.config: dict[str, Any] = {
            "arch": "densenet",
            "name": None,
            "growth_rate": int(growth_rate),
            "block_config": block_config,
            "num_init_features": int(num_init_features),
            "bn_size": bn_size,
            "compression": float(compression),
            "drop_rate": float(drop_rate),
            "num_classes": int(num_classes),
            "stem": stem,
            "stem_stride": int(stem_stride),
            "memory_efficient": bool(memory_efficient),
        }
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def set_memory_efficient(self, enabled: bool = True) -> DenseNet:
        """Switch checkpointed (memory-efficient) dense layers on or off; returns the model."""
        for m in self.modules():
            if isinstance(m, _DenseLayer):
                m.memory_efficient = bool(enabled)
        self.config["memory_efficient"] = bool(enabled)
        return self

    def forward_features(self, x: Tensor) -> Tensor:
        """The feature map after the last block and norm5 (before ReLU and pooling)."""
        return self.features(x)

    def forward_head(self, features: Tensor) -> Tensor:
        """ReLU, global average pooling and the classifier."""
        out = F.relu(features)
        out = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        return self.classifier(out)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def stages(self) -> list[tuple[str, list[str]]]:
        """The model's stages in order, each as (name, qualified names of its modules).

        Stages are ``stem``, ``denseblock1``, ``transition1``, ..., ``head``; a stage's output is the
        output of its last module. Used by :mod:`densenet.analysis`.
        """
        stem = [f"features.{n}" for n in ("conv0", "norm0", "relu0", "pool0") if hasattr(self.features, n)]
        result = [("stem", stem)]
        for name, _ in self.features.named_children():
            if name.startswith(("denseblock", "transition")):
                result.append((name, [f"features.{name}"]))
        result.append(("head", ["features.norm5", "classifier"]))
        return result

    @property
    def block_config(self) -> list[int]:
        return list(self.config["block_config"])


def whiten_stem(model: nn.Module, images: Tensor, eps: float = 5e-4) -> None:
    """Set the CIFAR stem convolution to a patch-whitening filter bank of ``images``, and freeze it.

    ``images`` (N, 3, H, W) are normalised training images. The covariance of their k x k patches
    (3k^2 values each) is eigendecomposed; each eigenvector scaled by 1/sqrt(eigenvalue + eps) is a
    filter that maps patches to uncorrelated, unit-variance responses, and its negation is kept too
    so that the ReLU after the stem loses nothing. The stem therefore needs exactly 2 x 3k^2 output
    channels (54 for a 3x3 stem). The filters are frozen (``requires_grad`` False): the network
    starts from decorrelated inputs, which speeds up early training (Page's and Jordan's fast CIFAR
    trainers do the same).
    """
    conv = model.features.conv0
    out_channels, in_channels, kh, kw = conv.weight.shape
    dim = in_channels * kh * kw
    if out_channels != 2 * dim:
        raise ConfigError(f"a whitened stem needs 2 x {in_channels} x {kh} x {kw} = {2 * dim} stem channels, "
                          f"the model has {out_channels}")
    if images.dim() != 4 or images.shape[1] != in_channels or images.shape[0] < 1:
        raise ConfigError(f"whitening needs (N, {in_channels}, H, W) images, got {tuple(images.shape)}")
    patches = F.unfold(images.double(), (kh, kw)).transpose(1, 2).reshape(-1, dim)  # (N*L, dim)
    patches = patches - patches.mean(dim=0)
    covariance = patches.T @ patches / len(patches)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)  # ascending eigenvalues
    filters = eigenvectors.T / torch.sqrt(eigenvalues.clamp(min=0) + eps)[:, None]
    weight = torch.cat([filters, -filters]).reshape(out_channels, in_channels, kh, kw)
    with torch.no_grad():
        conv.weight.copy_(weight.to(conv.weight.dtype))
    conv.weight.requires_grad_(False)


def _check_config(growth_rate, block_config, num_init_features, bn_size, compression, drop_rate,
                  num_classes, stem, stem_stride) -> None:
    problems = []
    if int(growth_rate) < 1:
        problems.append(f"growth_rate must be at least 1, got {growth_rate}")
    if not block_config or min(block_config) < 1:
        problems.append(f"block_config needs at least one block of at least one layer, got {block_config}")
    if int(num_init_features) < 1:
        problems.append(f"num_init_features must be at least 1, got {num_init_features}")
    if bn_size < 0:
        problems.append(f"bn_size must be 0 (no bottleneck) or positive, got {bn_size}")
    if not 0 < float(compression) <= 1:
        problems.append(f"compression must be in (0, 1], got {compression}")
    if not 0 <= float(drop_rate) < 1:
        problems.append(f"drop_rate must be in [0, 1), got {drop_rate}")
    if int(num_classes) < 1:
        problems.append(f"num_classes must be at least 1, got {num_classes}")
    if stem not in STEMS:
        problems.append(f"stem must be one of {', '.join(STEMS)}, got {stem!r}")
    if int(stem_stride) < 1 or (stem == "imagenet" and int(stem_stride) != 1):
        problems.append(f"stem_stride must be 1 or more (and 1 for the imagenet stem), got {stem_stride}")
    if problems:
        raise ConfigError("; ".join(problems))


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (trainable or not) of ``model``."""
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------
# inference: a fused, exact equivalent for evaluation and prediction

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


def _bn_relu(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """relu(x * scale + shift): an eval-mode batch norm and ReLU in two cheap passes."""
    return torch.addcmul(shift, x, scale).relu_()


class _InferenceLayer(nn.Module):
    """A dense layer for inference: norm2 folded into conv1 (conv1 -> norm2 is conv-then-BN)."""

    def __init__(self, layer: _DenseLayer, memory_format: torch.memory_format) -> None:
        super().__init__()
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
        out = _bn_relu(x, self.scale1, self.shift1)
        if not self.bottleneck:
            return F.conv2d(out, self.weight1, None, padding=1)
        out = F.conv2d(out, self.weight1, self.bias1).relu_()
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
    """BN-ReLU, then the 2x2 average pooling before the 1x1 convolution.

    Pooling and a bias-free 1x1 convolution are both linear and act on different axes, so their
    order does not change the result; pooling first gives the convolution a quarter of the work.
    """

    def __init__(self, transition: _Transition, memory_format: torch.memory_format) -> None:
        super().__init__()
        scale, shift = _scale_shift(transition.norm)
        self.scale, self.shift = _frozen(scale), _frozen(shift)
        self.weight = _frozen(transition.conv.weight, memory_format)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(F.avg_pool2d(_bn_relu(x, self.scale, self.shift), 2), self.weight)


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
        self.stem_stride = 4 if model.config["stem"] == "imagenet" else int(model.config["stem_stride"])
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
            x = F.max_pool2d(x.relu_(), kernel_size=3, stride=2, padding=1)
        for stage in self.stages:
            x = stage(x)
        x = _bn_relu(x, self.scale5, self.shift5)
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
    - the other batch norms (norm1, the transitions', norm5), which precede a ReLU, become one
      multiply-add and an in-place ReLU;
    - each dense block fills one preallocated map instead of concatenating per layer;
    - transitions pool before their 1x1 convolution (a quarter of the work, same result);
    - on the CPU, large batches run in chunks whose feature maps stay in the cache;
    - weights and inputs are channels_last unless ``channels_last=False``.

    The result never records gradients; use the original model for training or saliency.
    """
    if not isinstance(model, DenseNet):
        return model
    param = next(model.parameters())
    return InferenceDenseNet(model, channels_last=channels_last).to(device=param.device, dtype=param.dtype)


# --------------------------------------------------------------------------------------------
# factories


def _named(model: DenseNet, name: str) -> DenseNet:
    model.config["name"] = name
    return model


def densenet121_cifar(num_classes: int = 10, **overrides: Any) -> DenseNet:
    """DenseNet-121 (k=32, blocks 6-12-24-16) with a 3x3 stride-1 stem for 32x32 images."""
    kwargs = dict(growth_rate=32, block_config=(6, 12, 24, 16), num_init_features=64, stem="cifar")
    return _named(DenseNet(**{**kwargs, "num_classes": num_classes, **overrides}), "densenet121-cifar")


def densenet_bc_mini(num_classes: int = 10, **overrides: Any) -> DenseNet:
    """A 0.3M-parameter DenseNet-BC for CPU demos: 24-channel 3x3 stride-2 stem, k=12, blocks 6-12-8."""
    kwargs = dict(growth_rate=12, block_config=(6, 12, 8), num_init_features=24, bn_size=4,
                  compression=0.5, stem="cifar", stem_stride=2)
    return _named(DenseNet(**{**kwargs, "num_classes": num_classes, **overrides}), "densenet-bc-mini")


def densenet_cpu(name: str, growth_rate: int, block_config: tuple[int, ...]):
    """A DenseNet shaped for training on a CPU in minutes (see docs/TRAINING.md for how it was chosen).

    Basic dense layers (BN-ReLU-Conv3x3, no bottleneck: few wide convolutions run far faster per
    FLOP on a CPU than many narrow ones), a large growth rate, compression 0.5, and a 3x3 stride-2
    stem of 54 = 2 x 27 channels: exactly the size of a patch-whitening filter bank of 3x3 colour
    patches (``densenet train --whiten``), so the blocks work at 16, 8 and 4 pixels.
    """

    def build(num_classes: int = 10, **overrides: Any) -> DenseNet:
        kwargs = dict(growth_rate=growth_rate, block_config=block_config, num_init_features=54, bn_size=0,
                      compression=0.5, stem="cifar", stem_stride=2)
        return _named(DenseNet(**{**kwargs, "num_classes": num_classes, **overrides}), name)

    build.__name__ = name.replace("-", "_")
    build.__doc__ = (f"{name}: basic DenseNet, k={growth_rate}, blocks {'-'.join(map(str, block_config))}, "
                     "54-channel 3x3/2 stem for whitening.")
    return build


def _imagenet(name: str, growth_rate: int, block_config: tuple[int, ...], num_init_features: int):
    def build(num_classes: int = 1000, **overrides: Any) -> DenseNet:
        kwargs = dict(growth_rate=growth_rate, block_config=block_config,
                      num_init_features=num_init_features, stem="imagenet")
        return _named(DenseNet(**{**kwargs, "num_classes": num_classes, **overrides}), name)

    build.__name__ = name
    build.__doc__ = (f"{name} for ImageNet-sized images (k={growth_rate}, blocks "
                     f"{'-'.join(map(str, block_config))}, {num_init_features} stem channels).")
    return build


densenet121 = _imagenet("densenet121", 32, (6, 12, 24, 16), 64)
densenet161 = _imagenet("densenet161", 48, (6, 12, 36, 24), 96)
densenet169 = _imagenet("densenet169", 32, (6, 12, 32, 32), 64)
densenet201 = _imagenet("densenet201", 32, (6, 12, 48, 32), 64)
densenet264 = _imagenet("densenet264", 32, (6, 12, 64, 48), 64)


def densenet_bc(depth: int, growth_rate: int, num_classes: int = 10, **overrides: Any) -> DenseNet:
    """The paper's CIFAR DenseNet-BC of depth L: 3 blocks of (L-4)/6 bottleneck layers, 2k stem channels."""
    if depth < 10 or (depth - 4) % 6:
        raise ConfigError(f"DenseNet-BC depth must be 6n+4 with n >= 1 (10, 16, ..., 100, ...), got {depth}")
    n = (depth - 4) // 6
    kwargs = dict(growth_rate=growth_rate, block_config=(n, n, n), num_init_features=2 * growth_rate,
                  bn_size=4, compression=0.5, stem="cifar")
    return _named(DenseNet(**{**kwargs, "num_classes": num_classes, **overrides}),
                  f"densenet-bc-{depth}-{growth_rate}")


def densenet_basic(depth: int, growth_rate: int, num_classes: int = 10, **overrides: Any) -> DenseNet:
    """The paper's basic CIFAR DenseNet of depth L: 3 blocks of (L-4)/3 layers, 16 stem channels."""
    if depth < 7 or (depth - 4) % 3:
        raise ConfigError(f"basic DenseNet depth must be 3n+4 with n >= 1 (7, 10, ..., 40, ...), got {depth}")
    n = (depth - 4) // 3
    kwargs = dict(growth_rate=growth_rate, block_config=(n, n, n), num_init_features=16, bn_size=0,
                  compression=1.0, stem="cifar")
    return _named(DenseNet(**{**kwargs, "num_classes": num_classes, **overrides}),
                  f"densenet-{depth}-{growth_rate}")


# --------------------------------------------------------------------------------------------
# registry


@dataclass(frozen=True)
class _Entry:
    builder: Callable[..., nn.Module]
    description: str


_MODELS: dict[str, _Entry] = {}
_ARCHS: dict[str, Callable[..., nn.Module]] = {"densenet": DenseNet}
_GENERIC = (
    (re.compile(r"densenet-bc-(\d+)-(\d+)"), densenet_bc),
    (re.compile(r"densenet-(\d+)-(\d+)"), densenet_basic),
)


def register_model(name: str, builder: Callable[..., nn.Module], description: str) -> None:
    """Make ``builder`` available to :func:`create_model` as ``name``.

    ``builder(**kwargs)`` receives ``num_classes`` (when given) and the caller's overrides and
    returns a model whose ``config`` has an ``"arch"`` known to :func:`register_arch`.
    """
    _MODELS[name.lower()] = _Entry(builder, description)


def register_arch(arch: str, builder: Callable[..., nn.Module]) -> None:
    """Let :func:`model_from_config` rebuild configs with ``config["arch"] == arch``."""
    _ARCHS[arch] = builder


def _paper_bc(depth: int, k: int):
    return lambda **kw: densenet_bc(depth, k, **kw)


def _paper_basic(depth: int, k: int):
    return lambda **kw: densenet_basic(depth, k, **kw)


register_model("densenet-bc-mini", densenet_bc_mini,
               "CPU demo DenseNet-BC: 24-ch 3x3/2 stem, k=12, blocks 6-12-8, CIFAR")
register_model("densenet-cpu-s", densenet_cpu("densenet-cpu-s", 64, (2, 3, 2)),
               "CPU-trainable basic DenseNet: 54-ch 3x3/2 stem (whitening), k=64, blocks 2-3-2, CIFAR")
register_model("densenet121-cifar", densenet121_cifar, "DenseNet-121 (k=32, 6-12-24-16) with a 3x3 stem, CIFAR")
register_model("densenet-40-12", _paper_basic(40, 12), "paper's basic DenseNet L=40 k=12, CIFAR")
register_model("densenet-100-12", _paper_basic(100, 12), "paper's basic DenseNet L=100 k=12, CIFAR")
register_model("densenet-100-24", _paper_basic(100, 24), "paper's basic DenseNet L=100 k=24, CIFAR")
register_model("densenet-bc-100-12", _paper_bc(100, 12), "paper's DenseNet-BC L=100 k=12, CIFAR")
register_model("densenet-bc-250-24", _paper_bc(250, 24), "paper's DenseNet-BC L=250 k=24, CIFAR")
register_model("densenet-bc-190-40", _paper_bc(190, 40), "paper's DenseNet-BC L=190 k=40, CIFAR")
register_model("densenet121", densenet121, "DenseNet-121 (k=32, 6-12-24-16), ImageNet stem")
register_model("densenet161", densenet161, "DenseNet-161 (k=48, 6-12-36-24, 96 stem ch), ImageNet stem")
register_model("densenet169", densenet169, "DenseNet-169 (k=32, 6-12-32-32), ImageNet stem")
register_model("densenet201", densenet201, "DenseNet-201 (k=32, 6-12-48-32), ImageNet stem")
register_model("densenet264", densenet264, "DenseNet-264 (k=32, 6-12-64-48), ImageNet stem")


def list_models() -> list[str]:
    """Names of the registered models (generic ``densenet-bc-{L}-{k}``/``densenet-{L}-{k}`` also work)."""
    return list(_MODELS)


def describe_models() -> list[dict[str, Any]]:
    """Each registered model's name, description, default classes, stem and parameter count.

    The models are built on the ``meta`` device, so this is fast and allocates no weights.
    """
    rows = []
    for name, entry in _MODELS.items():
        with torch.device("meta"):
            model = entry.builder()
        config = getattr(model, "config", {})
        rows.append({"name": name, "description": entry.description, "params": count_parameters(model),
                     "num_classes": config.get("num_classes"), "stem": config.get("stem")})
    return rows


def _resolve(name: str) -> Callable[..., nn.Module]:
    key = name.strip().lower()
    if key in _MODELS:
        return _MODELS[key].builder
    for pattern, factory in _GENERIC:
        match = pattern.fullmatch(key)
        if match:
            depth, k = int(match.group(1)), int(match.group(2))
            return lambda **kw: factory(depth, k, **kw)
    close = difflib.get_close_matches(key, list(_MODELS), n=4, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ConfigError(f"unknown model {name!r}{hint} (see `densenet analyze --list`; generic names "
                      f"densenet-bc-L-k and densenet-L-k also work)")


def create_model(name: str, num_classes: int | None = None, **overrides: Any) -> nn.Module:
    """Build the model called ``name`` (see :func:`list_models`), freshly initialised.

    ``num_classes`` None keeps the entry's default (10 for CIFAR models, 1000 for ImageNet ones);
    ``overrides`` replace constructor arguments, e.g. ``memory_efficient=True`` or ``drop_rate=0.2``.
    """
    builder = _resolve(name)
    kwargs = dict(overrides)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    try:
        model = builder(**kwargs)
    except TypeError as exc:  # an override the constructor does not take
        raise ConfigError(f"cannot build {name!r} with {sorted(kwargs)}: {exc}") from None
    if isinstance(getattr(model, "config", None), dict):
        model.config["name"] = name.strip().lower()
    return model


def model_from_config(config: Mapping[str, Any]) -> nn.Module:
    """Rebuild a model from its ``model.config`` (its ``"arch"`` selects the class)."""
    if not isinstance(config, Mapping) or "arch" not in config:
        raise ConfigError("model config must be a mapping with an 'arch' entry")
    kwargs = dict(config)
    arch = kwargs.pop("arch")
    name = kwargs.pop("name", None)
    if arch not in _ARCHS:
        raise ConfigError(f"unknown model arch {arch!r}; known: {', '.join(sorted(_ARCHS))}")
    try:
        model = _ARCHS[arch](**kwargs)
    except TypeError as exc:
        raise ConfigError(f"model config does not fit arch {arch!r}: {exc}") from None
    if isinstance(getattr(model, "config", None), dict):
        model.config["name"] = name
    return model


# --------------------------------------------------------------------------------------------
# loading torchvision-format state dicts

_LEGACY_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|"
                         r"running_var|num_batches_tracked))$")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _canonical_key(key: str) -> str:
    changed = True
    while changed:  # DataParallel/DDP ("module.") and torch.compile ("_orig_mod.") wrappers, nested
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    match = _LEGACY_KEY.match(key)
    if match:  # old torchvision checkpoints: "denselayer1.norm.1.weight" -> "denselayer1.norm1.weight"
        key = match.group(1) + match.group(2)
    return key


def _shape(t: Any) -> str:
    return "x".join(map(str, t.shape)) if t.dim() else "scalar"


def load_state_dict_compat(model: nn.Module, state_dict: Mapping[str, Any]) -> nn.Module:
    """Load a torchvision-format state dict into ``model`` strictly; returns ``model``.

    Accepts the legacy ``norm.1``/``conv.2`` key form, ``module.`` (DataParallel/DDP) and
    ``_orig_mod.`` (torch.compile) prefixes, and checkpoints without ``num_batches_tracked``.
    Any missing or unexpected key or shape mismatch raises :class:`WeightsError` naming the
    first offending key.
    """
    if not isinstance(state_dict, Mapping):
        raise WeightsError(f"expected a state dict (mapping of names to tensors), got {type(state_dict).__name__}")
    converted: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if not isinstance(value, Tensor):
            raise WeightsError(f"state dict entry {key!r} is a {type(value).__name__}, not a tensor")
        converted[_canonical_key(str(key))] = value

    expected = model.state_dict()
    problems = []
    for key, want in expected.items():
        if key not in converted:
            if key.endswith("num_batches_tracked"):  # absent from pre-2018 checkpoints; harmless
                converted[key] = want.clone()
                continue
            problems.append(f"missing key {key!r} (model expects shape {_shape(want)})")
        elif converted[key].shape != want.shape:
            problems.append(f"shape mismatch for {key!r}: checkpoint has {_shape(converted[key])}, "
                            f"model expects {_shape(want)}")
    for key, got in converted.items():
        if key not in expected:
            problems.append(f"unexpected key {key!r} with shape {_shape(got)} (not in the model)")
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise WeightsError(f"weights do not fit the model: {problems[0]}{more}")
    model.load_state_dict(converted, strict=True)
    return model


import densenet.resnet  # noqa: E402, F401  (registers the ResNet baselines; it imports this module)
