"""``densenet predict``: the top-k classes of image files, PIL images or uint8 tensors.

Images are prepared exactly as the image-folder datasets are (:func:`densenet.data.decode_image`):
any mode becomes RGB (alpha dropped, 16-bit scaled to 8 bits), then the whole image is resized,
not cropped, to the model's input size with Pillow's bicubic filter, which antialiases when
shrinking; finally it is normalised with the mean and std stored with the weights.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

from densenet.augment import Augmenter
from densenet.data import _to_rgb, decode_image
from densenet.errors import ConfigError, DataError, ImageError
from densenet.inference import fast_inference_model
from densenet.runtime import resolve_device
from densenet.weights import load_model

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}


def load_image(path: str | os.PathLike, size: int) -> torch.Tensor:
    """One image file as a uint8 tensor (3, size, size); unreadable files raise :class:`ImageError`."""
    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path}: no such file")
    if not path.is_file():
        raise ImageError(f"{path}: not a file")
    try:
        return torch.from_numpy(np.ascontiguousarray(decode_image(path, size)))
    except DataError as exc:
        message = str(exc).replace(" (remove it or replace it)", "").split("; remove it")[0]
        raise ImageError(message) from None
    except OSError as exc:  # unreadable (permissions) rather than corrupt
        raise ImageError(f"{path}: cannot read ({exc.strerror or exc})") from None


def image_to_tensor(image, size: int) -> torch.Tensor:
    """A path, PIL image or uint8 tensor (3, H, W) as a uint8 tensor (3, size, size)."""
    if isinstance(image, (str, os.PathLike)):
        return load_image(image, size)
    if isinstance(image, torch.Tensor):
        if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
            raise ImageError(f"tensor images must be uint8 (3, H, W), got {image.dtype} {tuple(image.shape)}")
        if image.shape[1] == 0 or image.shape[2] == 0:
            raise ImageError(f"the tensor image has no pixels: shape {tuple(image.shape)}")
        if tuple(image.shape[1:]) == (size, size):
            return image.cpu()
        import torch.nn.functional as F

        x = F.interpolate(image[None].float().cpu(), size=(size, size), mode="bicubic", antialias=True)
        return x[0].round().clamp(0, 255).to(torch.uint8)
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a dependency
        Image = None
    if Image is not None and isinstance(image, Image.Image):
        if 0 in image.size:
            raise ImageError(f"the image has no pixels: size {image.size[0]}x{image.size[1]}")

        img = _to_rgb(image)
        if img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=3.0)
        return torch.from_numpy(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy())
    raise ImageError(f"cannot predict an object of type {type(image).__name__}; give paths, PIL images or tensors")


def _source_name(image, i: int) -> str:
    if isinstance(image, (str, os.PathLike)):
        return str(image)
    return f"<image {i}>"


@torch.no_grad()
def predict(
    model: torch.nn.Module,
    images,
    *,
    topk: int = 3,
    meta: dict | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 256,
) -> list[dict]:
    """Top-k classes of ``images`` (a path, PIL image or uint8 tensor, or a list of them).

    ``meta`` (classes, mean, std, input_size) defaults to ``model.meta``, which
    :func:`densenet.load_model` sets. Returns one dict per image: ``source`` and ``top``, a list of
    ``{"class", "index", "probability"}`` from the most to the least likely. An unreadable image
    raises :class:`ImageError` naming it.
    """
    meta = meta or getattr(model, "meta", None)
    if not meta:
        raise ConfigError("predict needs the model's meta (classes, mean, std): load it with densenet.load_model")
    if isinstance(images, (str, os.PathLike)) or not isinstance(images, (list, tuple)):
        if isinstance(images, torch.Tensor) and images.dim() == 4:
            images = list(images)
        else:
            images = [images]
    classes = list(meta["classes"])
    if topk < 1:
        raise ConfigError(f"--topk must be at least 1, got {topk}")
    topk = min(topk, len(classes))
    size = int(meta.get("input_size", 32))
    device = resolve_device(device) if device is not None else next(model.parameters()).device
    normalise = Augmenter(meta["mean"], meta["std"], channels_last=True)
    tensors = [image_to_tensor(image, size) for image in images]

    was_training = model.training
    model.eval()
    runner = fast_inference_model(model, device)
    results = []
    try:
        for start in range(0, len(tensors), batch_size):
            batch = torch.stack(tensors[start : start + batch_size]).to(device)
            probs = runner(normalise(batch, train=False)).float().softmax(dim=1).cpu()
            values, indices = probs.topk(topk, dim=1)
            for j in range(len(batch)):
                results.append({
                    "source": _source_name(images[start + j], start + j),
                    "top": [
                        {"class": classes[int(c)], "index": int(c), "probability": float(p)}
                        for p, c in zip(values[j], indices[j])
                    ],
                })
    finally:
        model.train(was_training)
    return results


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files as given; directories replaced by the image files under them (sorted, recursive)."""
    paths: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(
                p for p in path.rglob("*")
                if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
            )
            if not found:
                raise ImageError(f"{path}: directory holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
            paths.extend(found)
        else:
            paths.append(path)
    return paths


# --- command line -----------------------------------------------------------------------------


def add_arguments(parser) -> None:
    parser.add_argument(
        "--weights", "--weights-dir", dest="weights", required=True, metavar="PATH",
        help="weights directory, model.safetensors, checkpoint (.pt), run directory, or .onnx (ONNX Runtime)",
    )
    parser.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR",
                        help="image files (any common format, size, mode) or directories of them")
    parser.add_argument("--topk", type=int, default=3, help="how many classes to show per image (default 3)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")


def run(args) -> int:
    if args.topk < 1:
        raise ConfigError(f"--topk must be at least 1, got {args.topk}")
    device = resolve_device(args.device)
    # the fastest path for the format is chosen inside predict(): ONNX Runtime for .onnx, the
    # inference-only DenseNet (folded batch norms) for PyTorch weights on the CPU; see docs/EXPORT.md
    model, meta = load_model(args.weights, device=device)
    size = int(meta.get("input_size", 32))

    readable: list[tuple[int, str, torch.Tensor]] = []
    rows: list[dict | None] = []
    failures = 0
    for i, path in enumerate(expand_inputs(args.images)):
        try:
            readable.append((i, str(path), load_image(path, size)))
            rows.append(None)
        except ImageError as exc:
            failures += 1
            rows.append({"source": str(path), "error": str(exc)})
            print(f"densenet predict: error: {exc}", file=sys.stderr)
    if readable:
        predicted = predict(model, [t for _, _, t in readable], topk=args.topk, meta=meta,
                            device=device, batch_size=args.batch_size)
        for (i, source, _), result in zip(readable, predicted):
            result["source"] = source
            rows[i] = result

    if args.json:
        json.dump(rows, sys.stdout, indent=2)
        print()
    else:
        for row in rows:
            if "error" in row:
                print(f"{row['source']}: ERROR {row['error']}")
            else:
                best = ", ".join(f"{t['class']} {100 * t['probability']:.1f}%" for t in row["top"])
                print(f"{row['source']}: {best}")
    return 2 if failures else 0  # bad input (errors.py): the readable images are still predicted
