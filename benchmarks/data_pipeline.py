"""Throughput of the training input pipeline: crop + flip + normalise of one batch.

Compares densenet's batched Augmenter (all images at once, tensor operations) with the usual
per-image pipeline of a DataLoader (pad, random crop, flip, to tensor, normalise one image at a
time), in two flavours: PIL images (as torchvision's transforms do) and numpy arrays. Prints
images/s as the median of several repetitions and the speed-up.

    .venv/bin/python benchmarks/data_pipeline.py [--batch 512] [--repeats 15] [--device cpu] [--threads N]

Images are a batch of the real training set when ``--data-dir``/``$DENSENET_DATA`` holds one,
random images otherwise (the speed does not depend on the pixels).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np
import torch
from PIL import Image, ImageOps

from densenet.augment import Augmenter

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


def per_image_pil(images_hwc: list[np.ndarray], rng: np.random.Generator) -> torch.Tensor:
    """The classic per-image pipeline on PIL images, one image after the other."""
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    out = []
    for arr in images_hwc:
        img = ImageOps.expand(Image.fromarray(arr), border=4, fill=0)
        dy, dx = rng.integers(0, 9, 2)
        img = img.crop((dx, dy, dx + 32, dy + 32))
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        t = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255)
        out.append((t - mean) / std)
    return torch.stack(out)


def per_image_numpy(images_hwc: list[np.ndarray], rng: np.random.Generator) -> torch.Tensor:
    """The same per-image pipeline on numpy arrays."""
    mean = np.array(MEAN, np.float32)
    std = np.array(STD, np.float32)
    out = []
    for arr in images_hwc:
        padded = np.pad(arr, ((4, 4), (4, 4), (0, 0)))
        dy, dx = rng.integers(0, 9, 2)
        crop = padded[dy : dy + 32, dx : dx + 32]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        x = (crop.astype(np.float32) / 255 - mean) / std
        out.append(torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1))))
    return torch.stack(out)


def measure(fns: dict, repeats: int, sync=lambda: None) -> dict[str, float]:
    """Median seconds of each function over ``repeats`` rounds, after two warm-up rounds.

    The functions take turns within every round, so that they see the same load on a shared machine.
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(repeats + 2):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            sync()
            if r >= 2:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def load_batch(batch: int, data_dir: str | None) -> tuple[torch.Tensor, str]:
    path = data_dir or os.environ.get("DENSENET_DATA")
    if path:
        from densenet.data import load_dataset

        ds = load_dataset(path, split="test")
        return ds.images[:batch].clone(), f"first {batch} test images of {path}"
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8, generator=gen), "random images"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=15, help="timed repetitions (median reported; >= 5)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = max(5, args.repeats)

    images, what = load_batch(args.batch, args.data_dir)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    print(f"batch {args.batch} of {what}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, device {device}")

    aug = Augmenter(MEAN, STD)  # crop with 4 zero pixels of padding, flip, normalise; float32 NCHW
    on_device = images.to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    hwc = [img.permute(1, 2, 0).numpy().copy() for img in images]
    rng = np.random.default_rng(0)
    t = measure(
        {
            "batched": lambda: aug(on_device, gen),
            "pil": lambda: per_image_pil(hwc, rng),
            "numpy": lambda: per_image_numpy(hwc, rng),
        },
        repeats,
        sync,
    )
    batched, pil, npy = t["batched"], t["pil"], t["numpy"]

    n = args.batch
    print(f"batched Augmenter          {n / batched:12,.0f} images/s  ({batched * 1e3:8.2f} ms per batch)")
    print(f"per-image PIL pipeline     {n / pil:12,.0f} images/s  ({pil * 1e3:8.2f} ms per batch)")
    print(f"per-image numpy pipeline   {n / npy:12,.0f} images/s  ({npy * 1e3:8.2f} ms per batch)")
    print(f"speed-up: {pil / batched:.1f}x over PIL, {npy / batched:.1f}x over numpy "
          f"(median of {repeats} repetitions)")


if __name__ == "__main__":
    main()
