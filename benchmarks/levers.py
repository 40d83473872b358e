"""One lever at a time: what each change is worth for inference and for a training step.

All variants of a mode run in one process, interleaved round by round (variant 1, 2, ..., then
again), from the same weights and the same synthetic batch of densenet121-cifar; each figure is
the median of the rounds. Speed-ups are against the first variant (the textbook reference of
``benchmarks/reference.py``), as the median of the per-round ratios.

    .venv/bin/python benchmarks/levers.py --mode infer [--batch 256] [--rounds 5] [--compile]
    .venv/bin/python benchmarks/levers.py --mode train [--batch 64] [--rounds 5]

``--allocator retain`` (glibc keeps freed memory; process-wide, so it is a separate run) and
``--clock cpu`` (process CPU time; with ``--threads 1`` robust to a shared machine) as in compare.py.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import compare
import reference
from densenet import inference
from densenet.inference import optimize_for_inference
from densenet.runtime import cpu_name, set_malloc_policy


def infer_variants(batch: int, with_compile: bool) -> tuple[dict[str, Callable[[], None]], dict]:
    ref, ours = compare.models_pair()
    with torch.no_grad():
        ours.train()(torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(2)))
    ref = reference.load_from_densenet(ref, ours).eval()
    ours.eval()
    last = copy.deepcopy(ours).to(memory_format=torch.channels_last)
    fast = optimize_for_inference(ours)
    x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    x_last = x.contiguous(memory_format=torch.channels_last)
    notes = {}

    def no_grad(model, inp):
        with torch.no_grad():
            model(inp)

    def inference_mode(model, inp):
        with torch.inference_mode():
            model(inp)

    def unchunked():
        saved = inference.CHUNK_BYTES
        inference.CHUNK_BYTES = 2**62
        try:
            inference_mode(fast, x)
        finally:
            inference.CHUNK_BYTES = saved

    variants = {
        "reference (recursive cat, NCHW, no_grad)": lambda: no_grad(ref, x),
        "ours eager, NCHW, no_grad": lambda: no_grad(ours, x),
        "ours eager, channels_last, no_grad": lambda: no_grad(last, x_last),
        "ours eager, channels_last, inference_mode": lambda: inference_mode(last, x_last),
        "optimize_for_inference, one chunk": unchunked,
        "optimize_for_inference (default: cache-sized chunks)": lambda: inference_mode(fast, x),
    }
    if with_compile:
        compiled = torch.compile(fast)
        start = time.perf_counter()
        inference_mode(compiled, x)
        notes["compile_s"] = time.perf_counter() - start
        variants["optimize_for_inference + torch.compile"] = lambda: inference_mode(compiled, x)
    bf16 = {"bf16 autocast on optimize_for_inference (not exact)": lambda: _bf16_infer(fast, x)}
    variants.update(bf16)
    return variants, notes


def _bf16_infer(model, x) -> None:
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)


def train_variants(batch: int) -> tuple[dict[str, Callable[[], None]], dict]:
    ref, ours = compare.models_pair()
    ref.train()
    ours.train()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    x_last = x.contiguous(memory_format=torch.channels_last)

    def stepper(model, inp, foreach=None, amp=False):
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4, foreach=foreach)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                loss = F.cross_entropy(model(inp).float(), y)
            loss.backward()
            opt.step()

        return step

    last = lambda: copy.deepcopy(ours).to(memory_format=torch.channels_last)  # noqa: E731
    variants = {
        "reference (recursive cat, NCHW, default SGD)": stepper(ref, x),
        "ours, NCHW, default SGD": stepper(copy.deepcopy(ours), x),
        "ours, channels_last, default SGD": stepper(last(), x_last),
        "ours, channels_last, foreach SGD": stepper(last(), x_last, foreach=True),
        "ours, channels_last, foreach SGD, memory-efficient": stepper(last().set_memory_efficient(True), x_last,
                                                                       foreach=True),
        "ours, channels_last, foreach SGD, bf16 autocast (not exact)": stepper(last(), x_last, foreach=True,
                                                                               amp=True),
    }
    return variants, {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("infer", "train"), required=True)
    parser.add_argument("--batch", type=int, default=None, help="default 256 for infer, 64 for train")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (at least 5)")
    parser.add_argument("--compile", action="store_true", help="infer: add torch.compile (compile time reported)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--allocator", choices=("default", "retain", "release"), default="default",
                        help="glibc malloc policy (see densenet.runtime.set_malloc_policy), process-wide")
    parser.add_argument("--clock", choices=tuple(compare.CLOCKS), default="wall")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not set_malloc_policy(args.allocator):
        raise SystemExit(f"--allocator {args.allocator} needs glibc")
    compare.CLOCK["name"] = args.clock
    batch = args.batch or (256 if args.mode == "infer" else 64)
    rounds = max(5, args.rounds)
    load = list(os.getloadavg())
    print(f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, load average {load}; "
          f"densenet121-cifar {args.mode}, batch {batch}, {rounds} interleaved rounds, {args.clock} clock, "
          f"allocator {args.allocator}", flush=True)
    variants, notes = (infer_variants(batch, args.compile) if args.mode == "infer" else train_variants(batch))
    times = compare.interleaved(variants, rounds)
    names = list(variants)
    rates = {n: [batch / t for t in times[n]] for n in names}
    first = names[0]
    print("| variant | images/s (median) | speed-up vs reference (median of round ratios) |")
    print("|---|---|---|")
    rows = []
    for n in names:
        speedup = statistics.median(a / b for a, b in zip(rates[n], rates[first]))
        rows.append({"variant": n, "images_per_s": statistics.median(rates[n]), "speedup": speedup,
                     "rounds_images_per_s": rates[n]})
        print(f"| {n} | {statistics.median(rates[n]):,.1f} | {speedup:.2f}x |")
    for key, value in notes.items():
        print(f"{key}: {value:.1f}")
    end = list(os.getloadavg())
    print(f"load average at the end {end}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"cpu": cpu_name(), "threads": torch.get_num_threads(), "mode": args.mode, "batch": batch,
                       "rounds": rounds, "clock": args.clock, "allocator": args.allocator, "load_average": load,
                       "load_average_end": end, "rows": rows, "notes": notes}, f, indent=2)


if __name__ == "__main__":
    main()
