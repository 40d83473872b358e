"""How much the JPEG copy's compression costs: recompress it at lower qualities, and scale the steps.

The CIFAR-10 copy these recipes are measured on was recompressed as JPEG at quality 75 (4:2:0
colour; PSNR about 30 dB against the originals), and the originals are not available here. What
can be measured is the dose-response: recompress the copy once more at a lower quality, train the
same recipe on the result, and see how many points each further step of distortion costs.

``recompress`` writes such a copy (same ``train|test/<class>/NNNN.jpg`` layout, training and test
images alike, 4:2:0 like the source) and prints the distortion it adds against the source::

    python benchmarks/jpeg_quality.py recompress ../shared/data/cifar10-jpeg /tmp/c10q50 --quality 50
    densenet train --recipe quick --data-dir /tmp/c10q50 --out-dir runs/quick-q50

``chain`` answers how far such a twice-compressed image lies from the *original*, which the copy
alone cannot tell (recompressed errors do not simply add). It cuts random squares out of lossless
photographs, scales each down to 32 x 32 by area averaging (CIFAR-sized images), compresses them
at 75 (the copy) and that at each lower quality, and prints the mean squared errors: original to
copy, copy to recompressed, original to recompressed. ``--copy-mse LO HI`` keeps the images whose
original-to-copy error lies in [LO, HI), to match the CIFAR copy's own (about 65)::

    python benchmarks/jpeg_quality.py chain photo1.png photo2.png ... --qualities 50 25 --copy-mse 40 90
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image

COPY_QUALITY = 75  # the CIFAR-10 copy's


def jpeg(pixels: np.ndarray, quality: int) -> tuple[bytes, np.ndarray]:
    """``pixels`` (uint8 HWC RGB) as JPEG bytes at ``quality`` with 4:2:0 colour, and those bytes decoded."""
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=quality, subsampling=2)
    with Image.open(io.BytesIO(out.getvalue())) as image:
        return out.getvalue(), np.asarray(image.convert("RGB"))


def mse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.square(a.astype(np.float64) - b).mean())


def recompress(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    files = sorted(p for split in ("train", "test") for p in (args.source / split).glob("*/*.jpg"))
    if not files:
        parser.error(f"no train/<class>/*.jpg or test/<class>/*.jpg under {args.source}")
    if args.out.exists():
        parser.error(f"{args.out} exists; choose a new directory")
    abs_sum = sq_sum = 0.0
    values = 0
    for path in files:
        try:
            with Image.open(path) as image:
                before = np.asarray(image.convert("RGB"))
        except OSError as exc:
            parser.error(f"cannot read {path}: {exc}")
        data, after = jpeg(before, args.quality)
        target = args.out / path.relative_to(args.source)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        diff = after.astype(np.float64) - before
        abs_sum += np.abs(diff).sum()
        sq_sum += np.square(diff).sum()
        values += diff.size
    error = sq_sum / values
    psnr = 10 * np.log10(255.0**2 / error) if error else float("inf")
    print(f"{len(files)} images at quality {args.quality}: mean absolute error {abs_sum / values:.2f} of 255, "
          f"MSE {error:.1f}, PSNR {psnr:.2f} dB against {args.source}")
    return 0


def small_crops(paths: list[Path], per_photo: int, smallest: int, seed: int) -> list[np.ndarray]:
    """``per_photo`` random squares of at least ``smallest`` pixels from each photo, area-scaled to 32 x 32."""
    rng = np.random.default_rng(seed)
    crops = []
    for path in paths:
        with Image.open(path) as image:
            photo = image.convert("RGB")
        width, height = photo.size
        if min(width, height) < smallest:
            raise ValueError(f"{path} is {width}x{height}, smaller than --smallest {smallest}")
        for _ in range(per_photo):
            side = int(rng.integers(smallest, min(width, height) + 1))
            x, y = int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))
            crops.append(np.asarray(photo.crop((x, y, x + side, y + side)).resize((32, 32), Image.BOX)))
    return crops


def chain(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        crops = small_crops(args.photos, args.per_photo, args.smallest, args.seed)
    except (OSError, ValueError) as exc:
        parser.error(str(exc))
    rows = []
    for original in crops:
        _, copy = jpeg(original, COPY_QUALITY)
        row = [mse(original, copy)]
        for quality in args.qualities:
            _, again = jpeg(copy, quality)
            row += [mse(copy, again), mse(original, again)]
        rows.append(row)
    table = np.array(rows)
    low, high = args.copy_mse
    kept = table[(table[:, 0] >= low) & (table[:, 0] < high)]
    if not len(kept):
        parser.error(f"no image has an original-to-copy MSE in [{low}, {high})")
    mean = kept.mean(axis=0)
    print(f"{len(kept)} of {len(table)} images (original-to-copy MSE in [{low}, {high})): "
          f"original to copy (quality {COPY_QUALITY}) MSE {mean[0]:.1f}")
    for i, quality in enumerate(args.qualities):
        step, total = mean[1 + 2 * i], mean[2 + 2 * i]
        print(f"quality {quality}: copy to recompressed MSE {step:.1f}, original to recompressed {total:.1f}, "
              f"added to the copy's {total - mean[0]:.1f} = {(total - mean[0]) / step:.2f} x the measured step")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    one = commands.add_parser("recompress", help="a further-compressed copy of an image folder of JPEGs")
    one.add_argument("source", type=Path, help="image folder with train/ and test/ (the JPEG copy)")
    one.add_argument("out", type=Path, help="where the recompressed copy goes (must not exist)")
    one.add_argument("--quality", type=int, required=True, help="JPEG quality, 1-95")
    two = commands.add_parser("chain", help="how far twice-compressed CIFAR-sized crops of photos lie from them")
    two.add_argument("photos", type=Path, nargs="+", help="lossless photographs (PNG)")
    two.add_argument("--qualities", type=int, nargs="+", default=[50, 25], help="the second compressions")
    two.add_argument("--per-photo", type=int, default=400, help="random squares cut from each photo")
    two.add_argument("--smallest", type=int, default=64, help="the smallest square's side in pixels")
    two.add_argument("--copy-mse", type=float, nargs=2, default=[0.0, float("inf")], metavar=("LO", "HI"),
                     help="keep images whose original-to-copy MSE lies in [LO, HI)")
    two.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    qualities = [args.quality] if args.command == "recompress" else args.qualities
    if not all(1 <= q <= 95 for q in qualities):
        parser.error(f"JPEG qualities must be 1-95, got {qualities}")
    return recompress(args, parser) if args.command == "recompress" else chain(args, parser)


if __name__ == "__main__":
    sys.exit(main())
