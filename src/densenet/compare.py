"""``densenet compare``: models side by side, measured on this machine.

For every model it reports parameters and MACs per image (from :func:`densenet.analysis.analyze_model`),
the peak memory of training at a given batch size, training and inference throughput in
images/s, and, given run directories of ``densenet train``, their test accuracy. It prints a
markdown table and writes ``compare.md``, ``compare.json`` and ``compare.png``.

Memory and speed are measured in a fresh child process per model (:func:`measure_model`), so
that one model's allocations never count for another. On the CPU the memory is the child's peak
resident set size during the training steps minus its resident size before the model is built
(after importing torch and one step of a one-convolution model, which allocates what any first step
allocates once): weights, gradients, optimizer state and the activations of a step (Linux:
VmHWM and VmRSS of ``/proc/self/status``, with the peak reset at the baseline; elsewhere
``ru_maxrss``). On a CUDA device it is ``torch.cuda.max_memory_allocated``. Training steps are
SGD with momentum on random data of the model's input size (forward, cross-entropy, backward,
update); inference is a forward pass under ``torch.inference_mode`` of the model
:func:`densenet.inference.fast_inference_model` gives (what ``densenet evaluate`` and ``predict``
run: on the CPU in fp32 a DenseNet's ``optimize_for_inference``; ResNets as they are). One step of each is run
first as a warm-up and not timed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from densenet.analysis import analyze_model, default_input_size
from densenet.errors import ConfigError, DenseNetError, ResourceError
from densenet.files import atomic_write_text
from densenet.inference import fast_inference_model
from densenet.plots import plot_comparison
from densenet.registry import create_model, model_from_config
from densenet.rundir import read_run
from densenet.runtime import current_rss_mb, peak_rss_mb, resolve_device

__all__ = ["measure_model", "compare", "format_table", "add_arguments", "run"]

CHILD_MARK = "DENSENET-COMPARE-RESULT "


# --------------------------------------------------------------------------------------------
# measuring one model (in a child process)


def _memory_mb() -> tuple[float, float]:
    """(current, peak) resident set size of this process in MiB (:mod:`densenet.runtime`'s readers)."""
    return current_rss_mb(), peak_rss_mb()


def _prime(device) -> None:
    """One training step of a one-convolution model, so that the baseline already includes what
    the first step of any model allocates once (kernels, thread pools, autograd engine)."""
    import torch
    import torch.nn.functional as F

    conv = torch.nn.Conv2d(3, 4, 3, padding=1).to(device)
    optimizer = torch.optim.SGD(conv.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(2, 3, 8, 8, device=device).contiguous(memory_format=torch.channels_last)
    F.cross_entropy(conv(x).mean(dim=(2, 3)), torch.zeros(2, dtype=torch.long, device=device)).backward()
    optimizer.step()
    with torch.inference_mode():
        conv(x)


def _measure_here(spec: dict[str, Any]) -> dict[str, Any]:
    """The measurement itself; runs inside the child process started by :func:`measure_model`."""
    import time

    import torch
    import torch.nn.functional as F


    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    device = resolve_device(spec.get("device", "auto"))
    _prime(device)
    try:  # Linux: reset this process's peak RSS (VmHWM) to its current RSS
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    baseline_mb, _ = _memory_mb()
    torch.manual_seed(0)
    model = model_from_config(spec["config"])
    size = int(spec.get("input_size") or default_input_size(model))
    batch, steps = int(spec["batch_size"]), int(spec["steps"])
    memory_format = torch.channels_last if spec.get("channels_last", True) else torch.contiguous_format
    model = model.to(device=device, memory_format=memory_format)
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=memory_format)
    y = torch.randint(0, model.config["num_classes"], (batch,), device=device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    model.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    train_step()  # warm-up: allocates gradients and momentum buffers
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        train_step()
    sync()
    train_seconds = time.perf_counter() - start
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
        memory_mb, memory_kind = peak_mb, "cuda max_memory_allocated"
    else:
        _, peak_mb = _memory_mb()
        memory_mb, memory_kind = peak_mb - baseline_mb, "peak RSS minus RSS before building the model"

    model.eval()
    net = fast_inference_model(model, device) if spec.get("optimized", True) else model
    with torch.inference_mode():
        net(x)
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            net(x)
        sync()
        infer_seconds = time.perf_counter() - start
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "batch_size": batch,
        "steps": steps,
        "input_size": size,
        "channels_last": bool(spec.get("channels_last", True)),
        "inference_model": type(net).__name__,
        "train_memory_mb": memory_mb,
        "memory_measure": memory_kind,
        "peak_rss_mb": _memory_mb()[1],
        "baseline_rss_mb": baseline_mb,
        "train_images_per_second": batch * steps / train_seconds,
        "infer_images_per_second": batch * steps / infer_seconds,
    }


def _child_main() -> None:
    spec = json.loads(sys.argv[1])
    try:
        result = _measure_here(spec)
    except DenseNetError as exc:
        result = {"error": str(exc)}
    except RuntimeError as exc:  # out of memory and the like
        result = {"error": (str(exc).strip().splitlines() or [type(exc).__name__])[0]}
    print(CHILD_MARK + json.dumps(result), flush=True)


def measure_model(config: dict[str, Any], *, batch_size: int = 64, steps: int = 3, device: str = "auto",
                  channels_last: bool = True, optimized: bool = True, threads: int | None = None,
                  input_size: int | None = None, timeout: float | None = None) -> dict[str, Any]:
    """Training memory and train/inference images/s of the model ``config`` describes.

    Runs :func:`_measure_here` in a fresh Python process (see the module docstring) and returns
    its dict: ``train_memory_mb``, ``train_images_per_second``, ``infer_images_per_second``,
    ``peak_rss_mb``, ``baseline_rss_mb``, ``device``, ``threads`` and the settings used.
    """
    spec = {"config": config, "batch_size": batch_size, "steps": steps, "device": device,
            "channels_last": channels_last, "optimized": optimized, "threads": threads, "input_size": input_size}
    src = str(Path(__file__).resolve().parent.parent)  # so that the child imports this same package
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p))
    code = "from densenet.compare import _child_main; _child_main()"
    try:
        proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True,
                              env=env, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise ConfigError(f"measuring {config.get('name')} took longer than {timeout:g} s") from None
    lines = [line for line in proc.stdout.splitlines() if line.startswith(CHILD_MARK)]
    if not lines:
        tail = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        raise ConfigError(f"measuring {config.get('name')} failed in the child process: {tail}")
    result = json.loads(lines[-1][len(CHILD_MARK):])
    if "error" in result:
        raise ConfigError(f"measuring {config.get('name')} failed: {result['error']}")
    return result


# --------------------------------------------------------------------------------------------
# the comparison


def _subjects(models: list[str], run_dirs: list[str], num_classes: int | None) -> list[dict[str, Any]]:
    """One entry per model: its name, model config and the accuracies of its runs."""
    import torch


    subjects: dict[str, dict[str, Any]] = {}
    for name in models:
        with torch.device("meta"):
            model = create_model(name, num_classes=num_classes)
        key = model.config.get("name") or name
        subjects.setdefault(key, {"name": key, "config": dict(model.config), "runs": []})
    for run_dir in run_dirs:
        run = read_run(run_dir)
        if not run["model_config"]:
            raise ConfigError(f"{run_dir}: the run records no model config")
        key = run["model_name"]
        subject = subjects.setdefault(key, {"name": key, "config": dict(run["model_config"]), "runs": []})
        subject["runs"].append({"dir": str(run_dir), "test_acc": run["final_test_acc"],
                                "best_acc": run["best_acc"], "epochs": run["epochs_completed"]})
    if not subjects:
        raise ConfigError("name at least one MODEL or --run-dir")
    return list(subjects.values())


def compare(models: list[str], run_dirs: list[str] = (), *, batch_size: int = 64, steps: int = 3,
            device: str = "auto", channels_last: bool = True, optimized: bool = True, threads: int | None = None,
            num_classes: int | None = None, progress=None) -> list[dict[str, Any]]:
    """Measure every model (and the model of every run directory); one row dict per model."""
    import torch


    if batch_size < 1 or steps < 1:
        raise ConfigError(f"--batch-size and --steps must be positive, got {batch_size} and {steps}")
    rows = []
    for subject in _subjects(list(models), list(run_dirs), num_classes):
        if progress:
            progress(f"measuring {subject['name']} (batch {batch_size}, {steps} steps) ...")
        with torch.device("meta"):
            analysis = analyze_model(model_from_config(subject["config"]))
        measured = measure_model(subject["config"], batch_size=batch_size, steps=steps, device=device,
                                 channels_last=channels_last, optimized=optimized, threads=threads)
        accuracies = [r["test_acc"] for r in subject["runs"] if r["test_acc"] is not None]
        rows.append({
            "model": subject["name"],
            "arch": subject["config"].get("arch"),
            "params": analysis["total"]["params"],
            "macs": analysis["total"]["macs"],
            "input_shape": analysis["input_shape"],
            **measured,
            "test_acc": max(accuracies) if accuracies else None,
            "runs": subject["runs"],
        })
    return rows


def _accuracy(row: dict[str, Any]) -> str:
    accs = [r["test_acc"] for r in row["runs"] if r["test_acc"] is not None]
    return " / ".join(f"{100 * a:.2f}%" for a in accs) if accs else "-"


def format_table(rows: list[dict[str, Any]]) -> str:
    """The comparison as a markdown table (plus one line on how it was measured)."""
    first = rows[0]
    memory = "train memory (MiB)" if first["device"] == "cpu" else "train peak (MiB)"
    lines = [
        f"| model | params | MACs (G) | {memory} | train img/s | inference img/s | test accuracy |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(f"| {row['model']} | {row['params']:,} | {row['macs'] / 1e9:.3f} | {row['train_memory_mb']:,.0f} "
                     f"| {row['train_images_per_second']:.1f} | {row['infer_images_per_second']:.1f} | {_accuracy(row)} |")
    lines.append("")
    lines.append(f"Measured on {first['device_name']} ({first['device']}, {first['threads']} threads), batch "
                 f"{first['batch_size']}, {first['steps']} timed steps after one warm-up step, fp32, "
                 f"{'channels_last' if first['channels_last'] else 'NCHW'}, input {first['input_shape'][1]}x"
                 f"{first['input_shape'][2]}; memory: {first['memory_measure']}; MACs per image forward; "
                 f"inference models: {', '.join(sorted({r['inference_model'] for r in rows}))}.")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("models", nargs="*", metavar="MODEL", help="model names (see densenet analyze --list)")
    parser.add_argument("--run-dir", nargs="+", action="extend", default=[], metavar="RUN",
                        help="run directories of densenet train: their test accuracy joins their model's row")
    parser.add_argument("--batch-size", type=int, default=64, help="batch for memory and speed (default 64)")
    parser.add_argument("--steps", type=int, default=3, metavar="N", help="timed steps per measurement (default 3)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                        help="NHWC memory format, as densenet train uses by default (default on)")
    parser.add_argument("--optimized", action=argparse.BooleanOptionalAction, default=True,
                        help="time inference on the path densenet evaluate/predict use (on the CPU a DenseNet's "
                             "optimize_for_inference; default on)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--num-classes", type=int, default=None, help="classifier outputs of named models")
    parser.add_argument("--out", default="runs/compare", metavar="DIR",
                        help="where compare.md, compare.json and compare.png go (default runs/compare)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of the table")


def run(args: argparse.Namespace) -> int:
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads must be at least 1, got {args.threads}")
    resolve_device(args.device)
    rows = compare(args.models, args.run_dir, batch_size=args.batch_size, steps=args.steps, device=args.device,
                   channels_last=args.channels_last, optimized=args.optimized, threads=args.threads,
                   num_classes=args.num_classes,
                   progress=None if args.json else (lambda text: print(text, file=sys.stderr, flush=True)))
    table = format_table(rows)
    out = Path(args.out)
    try:
        atomic_write_text(out / "compare.md", table + "\n")
        atomic_write_text(out / "compare.json", json.dumps(rows, indent=2) + "\n")
        plot_comparison(rows, out / "compare.png")
    except OSError as exc:
        raise ResourceError(f"cannot write to {out}: {exc.strerror or exc} (use --out DIR)") from None
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(table)
        print(f"\nwrote {out / 'compare.md'}, {out / 'compare.json'}, {out / 'compare.png'}")
    return 0
