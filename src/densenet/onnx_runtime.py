"""Running an exported ``.onnx`` DenseNet with ONNX Runtime, behind the same interface as PyTorch.

``densenet export`` writes a self-describing graph: besides the network it stores, in the model's
``metadata_props``, everything needed to use it (see :func:`onnx_metadata`): the class names, the
input size, the per-channel mean and std of the preprocessing, the model config and a format
version. :func:`load_onnx_model` reads such a file and returns ``(model, meta)`` like
:func:`densenet.weights.load_model`: ``model`` is a :class:`OnnxModel`, a ``torch.nn.Module``
(whose only parameter is an empty device marker) whose forward runs the graph in ONNX Runtime, so evaluation and prediction code
written for PyTorch models runs it unchanged.

Only ``onnxruntime`` is needed to run a graph; exporting also needs ``onnx`` and ``onnxscript``.
All three come with the ``onnx`` extra (``pip install 'densenet[onnx]'``); without them a clear
one-line error says so.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from densenet.errors import ConfigError, WeightsError

__all__ = [
    "ONNX_FORMAT",
    "ONNX_FORMAT_VERSION",
    "INPUT_NAME",
    "OUTPUT_NAME",
    "OnnxModel",
    "load_onnx_model",
    "onnx_metadata",
    "meta_from_metadata",
    "require",
]

ONNX_FORMAT = "densenet-onnx"
ONNX_FORMAT_VERSION = 1
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
EXTRA_HINT = "pip install 'densenet[onnx]'"

# metadata_props keys whose values are JSON (the rest are plain strings)
_JSON_KEYS = ("config", "classes", "mean", "std", "input_size", "format_version", "training")


def require(module: str, purpose: str):
    """Import ``module`` or raise a :class:`ConfigError` naming the extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"{purpose} needs the '{module}' package, which is not installed: {EXTRA_HINT}") from None


def onnx_metadata(meta: dict, *, exporter: str = "") -> dict[str, str]:
    """The ``metadata_props`` written into an exported graph, from a weights meta dict.

    Values are strings; structured ones (config, classes, mean, std, input size, training) are JSON.
    ``preprocessing`` spells out in words what the input must be.
    """
    size = int(meta.get("input_size", 32))
    props = {
        "format": ONNX_FORMAT,
        "format_version": json.dumps(ONNX_FORMAT_VERSION),
        "config": json.dumps(meta["config"]),
        "classes": json.dumps(list(meta["classes"])),
        "mean": json.dumps([float(m) for m in meta["mean"]]),
        "std": json.dumps([float(s) for s in meta["std"]]),
        "input_size": json.dumps(size),
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "preprocessing": (
            f"RGB image resized to {size}x{size}, float32 NCHW [N, 3, {size}, {size}], pixel values "
            "divided by 255, then (x - mean[c]) / std[c] per channel c; the output is logits [N, classes] "
            "(softmax gives probabilities)"
        ),
        "training": json.dumps(meta.get("training") or {}),
    }
    if exporter:
        props["exporter"] = exporter
    if meta.get("sha256"):
        props["source_sha256"] = str(meta["sha256"])
    return props


def meta_from_metadata(props: dict[str, str], source) -> dict:
    """The meta dict (same keys as a weights ``model.json``) stored in a graph's ``metadata_props``."""
    if props.get("format") != ONNX_FORMAT:
        raise WeightsError(
            f"{source} is an ONNX graph without densenet metadata; export it with `densenet export`"
        )
    meta: dict = {}
    for key, value in props.items():
        if key in _JSON_KEYS:
            try:
                meta[key] = json.loads(value)
            except json.JSONDecodeError:
                raise WeightsError(f"{source}: metadata entry {key!r} is not valid JSON") from None
        else:
            meta[key] = value
    version = meta.get("format_version")
    if not isinstance(version, int) or version > ONNX_FORMAT_VERSION:
        raise WeightsError(
            f"{source}: densenet ONNX format version {version!r} is not one this package reads "
            f"(up to {ONNX_FORMAT_VERSION}); upgrade densenet"
        )
    missing = [k for k in ("config", "classes", "mean", "std", "input_size") if k not in meta]
    if missing:
        raise WeightsError(f"{source}: the ONNX metadata lacks {', '.join(missing)}")
    if len(meta["mean"]) != 3 or len(meta["std"]) != 3:
        raise WeightsError(f"{source}: the ONNX metadata needs 3 mean and 3 std values")
    return meta


class OnnxModel(torch.nn.Module):
    """An ONNX Runtime session that behaves like a DenseNet in eval mode.

    Calling it with a float tensor ``(N, 3, H, W)`` (already normalised, any memory format or
    float dtype) returns float32 logits ``(N, classes)`` on the input's device. A graph exported
    with a fixed batch size is run chunk by chunk (the last chunk zero-padded), so any N works.
    Its only parameter is an empty tensor that marks the device (code that asks
    ``next(model.parameters()).device`` gets the CPU); ``.eval()``, ``.to()`` and
    ``torch.inference_mode`` are harmless.
    """

    def __init__(self, session, meta: dict, source: str = "") -> None:
        super().__init__()
        self.session = session
        self.meta = meta
        self.config = meta["config"]
        self.source = source
        inp = session.get_inputs()[0]
        self.input_name = inp.name
        self.output_name = session.get_outputs()[0].name
        self.input_shape = list(inp.shape)
        self.batch_size = inp.shape[0] if isinstance(inp.shape[0], int) else None
        self.device_marker = torch.nn.Parameter(torch.empty(0), requires_grad=False)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        expected = self.input_shape[1:]
        if x.dim() != 4 or any(isinstance(e, int) and e != s for e, s in zip(expected, x.shape[1:])):
            raise ConfigError(
                f"the ONNX graph {self.source} takes inputs [N, {', '.join(map(str, expected))}], "
                f"got {list(x.shape)}"
            )
        array = x.detach().to("cpu", torch.float32).contiguous().numpy()
        if self.batch_size is None or array.shape[0] == self.batch_size:
            out = self._run(array)
        else:
            out = np.concatenate([self._run_padded(array[i : i + self.batch_size])
                                  for i in range(0, array.shape[0], self.batch_size)])
        return torch.from_numpy(out).to(x.device)

    def _run(self, array: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: array})[0]

    def _run_padded(self, chunk: np.ndarray) -> np.ndarray:
        n = chunk.shape[0]
        if n < self.batch_size:
            chunk = np.concatenate([chunk, np.zeros((self.batch_size - n, *chunk.shape[1:]), chunk.dtype)])
        return self._run(chunk)[:n]

    def extra_repr(self) -> str:
        batch = self.batch_size if self.batch_size is not None else "dynamic"
        return f"source={self.source!r}, batch={batch}, providers={self.session.get_providers()}"


def make_session(model: str | os.PathLike | bytes, *, threads: int | None = None, spinning: bool = True,
                 source=None):
    """An ONNX Runtime CPU inference session for a file or serialised graph; errors become WeightsError.

    ``threads`` sets the intra-op threads (default: one per physical core). With ``spinning=False``
    idle worker threads sleep instead of busy-waiting for the next run, which matters when PyTorch
    computes in the same process between runs (their threads would otherwise compete).
    """
    ort = require("onnxruntime", "running an .onnx model")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    if threads:
        options.intra_op_num_threads = int(threads)
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    source = source if source is not None else model
    try:
        return ort.InferenceSession(model if isinstance(model, bytes) else str(model), options,
                                    providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's errors derive from Exception only
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsError(f"{source} is not a usable ONNX model ({text})") from None


def load_onnx_model(path: str | os.PathLike, device: str | torch.device = "cpu", *,
                    threads: int | None = None) -> tuple[OnnxModel, dict]:
    """Open an exported graph: ``(OnnxModel, meta)``, the meta as stored by ``densenet export``.

    ONNX Runtime runs on the CPU here whatever ``device`` says (inputs and outputs are moved).
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"ONNX model not found: {path}")
    session = make_session(path, threads=threads, source=path)
    meta = meta_from_metadata(dict(session.get_modelmeta().custom_metadata_map), path)
    model = OnnxModel(session, meta, source=str(path))
    return model, meta
