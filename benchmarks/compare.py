"""densenet against the textbook way, in one process, interleaved: training step, inference, data pipeline.

Three comparisons, each as rounds of (reference, ours) run alternately so that both see the same
machine load; every figure is the median of the rounds, and the speed-up is given both as the
ratio of the medians and as the median of the per-round ratios.

- training step, densenet121-cifar, batch 64 by default: the textbook model of
  ``benchmarks/reference.py`` (recursive ``torch.cat``, NCHW, float32, eager, default SGD) against
  ours (``create_model``, channels_last, SGD with foreach, ``zero_grad(set_to_none=True)``).
  Both start from the same weights and see the same synthetic batch.
- inference, batch 256 by default: the reference in eval mode under ``torch.no_grad`` against
  ``optimize_for_inference(model)`` under ``torch.inference_mode``.
- data pipeline (random crop with 4 pixels of zero padding, horizontal flip, normalisation) of a
  batch of 512: the tutorial per-image pipeline of ``benchmarks/reference.py`` (a Dataset whose
  items go through PIL RandomCrop/flip, ToTensor and Normalize one by one, then the DataLoader's
  collate) against densenet's batched :class:`~densenet.augment.Augmenter` on the uint8 dataset
  tensor.
  Real CIFAR-10 test images when ``$DENSENET_DATA`` (or ``--data-dir``) holds them, else random ones.

    .venv/bin/python benchmarks/compare.py [--repeats 5] [--only train,infer,data] [--json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from datetime import date

import torch
import torch.nn.functional as F

import reference
from densenet.augment import Augmenter
from densenet.inference import optimize_for_inference
from densenet.registry import create_model
from densenet.runtime import cpu_name, set_malloc_policy

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
CLOCK = {"name": "wall"}


def interleaved(variants: dict[str, Callable[[], None]], rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds of each variant in each round; the variants run one after the other in every round.

    The clock is wall time, or with ``--clock cpu`` this process's CPU time (all its threads):
    robust to other processes taking turns on the cores, still sensitive to their cache use.
    """
    clock = CLOCKS[CLOCK["name"]]
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            start = clock()
            fn()
            times[name].append(clock() - start)
    return times


def summarise(times: dict[str, list[float]], images: int, ref: str = "reference", ours: str = "ours") -> dict:
    """Median images/s per variant, ratio of medians and median of the per-round ratios."""
    rates = {name: [images / t for t in ts] for name, ts in times.items()}
    medians = {name: statistics.median(r) for name, r in rates.items()}
    paired = [a / b for a, b in zip(rates[ours], rates[ref])]
    return {"images_per_s": medians, "rounds_images_per_s": rates,
            "ratio_of_medians": medians[ours] / medians[ref], "median_paired_ratio": statistics.median(paired)}


# ---- training step and inference -------------------------------------------------------------


def models_pair(seed: int = 0):
    torch.manual_seed(seed)
    ours = create_model("densenet121-cifar")
    ref = reference.load_from_densenet(reference.reference_densenet121_cifar(), ours)
    return ref, ours


def compare_train(batch: int, rounds: int, steps: int) -> dict:
    ref, ours = models_pair()
    ref.train()
    ours = ours.train().to(memory_format=torch.channels_last)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    x_last = x.contiguous(memory_format=torch.channels_last)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4, foreach=True)

    def ours_step() -> None:
        opt_ours.zero_grad(set_to_none=True)
        F.cross_entropy(ours(x_last), y).backward()
        opt_ours.step()

    # like for like: the same textbook model and step, in channels_last as ours
    ref_cl = copy.deepcopy(ref).to(memory_format=torch.channels_last)
    opt_ref_cl = torch.optim.SGD(ref_cl.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    variants = {
        "reference": lambda: [reference.reference_train_step(ref, opt_ref, x, y) for _ in range(steps)],
        "ours": lambda: [ours_step() for _ in range(steps)],
        "reference_channels_last": lambda: [reference.reference_train_step(ref_cl, opt_ref_cl, x_last, y)
                                            for _ in range(steps)],
    }
    times = interleaved(variants, rounds)
    result = summarise(times, batch * steps)
    result["like_for_like"] = summarise(times, batch * steps, ref="reference_channels_last")
    return result


def compare_infer(batch: int, rounds: int) -> dict:
    ref, ours = models_pair()
    with torch.no_grad():  # give the BN layers non-trivial statistics, the same in both
        ours.train()(torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(2)))
    ref = reference.load_from_densenet(ref, ours).eval()
    fast = optimize_for_inference(ours.eval())
    x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        error = (fast(x[:32]) - reference.reference_infer(ref, x[:32])).abs().max().item()

    def ours_infer() -> None:
        with torch.inference_mode():
            fast(x)

    result = summarise(interleaved({"reference": lambda: reference.reference_infer(ref, x), "ours": ours_infer},
                                   rounds), batch)
    result["max_abs_logit_difference"] = error
    return result


# ---- data pipeline ---------------------------------------------------------------------------


def load_images(n: int, data_dir: str | None) -> tuple[torch.Tensor, str]:
    path = data_dir or os.environ.get("DENSENET_DATA")
    if path:
        from densenet.data import load_dataset

        return load_dataset(path, split="test").images[:n].clone(), f"the first {n} CIFAR-10 test images"
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen), f"{n} random images"


def compare_data(batch: int, rounds: int, data_dir: str | None) -> dict:
    images, what = load_images(batch, data_dir)
    labels = torch.zeros(batch, dtype=torch.long)
    dataset = reference.ImageArrayDataset(images.permute(0, 2, 3, 1).numpy().copy(), labels.numpy(),
                                          reference.train_transform(CIFAR_MEAN, CIFAR_STD))
    order = torch.randperm(batch, generator=torch.Generator().manual_seed(4))
    augmenter = Augmenter(CIFAR_MEAN, CIFAR_STD)
    gen = torch.Generator().manual_seed(5)

    def per_image() -> None:  # what a DataLoader does for one batch (in its worker): items, then collate
        reference.collate([dataset[i] for i in order.tolist()])

    def batched() -> None:  # the dataset is one uint8 tensor; the batch is gathered and augmented at once
        augmenter(images, gen, index=order), labels[order]

    result = summarise(interleaved({"reference": per_image, "ours": batched}, rounds), batch)
    result["images"] = what
    return result


# ---- report ----------------------------------------------------------------------------------


def machine() -> dict:
    return {"cpu": cpu_name(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "date": date.today().isoformat(),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def format_table(results: dict, settings: dict) -> str:
    lines = ["| comparison | reference images/s | ours images/s | ratio of medians | median of round ratios |",
             "|---|---|---|---|---|"]
    labels = {"train": f"training step, densenet121-cifar, batch {settings['train_batch']}",
              "infer": f"inference, densenet121-cifar, batch {settings['infer_batch']}",
              "data": f"data pipeline (crop+flip+normalise), batch {settings['data_batch']}"}
    for key, r in results.items():
        ips = r["images_per_s"]
        lines.append(f"| {labels[key]} | {ips['reference']:,.1f} | {ips['ours']:,.1f} | "
                     f"{r['ratio_of_medians']:.2f}x | {r['median_paired_ratio']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds (median reported; at least 5)")
    parser.add_argument("--only", default="train,infer,data", help="comma-separated subset of train,infer,data")
    parser.add_argument("--train-batch", type=int, default=64)
    parser.add_argument("--train-steps", type=int, default=1, help="training steps per round and side")
    parser.add_argument("--infer-batch", type=int, default=256)
    parser.add_argument("--data-batch", type=int, default=512)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--allocator", choices=("default", "retain", "release"), default="default",
                        help="glibc malloc policy (see densenet.runtime.set_malloc_policy); both sides, process-wide")
    parser.add_argument("--clock", choices=tuple(CLOCKS), default="wall",
                        help="wall time, or this process's CPU time (robust to a shared machine; use with --threads 1)")
    parser.add_argument("--json", action="store_true", help="print everything as JSON")
    args = parser.parse_args()
    CLOCK["name"] = args.clock
    rounds = max(5, args.repeats)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not set_malloc_policy(args.allocator):
        raise SystemExit(f"--allocator {args.allocator} needs glibc")
    wanted = [w.strip() for w in args.only.split(",") if w.strip()]
    settings = {"train_batch": args.train_batch, "train_steps": args.train_steps, "infer_batch": args.infer_batch,
                "data_batch": args.data_batch, "rounds": rounds, "allocator": args.allocator, "clock": args.clock}
    info = machine()
    if not args.json:
        print(f"{info['cpu']}, {info['threads']} threads, torch {info['torch']}, {info['date']}, "
              f"load average {info['load_average']}; {rounds} interleaved rounds, {args.clock} clock, "
              f"allocator {args.allocator}",
              flush=True)
    results = {}
    t0 = time.perf_counter()
    for key in wanted:
        if key == "train":
            results[key] = compare_train(args.train_batch, rounds, args.train_steps)
        elif key == "infer":
            results[key] = compare_infer(args.infer_batch, rounds)
        elif key == "data":
            results[key] = compare_data(args.data_batch, rounds, args.data_dir)
        else:
            raise SystemExit(f"unknown comparison {key!r}; choose from train, infer, data")
        if not args.json:
            print(format_table({key: results[key]}, settings).splitlines()[-1], flush=True)
            if "like_for_like" in results[key]:
                like = results[key]["like_for_like"]
                print(f"  like for like (reference in channels_last too, "
                      f"{like['images_per_s']['reference_channels_last']:,.1f} images/s): "
                      f"{like['ratio_of_medians']:.2f}x (median of round ratios {like['median_paired_ratio']:.2f}x)",
                      flush=True)
    info["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    info["seconds"] = time.perf_counter() - t0
    if args.json:
        print(json.dumps({"machine": info, "settings": settings, "results": results}, indent=2))
    else:
        print(format_table(results, settings))
        if "data" in results:
            print(f"data: {results['data']['images']}")
        if "infer" in results:
            print(f"inference outputs agree: max |logit difference| {results['infer']['max_abs_logit_difference']:.2e}")
        print(f"load average at the end {info['load_average_end']}; {info['seconds']:.0f} s in all")


if __name__ == "__main__":
    main()
