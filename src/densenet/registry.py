"""The model registry: every model by name, above the model files.

``create_model("densenet-bc-100-12")`` builds a registered model (``list_models()`` gives the names;
the generic names ``densenet-bc-{L}-{k}`` and ``densenet-{L}-{k}`` work for any valid depth);
``model_from_config(model.config)`` rebuilds a saved one by its ``"arch"``. The DenseNet family
(:mod:`densenet.models`) and the ResNet baselines (:mod:`densenet.resnet`) are registered here;
other architectures plug in with :func:`register_model` and :func:`register_arch`.
"""

from __future__ import annotations

import difflib
import inspect
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from densenet.errors import ConfigError
from densenet.models import (
    DenseNet,
    count_parameters,
    densenet121,
    densenet121_cifar,
    densenet161,
    densenet169,
    densenet201,
    densenet264,
    densenet_basic,
    densenet_bc,
    densenet_bc_mini,
    densenet_cpu,
)
from densenet.resnet import ResNet, resnet18_cifar, resnet34_cifar, resnet50_cifar

__all__ = ["create_model", "list_models", "describe_models", "model_from_config", "model_arguments",
           "register_model", "register_arch"]


@dataclass(frozen=True)
class _Entry:
    builder: Callable[..., nn.Module]
    description: str


_MODELS: dict[str, _Entry] = {}
_ARCHS: dict[str, Callable[..., nn.Module]] = {"densenet": DenseNet, "resnet": ResNet}
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
register_model("densenet-cpu-xs", densenet_cpu("densenet-cpu-xs", 48, (2, 3, 2)),
               "densenet-cpu-s with k=48: the 10-minute CPU recipe's model (more epochs fit), CIFAR")
register_model("densenet-cpu-k96", densenet_cpu("densenet-cpu-k96", 96, (1, 2, 2)),
               "basic DenseNet with a 54-ch 3x3/2 whitening stem, k=96, blocks 1-2-2: the 10-minute CPU recipe's "
               "model, CIFAR")
register_model("densenet-cpu-m", densenet_cpu("densenet-cpu-m", 64, (2, 3, 2), compression=1.0),
               "densenet-cpu-s without compression (theta=1): the 30-minute CPU recipe's model until densenet-cpu-m4, CIFAR")
register_model("densenet-cpu-l", densenet_cpu("densenet-cpu-l", 96, (2, 3, 2), compression=1.0),
               "densenet-cpu-m with k=96: the 90-minute CPU recipe's model until densenet-cpu-m4, CIFAR")
register_model("densenet-cpu-m4", densenet_cpu("densenet-cpu-m4", 64, (1, 2, 3, 2), compression=1.0, stem_stride=1),
               "densenet-cpu-m with a stride-1 stem and a first block at 32 pixels (blocks 1-2-3-2): the 30- and "
               "90-minute CPU recipes' model, CIFAR")
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
register_model("resnet18-cifar", resnet18_cifar, "ResNet-18 baseline (BasicBlock 2-2-2-2, 3x3 stem, no max-pool), CIFAR")
register_model("resnet34-cifar", resnet34_cifar, "ResNet-34 baseline (BasicBlock 3-4-6-3, 3x3 stem, no max-pool), CIFAR")
register_model("resnet50-cifar", resnet50_cifar, "ResNet-50 baseline (Bottleneck 3-4-6-3, 3x3 stem, no max-pool), CIFAR")


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


def model_arguments(name: str) -> frozenset[str]:
    """The constructor arguments the model called ``name`` takes: its class's (``DenseNet``'s for the
    whole family, ``ResNet``'s for the baselines). The model is built on the ``meta`` device."""
    with torch.device("meta"):
        model = _resolve(name)()
    return frozenset(inspect.signature(type(model).__init__).parameters) - {"self"}


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
