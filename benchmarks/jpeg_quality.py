"""How much the JPEG copy's compression costs: recompress an image folder at a lower quality.

The CIFAR-10 copy these recipes are measured on was recompressed as JPEG at quality 75 (4:2:0
colour; PSNR about 30 dB against the originals), and the originals are not available here. What
can be measured is the dose-response: recompress the copy once more at a lower quality, train the
same recipe on the result, and see how many points each further step of distortion costs. This
script writes such a copy (same ``train|test/<class>/NNNN.jpg`` layout, 4:2:0 like the source)
and prints the distortion it adds, mean absolute error and PSNR against the source::

    python benchmarks/jpeg_quality.py ../shared/data/cifar10-jpeg /tmp/cifar10-q50 --quality 50
    densenet train --recipe quick --data-dir /tmp/cifar10-q50 --out-dir runs/quick-q50

Training and test images are both recompressed, as in the copy itself.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image


def recompress(data: bytes, quality: int) -> tuple[bytes, np.ndarray, np.ndarray]:
    """One image's JPEG bytes at ``quality`` (4:2:0), with the source and result pixels (uint8 HWC)."""
    with Image.open(io.BytesIO(data)) as image:
        source = image.convert("RGB")
    out = io.BytesIO()
    source.save(out, format="JPEG", quality=quality, subsampling=2)
    with Image.open(io.BytesIO(out.getvalue())) as image:
        result = np.asarray(image.convert("RGB"))
    return out.getvalue(), np.asarray(source), result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="image folder with train/ and test/ (the JPEG copy)")
    parser.add_argument("out", type=Path, help="where the recompressed copy goes (must not exist)")
    parser.add_argument("--quality", type=int, required=True, help="JPEG quality, 1-95")
    args = parser.parse_args(argv)
    if not 1 <= args.quality <= 95:
        parser.error(f"--quality must be 1-95, got {args.quality}")
    files = sorted(p for split in ("train", "test") for p in (args.source / split).glob("*/*.jpg"))
    if not files:
        parser.error(f"no train/<class>/*.jpg or test/<class>/*.jpg under {args.source}")
    if args.out.exists():
        parser.error(f"{args.out} exists; choose a new directory")
    abs_sum = sq_sum = 0.0
    values = 0
    for path in files:
        data, before, after = recompress(path.read_bytes(), args.quality)
        target = args.out / path.relative_to(args.source)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        diff = after.astype(np.float64) - before
        abs_sum += np.abs(diff).sum()
        sq_sum += np.square(diff).sum()
        values += diff.size
    mse = sq_sum / values
    psnr = 10 * np.log10(255.0**2 / mse) if mse else float("inf")
    print(f"{len(files)} images at quality {args.quality}: mean absolute error {abs_sum / values:.2f} of 255, "
          f"MSE {mse:.1f}, PSNR {psnr:.2f} dB against {args.source}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
