"""``densenet bench``: speed and peak memory of a model's training step or inference.

The inputs are synthetic (random normal images, random labels): the benchmark measures the model
and the step, not the data pipeline (``benchmarks/compare.py`` measures that). After ``--warmup``
untimed steps, each of ``--steps`` steps is timed on its own; the median gives ms per step and
images/s.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` over the timed steps; on the CPU the peak
resident set size (``VmHWM``, or ``ru_maxrss`` where there is no /proc) of a fresh child process that repeats the benchmark with one
warm-up and two timed steps (a process's peak RSS cannot be reset, and the parent's is polluted
by everything it did before). The child also reports its RSS just before its first step, so the
memory the steps themselves need can be told apart from the libraries, weights and inputs.

Device-dependent defaults are chosen in one place, :func:`auto_settings`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import date
from typing import Any

import torch
import torch.nn.functional as F

from densenet.analysis import default_input_size
from densenet.errors import ConfigError, DenseNetError
from densenet.inference import optimize_for_inference
from densenet.registry import create_model
from densenet.runtime import (
    ALLOCATORS,
    autocast,
    cpu_name,
    current_rss_mb,
    fast_amp,
    peak_rss_mb,
    resolve_device,
    set_malloc_policy,
)

__all__ = ["auto_settings", "run_benchmark", "format_result", "add_arguments", "run"]

MODES = ("train", "infer")
AMPS = ("auto", "none", "bf16", "fp16")
CHILD_STEPS, CHILD_WARMUP = 2, 1


def auto_settings(device: torch.device) -> dict[str, Any]:
    """The fastest safe settings for ``device``: what ``auto`` means for amp and friends.

    CUDA: bf16 autocast where the GPU supports it (fp16 needs loss scaling and bf16 does not),
    channels_last. CPU: float32 (bf16 autocast is available with ``--amp bf16`` but changes the
    numbers), channels_last, the inference path of :func:`densenet.inference.optimize_for_inference`.
    torch.compile is never automatic: it costs tens of seconds to minutes before the first step.
    """
    if device.type == "cuda":
        return {"amp": fast_amp(device), "channels_last": True, "optimized": True, "compile": False}
    return {"amp": "none", "channels_last": True, "optimized": True, "compile": False}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()}, {torch.get_num_threads()} threads"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _check(args: argparse.Namespace) -> None:
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.steps < 1 or args.warmup < 0:
        raise ConfigError(f"--steps must be at least 1 and --warmup at least 0, got {args.steps} and {args.warmup}")
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads must be at least 1, got {args.threads}")
    if args.image_size is not None and args.image_size < 8:
        raise ConfigError(f"--image-size must be at least 8, got {args.image_size}")
    if args.mode not in MODES:
        raise ConfigError(f"--mode must be one of {', '.join(MODES)}, got {args.mode!r}")


def _settings(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """The effective settings: ``auto`` and unset options resolved by :func:`auto_settings`."""
    auto = auto_settings(device)
    amp = auto["amp"] if args.amp == "auto" else args.amp
    channels_last = auto["channels_last"] if args.channels_last is None else args.channels_last
    optimized = args.mode == "infer" and (auto["optimized"] if args.optimized is None else args.optimized)
    if amp == "fp16" and device.type == "cpu" and args.mode == "train":
        raise ConfigError("--amp fp16 training needs CUDA (loss scaling); use --amp bf16 on the CPU")
    return {"amp": amp, "channels_last": bool(channels_last), "optimized": bool(optimized),
            "compile": bool(args.compile)}


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark described by parsed ``densenet bench`` arguments; returns the result dict."""
    _check(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not set_malloc_policy(args.allocator):
        raise ConfigError(f"--allocator {args.allocator} needs glibc (Linux)")
    device = resolve_device(args.device)
    s = _settings(args, device)
    torch.manual_seed(0)
    overrides = {"memory_efficient": True} if args.memory_efficient else {}
    model = create_model(args.model, **overrides)
    size = args.image_size or default_input_size(model)
    fmt = torch.channels_last if s["channels_last"] else torch.contiguous_format
    model = model.to(device=device, memory_format=fmt)
    num_classes = int(getattr(model, "config", {}).get("num_classes") or 10)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 3, size, size, generator=gen).to(device).contiguous(memory_format=fmt)
    y = torch.randint(0, num_classes, (args.batch_size,), generator=gen).to(device)

    if args.mode == "train":
        model.train()
        runner = torch.compile(model) if s["compile"] else model
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
        scaler = torch.amp.GradScaler(device.type) if s["amp"] == "fp16" else None

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            with autocast(device, s["amp"]):
                loss = F.cross_entropy(runner(x).float(), y)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
    else:
        model.eval()
        net = optimize_for_inference(model, channels_last=s["channels_last"]) if s["optimized"] else model
        runner = torch.compile(net) if s["compile"] else net

        def step() -> None:
            with torch.inference_mode(), autocast(device, s["amp"]):
                runner(x)

    rss_before = current_rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    first_s = None
    for i in range(args.warmup):
        start = time.perf_counter()
        step()
        _sync(device)
        if i == 0:
            first_s = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.steps):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)

    result: dict[str, Any] = {
        "model": args.model,
        "mode": args.mode,
        "batch_size": args.batch_size,
        "image_size": size,
        "input": "synthetic random",
        "device": str(device),
        "device_name": _device_name(device),
        **s,
        "memory_efficient": bool(args.memory_efficient),
        "allocator": args.allocator,
        "warmup": args.warmup,
        "steps": args.steps,
        "ms_per_step": median * 1e3,
        "ms_per_step_all": [t * 1e3 for t in times],
        "images_per_s": args.batch_size / median,
        "first_step_s": first_s,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "date": date.today().isoformat(),
    }
    if device.type == "cuda":
        result["peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        result["peak_memory_kind"] = "torch.cuda.max_memory_allocated over the timed steps"
    else:
        result["rss_before_mb"] = rss_before
        result["rss_peak_mb"] = peak_rss_mb()
    return result


def _child_memory(argv: list[str]) -> dict[str, float]:
    """Peak RSS of a fresh process running the same benchmark with 1 warm-up and 2 timed steps."""
    cmd = [sys.executable, "-m", "densenet", "bench", *argv, "--steps", str(CHILD_STEPS),
           "--warmup", str(CHILD_WARMUP), "--json", "--_child"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise DenseNetError(f"the memory-measuring child process failed (exit {proc.returncode}): {last}")
    child = json.loads(proc.stdout)
    return {"peak_memory_mb": child["rss_peak_mb"], "rss_before_mb": child["rss_before_mb"],
            "step_memory_mb": child["rss_peak_mb"] - child["rss_before_mb"]}


def format_result(r: dict[str, Any]) -> str:
    """A short human-readable report of a :func:`run_benchmark` result."""
    precision = "fp32" if r["amp"] == "none" else f"{r['amp']} autocast"
    flags = ["channels_last" if r["channels_last"] else "NCHW", precision,
             "torch.compile" if r["compile"] else "eager"]
    if r["mode"] == "infer":
        flags.append("optimize_for_inference" if r["optimized"] else "plain eval model")
    if r["memory_efficient"]:
        flags.append("memory-efficient")
    if r["allocator"] != "default":
        flags.append(f"allocator {r['allocator']}")
    times = r["ms_per_step_all"]
    lines = [
        f"{r['model']} {r['mode']}, batch {r['batch_size']}, {r['image_size']}x{r['image_size']}, "
        f"{r['device']} ({r['device_name']}), {', '.join(flags)}",
        f"{r['input']} inputs; {r['warmup']} warm-up + {r['steps']} timed steps; torch {r['torch']}",
        f"median {r['ms_per_step']:.1f} ms/step = {r['images_per_s']:.1f} images/s "
        f"(fastest {min(times):.1f} ms, slowest {max(times):.1f} ms)",
    ]
    if r.get("compile") and r.get("first_step_s") is not None:
        lines.append(f"first (compiling) step: {r['first_step_s']:.1f} s")
    if "peak_memory_mb" in r and "rss_before_mb" in r:
        lines.append(f"peak memory {r['peak_memory_mb']:.0f} MiB (peak RSS of a child process running "
                     f"{CHILD_WARMUP} warm-up + {CHILD_STEPS} steps; {r['rss_before_mb']:.0f} MiB before "
                     f"its first step, so the steps add {r['step_memory_mb']:.0f} MiB)")
    elif "peak_memory_mb" in r:
        lines.append(f"peak memory {r['peak_memory_mb']:.0f} MiB ({r['peak_memory_kind']})")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="densenet121-cifar", help="model name (default densenet121-cifar)")
    parser.add_argument("--mode", choices=MODES, default="train", help="a training step or an inference pass")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=None, help="default: 32 for CIFAR models, 224 otherwise")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    parser.add_argument("--amp", choices=AMPS, default="auto",
                        help="autocast precision; auto: bf16 on CUDA GPUs that support it, none on the CPU")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                        help="channels_last memory format (default on)")
    parser.add_argument("--optimized", action=argparse.BooleanOptionalAction, default=None,
                        help="infer with densenet.inference.optimize_for_inference (default on)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (first step compiles)")
    parser.add_argument("--memory-efficient", action="store_true",
                        help="recompute concatenations and BN/ReLU maps in backward (less memory)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--allocator", choices=ALLOCATORS, default="default",
                        help="glibc malloc policy: retain keeps freed memory (no page faults on re-allocation), "
                             "release returns it at once (resident memory follows the memory in use)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory child process (CPU)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)


def _child_argv(args: argparse.Namespace) -> list[str]:
    """The command-line arguments that reproduce ``args`` (steps, warm-up and output aside)."""
    argv = ["--model", args.model, "--mode", args.mode, "--batch-size", str(args.batch_size),
            "--device", args.device, "--amp", args.amp, "--allocator", args.allocator]
    if args.image_size:
        argv += ["--image-size", str(args.image_size)]
    if args.channels_last is not None:
        argv.append("--channels-last" if args.channels_last else "--no-channels-last")
    if args.optimized is not None:
        argv.append("--optimized" if args.optimized else "--no-optimized")
    if args.compile:
        argv.append("--compile")
    if args.memory_efficient:
        argv.append("--memory-efficient")
    if args.threads:
        argv += ["--threads", str(args.threads)]
    return argv


def run(args: argparse.Namespace) -> int:
    result = run_benchmark(args)
    if not args._child and result["device"] == "cpu":
        result.pop("rss_peak_mb", None)
        result.pop("rss_before_mb", None)
        if not args.no_memory:
            result.update(_child_memory(_child_argv(args)))
            result["peak_memory_kind"] = (f"peak RSS of a child process ({CHILD_WARMUP} warm-up + "
                                          f"{CHILD_STEPS} steps)")
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_result(result))
    return 0
