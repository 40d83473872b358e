"""The DenseNet family (Huang et al., "Densely Connected Convolutional Networks", CVPR 2017).

One :class:`DenseNet` class builds every member of the family from its hyper-parameters: the
ImageNet models (121/161/169/201/264), the CIFAR models of the paper (basic DenseNet L-k and
DenseNet-BC L-k) and the small CPU models. Parameter and buffer names follow torchvision's
``DenseNet`` exactly, so its checkpoints load with :func:`densenet.weights.load_state_dict_compat`.

This file holds the architecture and its builders only. Names (``create_model("densenet-bc-100-12")``)
live in :mod:`densenet.registry`; the fused inference equivalent in :mod:`densenet.inference`.
"""

from __future__ import annotations

import contextlib
import math
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from densenet.errors import ConfigError

__all__ = [
    "DenseNet",
    "count_parameters",
    "whiten_stem",
    "densenet121_cifar",
    "densenet_bc_mini",
    "densenet_cpu",
    "densenet121",
    "densenet161",
    "densenet169",
    "densenet201",
    "densenet264",
    "densenet_bc",
    "densenet_basic",
]

STEMS = ("imagenet", "cifar")
TRANSITION_POOLS = ("avg", "max")
TRANSITION_ORDERS = ("norm-conv-pool", "norm-pool-conv", "pool-norm-conv")
ACTIVATIONS = ("relu", "gelu")


# --------------------------------------------------------------------------------------------
# building blocks


def _activation(name: str) -> nn.Module:
    """The nonlinearity after each batch norm: in-place ReLU (the paper's) or GELU (exact, erf form)."""
    return nn.GELU() if name == "gelu" else nn.ReLU(inplace=True)


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
                 memory_efficient: bool, activation: str = "relu") -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(in_channels)
        self.relu1 = _activation(activation)
        if bn_size:
            width = bn_size * growth_rate
            self.conv1 = nn.Conv2d(in_channels, width, kernel_size=1, bias=False)
            self.norm2 = nn.BatchNorm2d(width)
            self.relu2 = _activation(activation)
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
                 drop_rate: float, memory_efficient: bool, activation: str = "relu") -> None:
        super().__init__()
        for i in range(num_layers):
            layer = _DenseLayer(in_channels + i * growth_rate, growth_rate, bn_size, drop_rate,
                                memory_efficient, activation)
            self.add_module(f"denselayer{i + 1}", layer)

    def forward(self, x: Tensor) -> Tensor:
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, dim=1)


class _Transition(nn.Sequential):
    """BN-ReLU-Conv1x1 to ``out_channels`` and 2x2/2 pooling (average, or max with ``pool="max"``).

    ``order`` places the pooling: ``"norm-conv-pool"`` (the paper's), ``"norm-pool-conv"`` (the 1x1
    convolution at the pooled resolution: a quarter of its work) or ``"pool-norm-conv"`` (the
    block's output pooled first, as plain networks pool a convolution's output before its batch
    norm: a quarter of the batch norm's and activation's work too). Average pooling and a
    bias-free 1x1 convolution are both linear and act on different axes, so with average pooling
    ``"norm-pool-conv"`` is the paper's function (to rounding) at a quarter of the convolution's
    cost; the default keeps the paper's order, which is what published operation counts measure.
    The modules keep their names and order (``norm``, ``relu``, ``conv``, ``pool``) whatever the
    order they run in, so the state_dict keys stay torchvision's.
    """

    def __init__(self, in_channels: int, out_channels: int, pool: str = "avg", activation: str = "relu",
                 order: str = "norm-conv-pool") -> None:
        super().__init__(OrderedDict([
            ("norm", nn.BatchNorm2d(in_channels)),
            ("relu", _activation(activation)),
            ("conv", nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)),
            ("pool", (nn.MaxPool2d if pool == "max" else nn.AvgPool2d)(kernel_size=2, stride=2)),
        ]))
        self.order = order

    def forward(self, x: Tensor) -> Tensor:
        if self.order == "pool-norm-conv":
            return self.conv(self.relu(self.norm(self.pool(x))))
        x = self.relu(self.norm(x))
        if self.order == "norm-pool-conv":
            return self.conv(self.pool(x))
        return self.pool(self.conv(x))


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
        stem_pool: a 2x2/2 max-pool after the CIFAR stem convolution (``pool0``): the convolution
            sees every pixel position at full resolution and the blocks start at half of it.
        transition_pool: the transitions' 2x2/2 pooling, ``"avg"`` (the paper's) or ``"max"``.
        transition_order: where a transition pools: ``"norm-conv-pool"`` (the paper's),
            ``"norm-pool-conv"`` or ``"pool-norm-conv"`` (see :class:`_Transition`; with average
            pooling the first two are the same function, the second at a quarter of the
            convolution's cost).
        activation: the nonlinearity after every batch norm, ``"relu"`` (the paper's) or ``"gelu"``;
            the modules keep their ``relu*`` names either way (no parameters, same state_dict keys).
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
        stem_pool: bool = False,
        transition_pool: str = "avg",
        activation: str = "relu",
        memory_efficient: bool = False,
        transition_order: str = "norm-conv-pool",
    ) -> None:
        super().__init__()
        bn_size = int(bn_size or 0)
        block_config = [int(n) for n in block_config]
        _check_config(growth_rate, block_config, num_init_features, bn_size, compression, drop_rate,
                      num_classes, stem, stem_stride, stem_pool, transition_pool, activation, transition_order)

        if stem == "imagenet":
            layers = [
                ("conv0", nn.Conv2d(3, num_init_features, kernel_size=7, stride=2, padding=3, bias=False)),
                ("norm0", nn.BatchNorm2d(num_init_features)),
                ("relu0", _activation(activation)),
                ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
            ]
        else:
            layers = [("conv0", nn.Conv2d(3, num_init_features, kernel_size=3, stride=stem_stride,
                                          padding=1, bias=False))]
            if stem_pool:
                layers.append(("pool0", nn.MaxPool2d(kernel_size=2, stride=2)))
        self.features = nn.Sequential(OrderedDict(layers))

        channels = num_init_features
        for b, num_layers in enumerate(block_config, start=1):
            block = _DenseBlock(num_layers, channels, growth_rate, bn_size, drop_rate, memory_efficient, activation)
            self.features.add_module(f"denseblock{b}", block)
            channels += num_layers * growth_rate
            if b < len(block_config):
                out_channels = math.floor(compression * channels)
                transition = _Transition(channels, out_channels, transition_pool, activation, transition_order)
                self.features.add_module(f"transition{b}", transition)
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
            "stem_pool": bool(stem_pool),
            "transition_pool": str(transition_pool),
            "transition_order": str(transition_order),
            "activation": str(activation),
            "memory_efficient": bool(memory_efficient),
        }
        self._init_weights()

    def _init_weights(self) -> None:
        if self.classifier.weight.is_meta:
            return  # meta tensors hold no values (and their random fills load torch._dynamo, 1.4 s)
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
        """The activation (ReLU or GELU), global average pooling and the classifier."""
        out = F.gelu(features) if self.config["activation"] == "gelu" else F.relu(features)
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
                  num_classes, stem, stem_stride, stem_pool=False, transition_pool="avg", activation="relu",
                  transition_order="norm-conv-pool") -> None:
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
    if stem_pool and stem != "cifar":
        problems.append("stem_pool adds a max-pool to the cifar stem only (the imagenet stem has its own)")
    if transition_pool not in TRANSITION_POOLS:
        problems.append(f"transition_pool must be one of {', '.join(TRANSITION_POOLS)}, got {transition_pool!r}")
    if transition_order not in TRANSITION_ORDERS:
        problems.append(f"transition_order must be one of {', '.join(TRANSITION_ORDERS)}, got {transition_order!r}")
    if activation not in ACTIVATIONS:
        problems.append(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    if problems:
        raise ConfigError("; ".join(problems))


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (trainable or not) of ``model``."""
    return sum(p.numel() for p in model.parameters())


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


def densenet_cpu(name: str, growth_rate: int, block_config: tuple[int, ...], compression: float = 0.5,
                 stem_stride: int = 2):
    """A DenseNet shaped for training on a CPU in minutes (see docs/TRAINING.md for how it was chosen).

    Basic dense layers (BN-ReLU-Conv3x3, no bottleneck: few wide convolutions run far faster per
    FLOP on a CPU than many narrow ones), a large growth rate, compression 0.5 (1.0 for
    densenet-cpu-m: its blocks at 8 and 4 pixels, where a convolution is cheap, get twice the
    input channels), and a 3x3 stride-2
    stem of 54 = 2 x 27 channels: exactly the size of a patch-whitening filter bank of 3x3 colour
    patches (``densenet train --whiten``), so the blocks work at 16, 8 and 4 pixels; with
    ``stem_stride=1`` (densenet-cpu-m4) a first block works at 32 pixels. (A stride-1 stem with a
    2x2 max-pool and no block at 32 pixels, ``stem_stride=1, stem_pool=True``, trained worse:
    docs/TRAINING.md.)
    """

    def build(num_classes: int = 10, **overrides: Any) -> DenseNet:
        kwargs = dict(growth_rate=growth_rate, block_config=block_config, num_init_features=54, bn_size=0,
                      compression=compression, stem="cifar", stem_stride=stem_stride)
        return _named(DenseNet(**{**kwargs, "num_classes": num_classes, **overrides}), name)

    build.__name__ = name.replace("-", "_")
    build.__doc__ = (f"{name}: basic DenseNet, k={growth_rate}, blocks {'-'.join(map(str, block_config))}, "
                     f"compression {compression:g}, 54-channel 3x3/{stem_stride} stem for whitening.")
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
