"""Inference speed on the CPU: ONNX Runtime against PyTorch's CPU paths.

For each model and batch size it times, interleaved (one measurement of every path per round, so
that load from other processes hits all of them alike), the median of ``--repeats`` rounds of:

* ``torch eager``: the model in eval mode under ``torch.inference_mode``, NCHW float32;
* ``torch channels_last``: the same with model and input in channels_last memory format;
* ``torch optimized``: :func:`densenet.inference.optimize_for_inference` (folded batch norms,
  preallocated block maps, channels_last), the package's fastest PyTorch path;
* ``onnxruntime``: the graph ``densenet export --dynamic-batch`` writes (symbolic batch);
* with ``--fixed``, ``onnxruntime fixed``: a graph exported for exactly this batch size;
* with ``--compile``, ``torch.compile``: inductor on the channels_last model, at the largest
  thread count only (its kernels are built for one; compile time reported apart).

ONNX Runtime sessions here do not spin while idle, so that their threads do not take the CPU from
PyTorch between runs in the same process.

Every path first checks its logits against eager PyTorch (max |difference| printed). Weights are
the random initial ones and inputs random normalised images: speed does not depend on either.
Prints a markdown table (images/s) and, with ``--json FILE``, writes the raw timings.

    .venv/bin/python benchmarks/onnx_vs_torch.py [--models densenet121-cifar densenet-bc-100-12]
        [--batches 1 256] [--threads 1 2] [--repeats 5] [--fixed] [--compile]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from functools import partial

import torch

from densenet.export import export_to_proto
from densenet.inference import optimize_for_inference
from densenet.onnx_runtime import OnnxModel, make_session
from densenet.registry import create_model


def timed(fn, min_seconds: float) -> float:
    """Seconds per call of ``fn``, averaged over as many calls as fit in ``min_seconds`` (at least 1)."""
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return elapsed / calls


def ort_model(model, batch: int | None, threads: int) -> OnnxModel:
    """ONNX Runtime on the model's graph: symbolic batch when ``batch`` is None, else fixed at ``batch``."""
    proto = export_to_proto(model, 32, dynamic_batch=batch is None, batch_size=batch or 1)
    session = make_session(proto.SerializeToString(), threads=threads, spinning=False, source="benchmark")
    return OnnxModel(session, {"config": model.config}, source="benchmark")


def bench_model(name: str, batches: list[int], threads_list: list[int], repeats: int, min_seconds: float,
                compile_: bool, fixed_graphs: bool) -> list[dict]:
    torch.manual_seed(0)
    model = create_model(name).eval()
    cl_model = create_model(name).eval().to(memory_format=torch.channels_last)
    cl_model.load_state_dict(model.state_dict())
    optimized = optimize_for_inference(model)
    dynamic = {n: ort_model(model, None, n) for n in threads_list}
    rows = []
    for batch in batches:
        x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
        x_cl = x.contiguous(memory_format=torch.channels_last)
        fixed = {n: ort_model(model, batch, n) for n in threads_list} if fixed_graphs else {}
        # (label, threads, function); torch's thread count is set before each call
        paths = []
        for n in threads_list:
            paths += [
                ("torch eager", n, partial(model, x)),
                ("torch channels_last", n, partial(cl_model, x_cl)),
                ("torch optimized", n, partial(optimized, x)),
                ("onnxruntime", n, partial(dynamic[n], x)),
            ]
            if fixed_graphs:
                paths.append(("onnxruntime fixed", n, partial(fixed[n], x)))
        compile_seconds = None
        with torch.inference_mode():
            if compile_:
                n = max(threads_list)
                torch.set_num_threads(n)
                compiled = torch.compile(cl_model)
                start = time.perf_counter()
                compiled(x_cl)
                compile_seconds = time.perf_counter() - start
                paths.append(("torch.compile", n, partial(compiled, x_cl)))
            torch.set_num_threads(max(threads_list))
            reference = model(x)
            diffs = {}
            for label, n, fn in paths:
                torch.set_num_threads(n)
                diffs[label] = max(diffs.get(label, 0.0), float((fn() - reference).abs().max()))
            times: dict[tuple[str, int], list[float]] = {(label, n): [] for label, n, _ in paths}
            for _ in range(repeats):
                for label, n, fn in paths:
                    torch.set_num_threads(n)
                    times[label, n].append(timed(fn, min_seconds))
        for n in threads_list:
            speed = {label: batch / statistics.median(t) for (label, m), t in times.items() if m == n}
            rows.append({"model": name, "batch": batch, "threads": n, "images_per_s": speed,
                         "seconds": {label: t for (label, m), t in times.items() if m == n},
                         "max_abs_diff": diffs, "compile_seconds": compile_seconds if n == max(threads_list) else None})
            best = max(speed.items(), key=lambda kv: kv[1])
            print(f"{name} batch {batch} threads {n}: " + ", ".join(f"{k} {v:.1f}" for k, v in speed.items())
                  + f" images/s; fastest {best[0]}", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r["images_per_s"]))
    lines = ["| model | batch | threads | " + " | ".join(keys) + " |", "|---|---|---|" + "---|" * len(keys)]
    for r in rows:
        top = max(r["images_per_s"].values())
        values = [r["images_per_s"].get(k) for k in keys]
        cells = ["–" if v is None else f"**{v:.1f}**" if v == top else f"{v:.1f}" for v in values]
        lines.append(f"| {r['model']} | {r['batch']} | {r['threads']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["densenet121-cifar", "densenet-bc-100-12"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 256])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--min-seconds", type=float, default=1.0, help="time per measurement (default 1)")
    parser.add_argument("--threads", nargs="+", type=int, default=sorted({1, torch.get_num_threads()}),
                        help="thread counts to measure every path with (default 1 and all cores)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (minutes to compile)")
    parser.add_argument("--fixed", action="store_true", help="also time graphs exported for each batch size")
    parser.add_argument("--json", default=None, help="write the raw results here")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"threads {args.threads}, load average before {os.getloadavg()[0]:.2f}", flush=True)
    rows = []
    for name in args.models:
        rows += bench_model(name, args.batches, args.threads, args.repeats, args.min_seconds, args.compile,
                            args.fixed)
    print(f"load average after {os.getloadavg()[0]:.2f}")
    print(table(rows))
    for r in rows:
        if r["threads"] != max(args.threads):
            continue
        diffs = ", ".join(f"{k} {v:.1e}" for k, v in r["max_abs_diff"].items())
        extra = f"; torch.compile first call {r['compile_seconds']:.0f} s" if r["compile_seconds"] else ""
        print(f"{r['model']} batch {r['batch']}: max |logit difference| vs eager: {diffs}{extra}")
    print("speed relative to onnxruntime (median over rounds of the ratio within a round; > 1: faster):")
    for r in rows:
        base = r["seconds"]["onnxruntime"]
        ratios = {k: statistics.median(b / t for b, t in zip(base, v)) for k, v in r["seconds"].items()
                  if k != "onnxruntime"}
        print(f"  {r['model']} batch {r['batch']} threads {r['threads']}: "
              + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "threads": args.threads, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
