"""What a model is made of, stage by stage (the library behind ``densenet analyze``).

For every stage (stem, dense blocks, transitions, head) it reports the output shape, the
parameters and the forward multiply-accumulates (MACs) and FLOPs per image, then totals, the
number of direct connections inside the dense blocks and the fp32 weight size.

Operations are counted with :class:`torch.utils.flop_counter.FlopCounterMode`, which counts
convolutions and matrix products only; one multiply-accumulate is two FLOPs. Batch norm, ReLU,
pooling and concatenation are not counted (the usual convention: torchvision's published
"GFLOPS" are these MACs).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from densenet.errors import ConfigError

__all__ = ["analyze_model", "format_analysis", "default_input_size"]

COUNTING_NOTE = ("MACs = multiply-accumulates of convolutions and linear layers (torchvision's "
                 "'GFLOPS' are these); FLOPs = 2 x MACs; BN, ReLU, pooling and concatenation are not counted.")


def default_input_size(model: nn.Module) -> int:
    """32 for CIFAR-stem models, 224 for ImageNet-stem ones (and models without a stem setting)."""
    config = getattr(model, "config", None) or {}
    return 32 if config.get("stem") == "cifar" else 224


def _stages(model: nn.Module) -> list[tuple[str, list[str]]]:
    if hasattr(model, "stages"):
        return model.stages()
    return [(name, [name]) for name, _ in model.named_children()]


def _connections(model: nn.Module) -> list[int]:
    """Direct connections per dense block: layer l of a block gets l inputs, L(L+1)/2 in all."""
    blocks = (getattr(model, "config", None) or {}).get("block_config") or []
    return [n * (n + 1) // 2 for n in blocks]


def _depth(model: nn.Module) -> int:
    """Weighted layers (convolutions and linear layers): the number in a DenseNet's name."""
    return sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())


def analyze_model(model: nn.Module, input_size: int | None = None) -> dict[str, Any]:
    """Per-stage output shapes, parameters, MACs and FLOPs of one forward pass of one image.

    The model runs once in eval mode without gradients on an all-zero image of
    ``3 x input_size x input_size`` on its own device (a model on the ``meta`` device works and
    computes nothing). Returns a JSON-ready dict; see :func:`format_analysis` for its text form.
    """
    size = int(input_size or default_input_size(model))
    if size < 1:
        raise ConfigError(f"input size must be positive, got {size}")
    stages = _stages(model)
    modules = dict(model.named_modules())
    first_param = next(model.parameters(), None)
    device = first_param.device if first_param is not None else torch.device("cpu")

    counter = FlopCounterMode(display=False)
    marks: dict[str, dict[str, Any]] = {name: {} for name, _ in stages}
    hooks = []
    for name, members in stages:
        mark = marks[name]
        hooks.append(modules[members[0]].register_forward_pre_hook(
            lambda _m, _args, mark=mark: mark.__setitem__("start", counter.get_total_flops())))
        hooks.append(modules[members[-1]].register_forward_hook(
            lambda _m, _args, out, mark=mark: mark.update(end=counter.get_total_flops(),
                                                          shape=list(out.shape[1:]))))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad(), counter:
            model(torch.zeros(1, 3, size, size, device=device))
    except RuntimeError as exc:
        name = (getattr(model, "config", None) or {}).get("name") or type(model).__name__
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"input size {size} does not work for {name}: {reason}") from None
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()

    rows = []
    for name, members in stages:
        params = {id(p): p.numel() for m in members for p in modules[m].parameters()}
        flops = marks[name]["end"] - marks[name]["start"]
        rows.append({"stage": name, "output_shape": marks[name]["shape"], "params": sum(params.values()),
                     "macs": flops // 2, "flops": flops})
    total_flops = counter.get_total_flops()
    counted = sum(r["flops"] for r in rows)
    if counted != total_flops:  # work done outside the listed stages
        rows.append({"stage": "other", "output_shape": None, "params": 0,
                     "macs": (total_flops - counted) // 2, "flops": total_flops - counted})
    total_params = sum(p.numel() for p in model.parameters())
    connections = _connections(model)
    config = dict(getattr(model, "config", None) or {})
    return {
        "model": config.get("name") or type(model).__name__,
        "config": config,
        "input_shape": [3, size, size],
        "stages": rows,
        "total": {"params": total_params, "macs": total_flops // 2, "flops": total_flops},
        "depth": _depth(model),
        "connections": sum(connections),
        "connections_per_block": connections,
        "weight_size_mb": total_params * 4 / 1e6,
        "note": COUNTING_NOTE,
    }


def _shape_text(shape: list[int] | None) -> str:
    return "x".join(map(str, shape)) if shape else "-"


def _describe_config(config: dict[str, Any]) -> str:
    if config.get("arch") != "densenet":
        return ", ".join(f"{k}={v}" for k, v in config.items() if k not in ("arch", "name"))
    bottleneck = f"bottleneck {config['bn_size']}k" if config["bn_size"] else "basic layers"
    stem = config["stem"] + (f" stride {config['stem_stride']}" if config["stem_stride"] != 1 else "") + (
        " + 2x2 max-pool" if config.get("stem_pool") else "")
    return (f"k={config['growth_rate']}, blocks {'-'.join(map(str, config['block_config']))}, "
            f"{config['num_init_features']} stem channels, {bottleneck}, compression {config['compression']:g}, "
            f"{stem} stem, {config['num_classes']} classes")


def format_analysis(data: dict[str, Any]) -> str:
    """The text table printed by ``densenet analyze``."""
    total = data["total"]
    lines = [f"{data['model']}: {_describe_config(data['config'])}",
             f"input {_shape_text(data['input_shape'])}, per image, forward pass",
             "",
             f"{'stage':<14}{'output':>14}{'params':>14}{'MACs':>16}{'FLOPs':>16}"]
    for row in data["stages"]:
        lines.append(f"{row['stage']:<14}{_shape_text(row['output_shape']):>14}{row['params']:>14,}"
                     f"{row['macs']:>16,}{row['flops']:>16,}")
    lines.append(f"{'total':<14}{'':>14}{total['params']:>14,}{total['macs']:>16,}{total['flops']:>16,}")
    lines.append("")
    lines.append(f"parameters:         {total['params']:,} ({total['params'] / 1e6:.2f} M)")
    lines.append(f"MACs:               {total['macs'] / 1e9:.3f} G")
    lines.append(f"FLOPs:              {total['flops'] / 1e9:.3f} G")
    lines.append(f"weighted layers:    {data['depth']} (convolutions + linear)")
    if data["connections_per_block"]:
        parts = " + ".join(map(str, data["connections_per_block"]))
        lines.append(f"dense connections:  {data['connections']:,} ({parts}; L(L+1)/2 per block)")
    lines.append(f"fp32 weights:       {data['weight_size_mb']:.1f} MB (parameters x 4 bytes, 1 MB = 10^6 bytes)")
    lines.append(data["note"])
    return "\n".join(lines)
