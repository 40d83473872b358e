"""Weights on disk: safetensors files with a ``model.json`` beside them, and training checkpoints.

A weights directory holds ``model.safetensors`` (the state dict, contiguous tensors) and
``model.json``::

    {"format": "densenet-weights", "format_version": 1, "config": model.config,
     "classes": [...], "mean": [...], "std": [...], "input_size": 32, "training": {...},
     "sha256": "<hash of model.safetensors>"}

The same JSON is also stored in the safetensors header (key ``densenet``), so a lone
``model.safetensors`` file is enough to rebuild the model.

Checkpoints (``checkpoint-*.pt``) are written by ``densenet train``; they contain only tensors,
dicts, lists, numbers and strings so that they load with ``torch.load(weights_only=True)``. Nothing
here ever unpickles arbitrary objects. Every file is written atomically: a temporary file in the
same directory, flushed and synced, then renamed over the target, so a crash while saving leaves
the previous file intact.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import re
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from densenet.errors import ConfigError, WeightsError
from densenet.files import atomic_write_bytes, atomic_write_text
from densenet.pretrained import pretrained_names, resolve_weights
from densenet.registry import model_from_config

FORMAT = "densenet-weights"
FORMAT_VERSION = 1
CHECKPOINT_FORMAT = "densenet-checkpoint"
WEIGHTS_FILE = "model.safetensors"
META_FILE = "model.json"
CHECKPOINT_BEST = "checkpoint-best.pt"
CHECKPOINT_LAST = "checkpoint-last.pt"
CHECKPOINT_NAMES = (CHECKPOINT_BEST, CHECKPOINT_LAST)  # what a run directory is loaded from, in order


# --- atomic checkpoint files ----------------------------------------------------------------


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` through a synced temporary file and ``os.replace``.

    The checkpoint is serialised in memory first: torch's zip writer turns a failed write (a full
    disk) into a RuntimeError about stream positions, while a plain write raises the OSError.
    """
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return atomic_write_bytes(path, buffer.getbuffer())


# --- torchvision-format state dicts ---------------------------------------------------------

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



# --- weights directories ----------------------------------------------------------------------


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The plain DenseNet inside a ``torch.compile`` wrapper or an ``AveragedModel``."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, torch.optim.swa_utils.AveragedModel):
            model = model.module
        else:
            return model


def plain_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict as contiguous CPU tensors (channels_last weights become NCHW)."""
    return {k: v.detach().to("cpu").contiguous() for k, v in unwrap_model(model).state_dict().items()}


def make_meta(model, *, classes, mean, std, input_size=32, training=None) -> dict:
    """The ``model.json`` dictionary for ``model``."""
    config = getattr(unwrap_model(model), "config", None)
    if not isinstance(config, dict):
        raise WeightsError("the model has no .config dictionary; only DenseNet models can be saved")
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": config,
        "classes": list(classes),
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "input_size": int(input_size),
        "training": dict(training or {}),
    }


def save_model(directory: str | os.PathLike, model: torch.nn.Module, meta: dict) -> Path:
    """Write ``model.safetensors`` and ``model.json`` into ``directory`` (created if needed).

    ``meta`` needs ``classes``, ``mean``, ``std``; ``config``, ``format`` and ``format_version``
    are filled in from the model. Each file is replaced atomically, the weights first; the JSON
    records the weights' SHA-256 so that a mismatched pair is detected on loading.
    """
    from safetensors.torch import save as st_save

    missing = [k for k in ("classes", "mean", "std") if k not in meta]
    if missing:
        raise WeightsError(f"cannot save weights: meta lacks {', '.join(missing)}")
    full = make_meta(
        model,
        classes=meta["classes"],
        mean=meta["mean"],
        std=meta["std"],
        input_size=meta.get("input_size", 32),
        training=meta.get("training"),
    )
    for key, value in meta.items():
        full.setdefault(key, value)
    directory = Path(directory)
    header = json.dumps({k: v for k, v in full.items() if k != "sha256"})
    data = st_save(plain_state_dict(model), metadata={"densenet": header})
    full["sha256"] = hashlib.sha256(data).hexdigest()
    atomic_write_bytes(directory / WEIGHTS_FILE, data)
    atomic_write_text(directory / META_FILE, json.dumps(full, indent=2) + "\n")
    return directory


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """Load a model for inference: ``(model in eval mode, meta dict)``.

    ``path`` is the name of a shipped model (``densenet analyze --list``), a weights directory, a ``.safetensors`` file, a training checkpoint (``.pt``) or a
    run directory (its final weights, else ``checkpoint-best.pt``, else ``checkpoint-last.pt``).
    A ``.onnx`` file from ``densenet export`` gives a :class:`densenet.onnx_runtime.OnnxModel`
    that runs in ONNX Runtime (the ``onnx`` extra). The meta dict is also attached to the model as
    ``model.meta``. Problems raise :class:`WeightsError`.
    """
    path = resolve_weights(path)
    if path.suffix == ".onnx":
        from densenet.onnx_runtime import load_onnx_model

        return load_onnx_model(path, device)
    state, meta = load_state_and_meta(path)
    model = build_model(meta, state, source=path)
    model = model.to(device).eval()
    model.meta = meta
    return model, meta


def build_model(meta: dict, state: dict, source) -> torch.nn.Module:
    """A DenseNet built from ``meta["config"]`` with ``state`` loaded (via the models module)."""
    config = meta.get("config")
    if not isinstance(config, dict):
        raise WeightsError(f"{source}: the metadata has no model config")
    check_fit(config, state, source)
    model = _build(config, source)
    _load(model, state, config, source)
    return model


def check_fit(config: dict, state: dict, source) -> None:
    """Raise :class:`WeightsError` unless ``state`` fits the model ``config`` describes.

    Done on the meta device, which allocates nothing: a config that does not fit the file (one
    with growth_rate 100000, say) is refused before it can claim memory.
    """
    probe = _build(config, source, device="meta", max_parameters=len(state))
    _load(probe, state, config, source)


def _build(config: dict, source, device: str | None = None, max_parameters: int | None = None):
    try:
        with torch.device(device or "cpu"), _at_most_parameters(max_parameters):
            return model_from_config(config)
    except _TooManyParameters:
        raise WeightsError(f"{source}: the model config describes more tensors than the {max_parameters} "
                           "the file holds") from None
    except (ConfigError, WeightsError) as exc:
        raise WeightsError(f"{source}: cannot build the model it describes: {exc}") from None
    except (TypeError, ValueError, KeyError, AttributeError, OverflowError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsError(f"{source}: invalid model config ({first})") from None


def _load(model, state: dict, config: dict, source) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # loading into meta tensors is a no-op: there only shapes are checked
            load_state_dict_compat(model, state)
    except WeightsError as exc:
        raise WeightsError(f"{source}: weights do not fit the architecture {config.get('name', '')}: {exc}") from None
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise WeightsError(f"{source}: weights do not fit the architecture: {first}") from None


class _TooManyParameters(Exception):
    pass


@contextlib.contextmanager
def _at_most_parameters(limit: int | None):
    """Stop any model construction that registers more than ``limit`` parameters.

    A crafted model config (``block_config: [100000]``) would otherwise take minutes to build and
    could need far more memory than the weights file it comes with; a model that fits the file
    has no more parameters than the file has tensors.
    """
    count = 0

    def hook(module, name, param):
        nonlocal count
        count += 1
        if limit is not None and count > limit:
            raise _TooManyParameters

    handle = torch.nn.modules.module.register_module_parameter_registration_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def load_state_and_meta(path: str | os.PathLike) -> tuple[dict, dict]:
    """The state dict and meta dict stored at ``path`` (any of the layouts ``load_model`` takes, or
    the name of a model shipped with the package: see :mod:`densenet.pretrained`)."""
    path = resolve_weights(path)
    if not path.exists():
        shipped = pretrained_names()
        hint = f" (nor the name of a shipped model: {', '.join(shipped)})" if shipped else ""
        raise WeightsError(f"weights not found: {path}{hint}")
    if path.is_dir():
        if (path / WEIGHTS_FILE).is_file():
            return _read_safetensors(path / WEIGHTS_FILE)
        for name in CHECKPOINT_NAMES:
            if (path / name).is_file():
                return state_and_meta_from_checkpoint(load_checkpoint(path / name), path / name)
        raise WeightsError(
            f"{path} holds no {WEIGHTS_FILE} and no {CHECKPOINT_BEST}/{CHECKPOINT_LAST}"
        )
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    if path.suffix == ".json" and (path.parent / WEIGHTS_FILE).is_file():
        return _read_safetensors(path.parent / WEIGHTS_FILE)
    return state_and_meta_from_checkpoint(load_checkpoint(path), path)


def _read_safetensors(file: Path) -> tuple[dict, dict]:
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    try:
        data = file.read_bytes()
    except OSError as exc:
        raise WeightsError(f"cannot read {file}: {exc.strerror or exc}") from None
    try:
        state = st_load(data)
        embedded = _embedded_meta(data)
    except (SafetensorError, ValueError, OSError) as exc:
        raise WeightsError(f"{file} is not a valid safetensors file ({exc})") from None
    meta = None
    json_file = file.parent / META_FILE
    if json_file.is_file():
        try:
            meta = json.loads(json_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise WeightsError(f"{json_file} is not valid JSON ({exc})") from None
        if not isinstance(meta, dict):
            raise WeightsError(f"{json_file} does not hold a JSON object")
        digest = meta.get("sha256")
        if digest and digest != hashlib.sha256(data).hexdigest():
            raise WeightsError(
                f"{file} does not match {json_file} (SHA-256 differs): one was damaged, or the pair was not "
                "written together"
            )
    elif embedded is not None:
        meta = embedded
    if meta is None:
        raise WeightsError(f"{file} has no {META_FILE} beside it and no embedded model description")
    _check_meta(meta, json_file if json_file.is_file() else file)
    # the sha256 covers the copy of the description inside the weights file, not model.json itself
    if meta is not embedded and embedded is not None and _canonical(
            {k: v for k, v in meta.items() if k != "sha256"}) != _canonical(embedded):
        if isinstance(meta.get("config"), dict):  # a description of other weights is reported as that
            check_fit(meta["config"], state, json_file)
        raise WeightsError(
            f"{json_file} differs from the description stored inside {file.name} (damaged or edited); "
            f"restore it, or delete it to use the stored one"
        )
    return state, meta


def _canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True)


def _embedded_meta(data: bytes) -> dict | None:
    """The ``densenet`` JSON stored in a safetensors header (None when absent)."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n].decode("utf-8"))
    text = (header.get("__metadata__") or {}).get("densenet")
    return json.loads(text) if text else None


def _check_meta(meta: dict, source) -> None:
    """Refuse a description that would fail later (in predict or evaluate) with anything but a clear message."""
    if not isinstance(meta, dict):
        raise WeightsError(f"{source}: the model description is not a JSON object")
    if meta.get("format") != FORMAT:
        raise WeightsError(f"{source}: not a densenet weights description (format {meta.get('format')!r:.60})")
    version = meta.get("format_version", 0)
    if not _is_int(version):
        raise WeightsError(f"{source}: format_version must be an integer, got {version!r:.60}")
    if version > FORMAT_VERSION:
        raise WeightsError(
            f"{source}: format version {version} is newer than this package reads "
            f"({FORMAT_VERSION}); upgrade densenet"
        )
    for key in ("config", "classes", "mean", "std"):
        if key not in meta:
            raise WeightsError(f"{source}: the description lacks {key!r}")
    classes = meta["classes"]
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise WeightsError(f"{source}: 'classes' must be a non-empty list of names, got {classes!r:.60}")
    outputs = meta["config"].get("num_classes") if isinstance(meta["config"], dict) else None
    if outputs is not None and outputs != len(classes):
        raise WeightsError(f"{source}: the model has {outputs!r:.20} outputs but {len(classes)} class names")
    for key in ("mean", "std"):
        values = meta[key]
        if not (isinstance(values, list) and len(values) == 3 and all(_is_finite(v) for v in values)):
            raise WeightsError(f"{source}: {key!r} must be 3 finite numbers, got {values!r:.60}")
    if min(meta["std"]) <= 0:
        raise WeightsError(f"{source}: 'std' must be positive, got {meta['std']}")
    size = meta.get("input_size", 32)
    if not _is_int(size) or not 1 <= size <= 4096:
        raise WeightsError(f"{source}: 'input_size' must be an integer from 1 to 4096, got {size!r:.60}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# --- checkpoints ------------------------------------------------------------------------------


def save_checkpoint(path: str | os.PathLike, checkpoint: dict) -> Path:
    """Write a training checkpoint atomically (see the module docstring)."""
    return atomic_torch_save(checkpoint, path)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint with ``torch.load(weights_only=True)`` onto the CPU."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"checkpoint not found: {path}")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise WeightsError(f"cannot read {path}: {exc.strerror or exc}") from None
    _check_zip_crcs(path, data)
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except MemoryError:
        raise
    except Exception as exc:  # UnpicklingError, RuntimeError, KeyError, IndexError, ... from damaged bytes
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsError(f"{path} is not a readable checkpoint ({first})") from None
    if not isinstance(obj, dict):
        raise WeightsError(f"{path} does not hold a checkpoint dictionary")
    return obj


def _check_zip_crcs(path: Path, data: bytes) -> None:
    """Refuse a zip-format checkpoint whose stored CRC-32s do not match (torch.load does not check them).

    Without this, a flipped bit in the tensor data of a checkpoint loads silently as a wrong weight.
    Files that are not zip archives are left to ``torch.load`` to judge.
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, ValueError, OSError):
        return
    try:
        bad = archive.testzip()
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, NotImplementedError) as exc:
        raise WeightsError(f"{path} is corrupt ({exc})") from None
    if bad is not None:
        raise WeightsError(f"{path} is corrupt: the CRC-32 of its entry {bad} does not match (damaged on disk?)")


def state_and_meta_from_checkpoint(checkpoint: dict, source) -> tuple[dict, dict]:
    """The weights to evaluate from a checkpoint: the EMA model's when it has one."""
    if checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise WeightsError(
            f"{source} is not a densenet training checkpoint; plain state dicts need a {META_FILE} "
            "(save them with densenet.save_model)"
        )
    meta = checkpoint.get("meta")
    if not isinstance(meta, dict):
        raise WeightsError(f"{source}: the checkpoint has no model description")
    _check_meta(meta, source)
    ema = checkpoint.get("ema")
    if isinstance(ema, dict) and ema:
        state = {k[len("module.") :]: v for k, v in ema.items() if k.startswith("module.")}
    else:
        state = checkpoint.get("model")
    if not isinstance(state, dict) or not state:
        raise WeightsError(f"{source}: the checkpoint holds no model weights")
    return state, meta
