"""``densenet export``: a trained model as a self-describing ONNX graph, checked against PyTorch.

Steps: load the weights, switch memory-efficient (checkpointed) layers off, trace the eval-mode
model with ``torch.onnx.export``, store the preprocessing contract in the graph's
``metadata_props`` (see :func:`densenet.onnx_runtime.onnx_metadata`), check the graph with
``onnx.checker``, run it in ONNX Runtime next to PyTorch on real test images (a fixed synthetic
batch when no dataset is found), and only when both agree write the file atomically.

Exporter: opsets 18 and above use the ``torch.export``-based exporter (``dynamo=True``, the default
of torch since 2.9; it needs onnxscript). It writes a clean graph of Conv/BatchNorm/Relu/Concat
nodes. That exporter cannot write opsets below 18 (its down-conversion fails on ReduceMean), so
``--opset`` 9-17 uses the older TorchScript exporter, which torch still ships but has deprecated.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import warnings
from pathlib import Path

import torch

from densenet import __version__
from densenet.data import PRETTY, load_dataset
from densenet.errors import ConfigError, DataError, DenseNetError
from densenet.files import atomic_write_bytes
from densenet.onnx_runtime import INPUT_NAME, OUTPUT_NAME, OnnxModel, make_session, onnx_metadata, require
from densenet.weights import load_model

__all__ = ["export_onnx", "export_to_proto", "compare_outputs", "check_images", "add_arguments", "run"]

DEFAULT_OPSET = 18
DYNAMO_MIN_OPSET = 18
MIN_OPSET = 9
TOLERANCE = 1e-4


# --- exporting --------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet():
    """Silence the exporters' progress lines, deprecation warnings and torchvision notices."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._export")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def exporter_for(opset: int) -> str:
    """``"dynamo"`` for opset 18 and above, ``"torchscript"`` below."""
    if opset < MIN_OPSET:
        raise ConfigError(f"--opset must be at least {MIN_OPSET}, got {opset}")
    return "dynamo" if opset >= DYNAMO_MIN_OPSET else "torchscript"


def export_to_proto(model: torch.nn.Module, input_size: int, *, opset: int = DEFAULT_OPSET,
                    dynamic_batch: bool = False, batch_size: int = 1):
    """Trace ``model`` (eval mode, CPU, float32) into an ``onnx.ModelProto``.

    The graph has one input ``input`` [N, 3, S, S] and one output ``logits`` [N, classes]; N is
    symbolic with ``dynamic_batch``, else fixed at ``batch_size``. A DenseNet's memory-efficient
    mode is switched off first (on ``model`` itself).
    """
    onnx = require("onnx", "ONNX export")
    exporter = exporter_for(opset)
    if exporter == "dynamo":
        require("onnxscript", "ONNX export")
    if hasattr(model, "set_memory_efficient"):
        model.set_memory_efficient(False)
    model = model.to("cpu", torch.float32).eval()
    example = torch.zeros(2 if dynamic_batch else batch_size, 3, input_size, input_size)
    names = {"input_names": [INPUT_NAME], "output_names": [OUTPUT_NAME]}
    with _quiet(), torch.no_grad():
        if exporter == "dynamo":
            shapes = ({0: torch.export.Dim("batch")},) if dynamic_batch else None  # by position
            program = torch.onnx.export(model, (example,), dynamo=True, opset_version=opset,
                                        dynamic_shapes=shapes, external_data=False, verbose=False, **names)
            proto = program.model_proto
        else:
            axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None
            buffer = io.BytesIO()
            torch.onnx.export(model, (example,), buffer, dynamo=False, opset_version=opset,
                              dynamic_axes=axes, **names)
            proto = onnx.load_from_string(buffer.getvalue())
    return proto


def _add_metadata(proto, props: dict[str, str]) -> None:
    """Replace the graph's metadata_props with ``props`` and name the producer."""
    for node in proto.graph.node:  # the exporter's per-node notes hold local source paths
        del node.metadata_props[:]
    del proto.metadata_props[:]
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "densenet"
    proto.producer_version = __version__
    name = json.loads(props["config"]).get("name") or "densenet"
    proto.doc_string = f"{name} exported by densenet {__version__}; see metadata 'preprocessing'"


# --- checking against PyTorch ---------------------------------------------------------------


def check_images(meta: dict, data_dir=None, count: int = 256) -> tuple[torch.Tensor, str]:
    """uint8 images to compare on, and a phrase saying what they are.

    ``count`` test images spread evenly over the test split when a dataset is found (``data_dir``,
    else ``$DENSENET_DATA``, else ``./data``), else ``count`` fixed random images (seed 0).
    """
    size = int(meta.get("input_size", 32))
    name = "cifar100" if len(meta["classes"]) == 100 else "cifar10"
    try:
        dataset = load_dataset(data_dir, name=name, split="test", image_size=size)
    except (DataError, ConfigError) as exc:
        reason = str(exc).split(";")[0]
        generator = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8, generator=generator)
        return images, f"{count} synthetic images (seed 0; no test data: {reason})"
    count = min(count, len(dataset))
    index = torch.linspace(0, len(dataset) - 1, count).round().long()

    return dataset.images[index], f"{count} {PRETTY.get(name, name)} test images from {dataset.root}"


def normalise(images: torch.Tensor, meta: dict) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float32 scaled to 0-1 and standardised with the meta's mean/std."""
    mean = torch.tensor(meta["mean"], dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(meta["std"], dtype=torch.float32).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


def compare_outputs(model: torch.nn.Module, other: torch.nn.Module, inputs: torch.Tensor,
                    batch_size: int = 256) -> dict:
    """Logits of ``model`` and ``other`` on ``inputs``: max abs difference and top-1 agreement.

    ``ties`` counts top-1 disagreements where PyTorch's two best logits are closer than the
    largest difference (a tie within numerical noise, not a real disagreement).
    """
    with torch.inference_mode():
        a = torch.cat([model(inputs[i : i + batch_size]) for i in range(0, len(inputs), batch_size)])
        b = torch.cat([other(inputs[i : i + batch_size]) for i in range(0, len(inputs), batch_size)])
    diff = float((a - b).abs().max())
    differ = a.argmax(1) != b.argmax(1)
    top2 = a.topk(2, dim=1).values if a.shape[1] > 1 else torch.cat([a, a - float("inf")], 1)
    ties = int((differ & ((top2[:, 0] - top2[:, 1]) <= diff)).sum())
    return {"images": len(inputs), "max_abs_diff": diff, "top1_agree": int((~differ).sum()),
            "ties": ties}


# --- the whole export -------------------------------------------------------------------------


def default_output(weights: Path) -> Path:
    """``model.onnx`` in the weights directory (beside the file when given a file); ``NAME.onnx`` in
    the current directory for a model shipped with the package."""
    if not weights.exists():
        return Path(f"{weights.name}.onnx")
    return (weights if weights.is_dir() else weights.parent) / "model.onnx"


def export_onnx(weights, out=None, *, opset: int = DEFAULT_OPSET, dynamic_batch: bool = True, batch_size: int = 1,
                data_dir=None, check_count: int = 256, tolerance: float = TOLERANCE) -> dict:
    """Export the weights at ``weights`` to ``out`` and return a report of the checks.

    Raises :class:`DenseNetError` (and writes nothing) when the checker rejects the graph or ONNX
    Runtime's logits differ from PyTorch's by more than ``tolerance`` or in top-1 class.
    """
    onnx = require("onnx", "ONNX export")
    require("onnxruntime", "checking an ONNX export")
    if check_count < 1:
        raise ConfigError(f"--check-images must be at least 1, got {check_count}")
    weights = Path(weights)
    out = Path(out) if out else default_output(weights)
    if out.suffix != ".onnx":
        raise ConfigError(f"--out must name a .onnx file, got {out}")
    if weights.suffix == ".onnx":
        raise ConfigError(f"{weights} is already an ONNX graph; export from the PyTorch weights")
    model, meta = load_model(weights)
    size = int(meta.get("input_size", 32))
    exporter = exporter_for(opset)

    if not dynamic_batch and batch_size < 1:
        raise ConfigError(f"--fixed-batch must be at least 1, got {batch_size}")
    proto = export_to_proto(model, size, opset=opset, dynamic_batch=dynamic_batch, batch_size=batch_size)
    meta = {**meta, "config": {**meta["config"], "memory_efficient": False}}  # as exported
    label = f"torch {torch.__version__.split('+')[0]} {exporter} exporter, opset {opset}"
    _add_metadata(proto, onnx_metadata(meta, exporter=label))
    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise DenseNetError(f"onnx.checker rejects the exported graph: {str(exc).splitlines()[0]}") from None
    data = proto.SerializeToString()

    session_model = OnnxModel(make_session(data, source=out), meta, source=str(out))
    images, described = check_images(meta, data_dir, check_count)
    result = compare_outputs(model, session_model, normalise(images, meta))
    report = {
        "out": str(out), "bytes": len(data), "opset": opset, "exporter": exporter,
        "dynamic_batch": bool(dynamic_batch), "batch_size": None if dynamic_batch else int(batch_size),
        "checker": "passed", "compared_on": described,
        "tolerance": tolerance, **result,
    }
    real_disagreements = result["images"] - result["top1_agree"] - result["ties"]
    if result["max_abs_diff"] > tolerance or real_disagreements:
        raise DenseNetError(
            f"ONNX Runtime disagrees with PyTorch on {described}: max |logit difference| "
            f"{result['max_abs_diff']:.3g} (tolerance {tolerance:g}), top-1 differs on "
            f"{result['images'] - result['top1_agree']}; {out} not written"
        )
    atomic_write_bytes(out, data)
    return report


def format_report(report: dict) -> str:
    batch = ("dynamic batch" if report["dynamic_batch"] else
             f"fixed batch {report['batch_size']}: ONNX Runtime refuses any other batch size")
    ties = f" ({report['ties']} ties within noise)" if report["ties"] else ""
    return "\n".join([
        f"wrote {report['out']} ({report['bytes'] / 1e6:.2f} MB, opset {report['opset']}, {batch}, "
        f"{report['exporter']} exporter)",
        "onnx.checker: passed (full check)",
        f"ONNX Runtime vs PyTorch on {report['compared_on']}: max |logit difference| "
        f"{report['max_abs_diff']:.2e} (tolerance {report['tolerance']:g}), top-1 identical on "
        f"{report['top1_agree']}/{report['images']}{ties}",
    ])


# --- command line -----------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", required=True, metavar="PATH",
                        help="weights directory, model.safetensors, checkpoint or run directory")
    parser.add_argument("--format", default="onnx", choices=["onnx"], help="export format (default onnx)")
    parser.add_argument("--out", metavar="FILE", default=None,
                        help="output file (default: model.onnx in the weights directory)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                        help=f"ONNX opset (default {DEFAULT_OPSET}; below 18 uses the TorchScript exporter)")
    parser.add_argument("--dynamic-batch", action="store_true", default=True,
                        help="symbolic batch dimension: the graph takes any batch size (the default)")
    parser.add_argument("--fixed-batch", type=int, default=None, metavar="N",
                        help="instead, a graph that takes exactly N images per run")
    parser.add_argument("--data-dir", default=None,
                        help="dataset for the agreement check (default $DENSENET_DATA, else ./data)")
    parser.add_argument("--check-images", type=int, default=256, metavar="N",
                        help="test images to compare ONNX Runtime and PyTorch on (default 256)")
    parser.add_argument("--tolerance", type=float, default=TOLERANCE,
                        help=f"largest allowed |logit difference| (default {TOLERANCE:g})")


def run(args: argparse.Namespace) -> int:
    fixed = args.fixed_batch is not None
    report = export_onnx(args.weights, args.out, opset=args.opset, dynamic_batch=not fixed,
                         batch_size=args.fixed_batch if fixed else 1,
                         data_dir=args.data_dir, check_count=args.check_images, tolerance=args.tolerance)
    print(format_report(report))
    return 0
