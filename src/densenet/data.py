"""CIFAR datasets: the official python and binary versions, and image folders.

``load_dataset`` finds the data (``path``, else ``$DENSENET_DATA``, else ``./data``), detects its
format and returns a :class:`Dataset` of uint8 images (N, 3, H, W) and int64 labels, with the
per-channel mean and std of the training images (the validation hold-out excluded).

Formats, for CIFAR-10 (CIFAR-100 in brackets):

* python version: ``cifar-10-batches-py/`` with ``data_batch_1..5``, ``test_batch``, ``batches.meta``
  (``cifar-100-python/`` with ``train``, ``test``, ``meta``). The pickles are read by a restricted
  unpickler that only admits numpy's array reconstruction; anything else is refused unexecuted.
* binary version: ``cifar-10-batches-bin/`` with ``data_batch_1.bin..5``, ``test_batch.bin``,
  ``batches.meta.txt`` (``cifar-100-binary/`` with ``train.bin``, ``test.bin``,
  ``fine_label_names.txt``, ``coarse_label_names.txt``).
* image folders: ``DIR/train/<class>/*`` and ``DIR/test/<class>/*``; labels follow the sorted class
  names. Images of any size and mode are converted to RGB and resized, decoded once in parallel and
  then cached as ``.npy`` in ``$DENSENET_CACHE`` (else ``~/.cache/densenet``).
"""

from __future__ import annotations

import hashlib
import io
import multiprocessing as mp
import os
import pickle
import tempfile
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from densenet.errors import ConfigError, DataError

NAMES = ("cifar10", "cifar100")
SPLITS = ("train", "val", "test")
PRETTY = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif")
CACHE_VERSION = 1
PARALLEL_MIN = 2000  # image folders with fewer images are decoded in this process

# Layout of the official versions: sub-directory, files of each split, and the metadata files.
LAYOUTS = {
    ("cifar10", "python"): {
        "subdir": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "meta": ["batches.meta"],
    },
    ("cifar100", "python"): {
        "subdir": "cifar-100-python",
        "train": ["train"],
        "test": ["test"],
        "meta": ["meta"],
    },
    ("cifar10", "binary"): {
        "subdir": "cifar-10-batches-bin",
        "train": [f"data_batch_{i}.bin" for i in range(1, 6)],
        "test": ["test_batch.bin"],
        "meta": ["batches.meta.txt"],
    },
    ("cifar100", "binary"): {
        "subdir": "cifar-100-binary",
        "train": ["train.bin"],
        "test": ["test.bin"],
        "meta": ["fine_label_names.txt", "coarse_label_names.txt"],
    },
}

# md5 of every file of the official python versions (as listed by torchvision's CIFAR classes).
OFFICIAL_MD5 = {
    "cifar-10-batches-py": {
        "data_batch_1": "c99cafc152244af753f735de768cd75f",
        "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
        "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
        "data_batch_4": "634d18415352ddfa80567beed471001a",
        "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
        "test_batch": "40351d587109b95175f43aff81a1287e",
        "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
    },
    "cifar-100-python": {
        "train": "16019d7e3df5f24257cddd939b257f8d",
        "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
        "meta": "7973b15100ade9c7d40fb424638fde48",
    },
}


@dataclass
class Dataset:
    """One split of a dataset, held on the CPU.

    ``images`` is a uint8 tensor (N, 3, H, W), ``labels`` an int64 tensor (N,). ``mean`` and ``std``
    are per-channel statistics of the training images on the 0-1 scale (the validation hold-out
    excluded), the same for every split so that all of them are normalised alike.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    name: str
    root: str
    split: str = "train"
    format: str = ""

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@dataclass(frozen=True)
class Source:
    """Where a dataset was found: its format (``python``, ``binary``, ``folder``) and directory."""

    name: str
    format: str
    dir: Path

    def fix_hint(self) -> str:
        """The command that repairs this dataset."""
        top = self.dir.parent if self.format != "folder" else self.dir
        return download_hint(top, self.name)


def download_hint(data_dir: Path | str, name: str = "cifar10") -> str:
    extra = " --dataset cifar100" if name == "cifar100" else ""
    return f"run `densenet download{extra} --data-dir {data_dir}`"


# ---------------------------------------------------------------------------------------------
# locating the data


def resolve_data_dir(path: str | os.PathLike | None = None) -> Path:
    """The data directory: ``path``, else ``$DENSENET_DATA``, else ``./data``."""
    if path is None or str(path) == "":
        path = os.environ.get("DENSENET_DATA") or "data"
    return Path(path).expanduser()


def cache_dir() -> Path:
    """Directory of decoded-image caches: ``$DENSENET_CACHE``, else ``~/.cache/densenet``."""
    env = os.environ.get("DENSENET_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "densenet"


def _looks_like(directory: Path, layout: dict) -> bool:
    names = layout["train"] + layout["test"] + layout["meta"]
    return any((directory / n).is_file() for n in names)


def _is_folder_layout(directory: Path) -> bool:
    return any((directory / s).is_dir() for s in ("train", "test"))


def detect(root: Path, name: str = "cifar10") -> Source:
    """Find the dataset ``name`` in ``root`` (the directory itself or a known sub-directory)."""
    if not root.exists():
        raise DataError(f"data directory {root} does not exist; {download_hint(root, name)}")
    if not root.is_dir():
        raise DataError(f"{root} is not a directory; {download_hint(root.parent, name)}")
    for fmt in ("python", "binary"):
        layout = LAYOUTS[(name, fmt)]
        if (root / layout["subdir"]).is_dir():
            return Source(name, fmt, root / layout["subdir"])
    for fmt in ("python", "binary"):
        layout = LAYOUTS[(name, fmt)]
        if root.name == layout["subdir"] or _looks_like(root, layout):
            return Source(name, fmt, root)
    if _is_folder_layout(root):
        return Source(name, "folder", root)
    wanted = ", ".join(LAYOUTS[(name, f)]["subdir"] + "/" for f in ("python", "binary"))
    raise DataError(
        f"no {PRETTY[name]} data in {root}: expected {wanted} or image folders train/<class>/ and "
        f"test/<class>/; {download_hint(root, name)}"
    )


# ---------------------------------------------------------------------------------------------
# the official python version


class RefusedPickle(pickle.UnpicklingError):
    """A pickle asked for something the restricted unpickler does not admit."""


def _safe_codecs_encode(text, encoding="utf-8", errors="strict"):
    """What protocol-2 pickles written by Python 3 use for ``bytes``; only latin-1 is admitted."""
    if encoding.lower().replace("-", "").replace("_", "") not in ("latin1", "iso88591"):
        raise RefusedPickle(f"codec {encoding!r} is not allowed")
    return text.encode("latin-1", errors)


def _numpy_core():
    """numpy's core package under its numpy 2 name, or the numpy 1 one."""
    try:
        from numpy import _core as core  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1
        from numpy import core
    return core


# The globals that the CIFAR pickles (and numpy arrays pickled by newer numpy) refer to.
_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): lambda: _numpy_core().multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): lambda: _numpy_core().multiarray._reconstruct,
    ("numpy.core.numeric", "_frombuffer"): lambda: _numpy_core().numeric._frombuffer,
    ("numpy._core.numeric", "_frombuffer"): lambda: _numpy_core().numeric._frombuffer,
    ("_codecs", "encode"): lambda: _safe_codecs_encode,
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that builds only numpy arrays and Python's plain containers.

    The CIFAR pickles hold dicts, lists, bytes, ints and numpy arrays. Every other global a pickle
    names (``os.system``, ``builtins.eval``, ...) is refused before anything is called.
    """

    def find_class(self, module, name):
        make = _ALLOWED_GLOBALS.get((module, name))
        if make is None:
            raise RefusedPickle(f"global '{module}.{name}' is not allowed in a CIFAR file")
        return make()

    def persistent_load(self, pid):
        raise RefusedPickle("persistent references are not allowed in a CIFAR file")


def safe_unpickle(path: Path, fix: str = "") -> dict:
    """Read one CIFAR pickle with :class:`RestrictedUnpickler`; problems raise ``DataError``."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}{'; ' + fix if fix else ''}") from None
    try:
        obj = RestrictedUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except RefusedPickle as exc:
        raise DataError(f"{path} is not a valid CIFAR file ({exc}){'; ' + fix if fix else ''}") from None
    except Exception as exc:  # EOFError, UnpicklingError, ValueError, ... from a truncated or damaged file
        raise DataError(f"{path} is truncated or corrupt ({exc or type(exc).__name__}){'; ' + fix if fix else ''}") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path} is not a CIFAR file (holds {type(obj).__name__}, not a dict)")
    return {(k.decode("latin-1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


_MD5_MEMO: dict[tuple, str] = {}


def file_md5(path: Path) -> str:
    """md5 of a file, remembered per (path, size, mtime) within this process."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _MD5_MEMO:
        h = hashlib.md5()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _MD5_MEMO[key] = h.hexdigest()
    return _MD5_MEMO[key]


def _check_official_md5(src: Source, filename: str) -> None:
    expected = OFFICIAL_MD5.get(LAYOUTS[(src.name, src.format)]["subdir"], {}).get(filename)
    if expected is None:
        return
    actual = file_md5(src.dir / filename)
    if actual != expected:
        warnings.warn(
            f"{src.dir / filename}: md5 {actual} differs from the official {expected}; loading it anyway, "
            "but results are not comparable with published figures",
            stacklevel=4,
        )


def _names(values, path: Path) -> list[str]:
    if not isinstance(values, (list, tuple)):
        raise DataError(f"{path}: the class names are of type {type(values).__name__}, not a list")
    return [v.decode("utf-8", errors="replace") if isinstance(v, bytes) else str(v) for v in values]


def _labels(values, path: Path, fix: str) -> np.ndarray:
    """A batch's labels as int64; anything but a flat list or array of integers is refused."""
    try:
        labels = np.asarray(values) if isinstance(values, (list, tuple, np.ndarray)) else None
    except (ValueError, TypeError):  # ragged nesting
        labels = None
    if labels is None or labels.ndim != 1 or (labels.size and not np.issubdtype(labels.dtype, np.integer)):
        raise DataError(f"{path}: the labels are not a flat list of integers; {fix}")
    return labels.astype(np.int64)


def _python_classes(src: Source, label_type: str) -> list[str]:
    layout = LAYOUTS[(src.name, "python")]
    path = src.dir / layout["meta"][0]
    _require(src, path)
    _check_official_md5(src, path.name)
    meta = safe_unpickle(path, src.fix_hint())
    key = "label_names" if src.name == "cifar10" else f"{label_type}_label_names"
    if key not in meta:
        raise DataError(f"{path} has no '{key}' entry; {src.fix_hint()}")
    return _names(meta[key], path)


def _read_python_file(src: Source, path: Path, label_type: str) -> tuple[np.ndarray, np.ndarray]:
    _require(src, path)
    _check_official_md5(src, path.name)
    entry = safe_unpickle(path, src.fix_hint())
    key = "labels" if src.name == "cifar10" else f"{label_type}_labels"
    if "data" not in entry or key not in entry:
        raise DataError(f"{path} lacks 'data' or '{key}'; it is not a {PRETTY[src.name]} batch")
    data = entry["data"]
    labels = _labels(entry[key], path, src.fix_hint())
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{path}: 'data' is not a uint8 array of 3072-byte rows; {src.fix_hint()}")
    if data.shape[0] != labels.shape[0]:
        raise DataError(f"{path} holds {data.shape[0]} images but {labels.shape[0]} labels; {src.fix_hint()}")
    return data.reshape(-1, 3, 32, 32), labels


# ---------------------------------------------------------------------------------------------
# the official binary version


def _binary_classes(src: Source, label_type: str) -> list[str]:
    layout = LAYOUTS[(src.name, "binary")]
    meta = layout["meta"][0] if src.name == "cifar10" else f"{label_type}_label_names.txt"
    path = src.dir / meta
    _require(src, path)
    names = [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines()]
    return [n for n in names if n]


def _read_binary_file(src: Source, path: Path, label_type: str) -> tuple[np.ndarray, np.ndarray]:
    _require(src, path)
    label_bytes = 1 if src.name == "cifar10" else 2
    record = label_bytes + 3072
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % record:
        raise DataError(
            f"{path} is truncated or corrupt ({raw.size} bytes is not a whole number of {record}-byte "
            f"records); {src.fix_hint()}"
        )
    rows = raw.reshape(-1, record)
    column = 0 if (src.name == "cifar10" or label_type == "coarse") else 1
    labels = rows[:, column].astype(np.int64)
    images = np.ascontiguousarray(rows[:, label_bytes:]).reshape(-1, 3, 32, 32)
    return images, labels


def _require(src: Source, path: Path) -> None:
    if not path.is_file():
        raise DataError(
            f"{path.name} is missing from {path.parent} (the {PRETTY[src.name]} data there is incomplete); "
            f"{src.fix_hint()}"
        )


def _read_official(src: Source, split: str, label_type: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    layout = LAYOUTS[(src.name, src.format)]
    for f in layout[split] + layout["meta"]:
        _require(src, src.dir / f)
    if src.format == "python":
        classes = _python_classes(src, label_type)
        parts = [_read_python_file(src, src.dir / f, label_type) for f in layout[split]]
    else:
        classes = _binary_classes(src, label_type)
        parts = [_read_binary_file(src, src.dir / f, label_type) for f in layout[split]]
    images = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
    labels = np.concatenate([p[1] for p in parts])
    bad = (labels < 0) | (labels >= len(classes))
    if bad.any():
        raise DataError(
            f"{src.dir}: label {int(labels[bad][0])} is out of range for {len(classes)} classes; {src.fix_hint()}"
        )
    return images, labels, classes


def _train_fingerprint(src: Source, image_size: int, scans: dict) -> str:
    """Identifies the training images (files, sizes, mtimes), to remember their statistics."""
    if src.format == "folder":
        if not (src.dir / "train").is_dir():
            return f"folder-without-train|{src.dir.resolve()}"
        classes, entries = _scan_cached(src.dir, "train", scans)
        return _folder_fingerprint(entries, classes, image_size)
    layout = LAYOUTS[(src.name, src.format)]
    h = hashlib.sha256(f"{src.format}|{src.dir.resolve()}|{image_size}".encode())
    for f in layout["train"]:
        p = src.dir / f
        st = p.stat() if p.is_file() else None
        h.update(f"|{f}|{st.st_size if st else -1}|{st.st_mtime_ns if st else -1}".encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# image folders


def folder_classes(root: Path) -> list[str]:
    """Class names of an image-folder dataset: the sorted sub-directories of ``train/`` (or ``test/``)."""
    for split in ("train", "test"):
        d = root / split
        if d.is_dir():
            classes = sorted(e.name for e in os.scandir(d) if e.is_dir() and not e.name.startswith("."))
            if not classes:
                raise DataError(f"{d} has no class folders (expected {d}/<class>/<image files>)")
            return classes
    raise DataError(f"{root} has neither train/ nor test/ image folders")


def _scan_folder(root: Path, split: str, classes: list[str]) -> list[tuple[str, int, int, int]]:
    """(relative path, size, mtime_ns, label) of every image of a split, in a fixed order."""
    split_dir = root / split
    if not split_dir.is_dir():
        raise DataError(f"{split_dir} is missing (expected {split}/<class>/<image files> in {root})")
    index = {c: i for i, c in enumerate(classes)}
    found = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))
    unknown = [c for c in found if c not in index]
    if unknown:
        raise DataError(f"{split_dir / unknown[0]} is a class that {root / 'train'} does not have")
    entries = []
    for cls in found:
        with os.scandir(split_dir / cls) as it:
            files = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
        for e in files:
            if not e.name.lower().endswith(IMAGE_EXTENSIONS) or not e.is_file():
                continue
            st = e.stat()
            entries.append((f"{split}/{cls}/{e.name}", st.st_size, st.st_mtime_ns, index[cls]))
    if not entries:
        raise DataError(f"{split_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return entries


def _scan_cached(root: Path, split: str, scans: dict):
    """(classes, entries) of a split, scanned once per ``load_splits`` call."""
    if split not in scans:
        classes = folder_classes(root)
        scans[split] = (classes, _scan_folder(root, split, classes))
    return scans[split]


def _folder_fingerprint(entries, classes: list[str], image_size: int) -> str:
    h = hashlib.sha256(f"v{CACHE_VERSION}|{image_size}|{'/'.join(classes)}".encode())
    for rel, size, mtime, _ in entries:
        h.update(f"\n{rel}|{size}|{mtime}".encode())
    return h.hexdigest()


def decode_image(path: Path, image_size: int) -> np.ndarray:
    """Decode one image file to uint8 RGB (3, S, S): any mode, any size, resized with antialiasing."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            if img.format == "JPEG" and max(img.size) > 2 * image_size:
                img.draft("RGB", (image_size, image_size))
            img.load()
            img = _to_rgb(img)
            if img.size != (image_size, image_size):
                img = img.resize((image_size, image_size), Image.Resampling.BICUBIC, reducing_gap=3.0)
            arr = np.asarray(img, dtype=np.uint8)
    except UnidentifiedImageError:
        raise DataError(f"{path} is not an image file (remove it or replace it)") from None
    except Image.DecompressionBombError as exc:
        raise DataError(f"{path} is too large to decode safely ({exc}); remove it or replace it") from None
    except MemoryError:
        raise
    except Exception as exc:  # OSError, ValueError, SyntaxError, and others from Pillow on damaged headers
        raise DataError(f"{path} is truncated or corrupt ({exc or type(exc).__name__}); remove it or replace it") from None
    return arr.transpose(2, 0, 1)


def _to_rgb(img):
    """RGB copy of a PIL image; 16- and 32-bit integer images are scaled down to 8 bits."""
    from PIL import Image

    if img.mode.startswith("I;16") or img.mode == "I":
        arr = np.asarray(img).astype(np.int64)
        shift = 8 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 0
        img = Image.fromarray(np.clip(arr >> shift, 0, 255).astype(np.uint8), mode="L")
    elif img.mode == "F":
        arr = np.asarray(img)
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img


def _workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _decode_chunk(paths: list[str], image_size: int) -> np.ndarray:
    return np.stack([decode_image(Path(p), image_size) for p in paths])


def _decode_all(root: Path, entries, image_size: int, desc: str) -> np.ndarray:
    """Decode every image of a split, in worker processes (one per core) when there are many.

    Worker processes, not threads: for CIFAR-sized images most of a decode is Pillow's Python-level
    header parsing, which holds the GIL (threads measured slower than one core).
    """
    from tqdm import tqdm

    paths = [str(root / e[0]) for e in entries]
    out = np.empty((len(paths), 3, image_size, image_size), dtype=np.uint8)
    workers = min(_workers(), 8)
    bar = tqdm(total=len(paths), desc=desc, unit="img", disable=None, leave=False)
    if len(paths) < PARALLEL_MIN or workers < 2 or "fork" not in mp.get_all_start_methods():
        for i, p in enumerate(paths):
            out[i] = decode_image(Path(p), image_size)
            bar.update(1)
    else:
        step = max(1, min(500, len(paths) // (4 * workers)))
        starts = range(0, len(paths), step)
        with warnings.catch_warnings(), ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as pool:
            # the workers only run Pillow and numpy, so forking a process that has threads is safe here
            warnings.filterwarnings("ignore", message=".*fork.*", category=DeprecationWarning)
            chunks = pool.map(_decode_chunk, [paths[s : s + step] for s in starts], [image_size] * len(starts))
            try:
                for s, arr in zip(starts, chunks):
                    out[s : s + len(arr)] = arr
                    bar.update(len(arr))
            except BaseException:  # a bad file or Ctrl-C: do not decode the rest first
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    bar.close()
    return out


def _save_atomic(path: Path, array: np.ndarray) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.save(f, array)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        warnings.warn(f"cannot write the image cache {path} ({exc}); images will be decoded again", stacklevel=3)


def _read_folder(root: Path, split: str, image_size: int, scans: dict) -> tuple[np.ndarray, np.ndarray, list[str]]:
    classes, entries = _scan_cached(root, split, scans)
    labels = np.fromiter((e[3] for e in entries), dtype=np.int64, count=len(entries))
    key = _folder_fingerprint(entries, classes, image_size)
    path = cache_dir() / f"folder-{split}-{image_size}px-{key[:24]}.npy"
    images = None
    if path.is_file():
        try:
            images = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError):
            images = None
        if images is not None and (images.dtype != np.uint8 or images.shape != (len(entries), 3, image_size, image_size)):
            images = None
    if images is None:
        images = _decode_all(root, entries, image_size, f"decoding {split} images")
        _save_atomic(path, images)
    return images, labels, classes


# ---------------------------------------------------------------------------------------------
# statistics, hold-out, loading


def channel_stats(images: np.ndarray | torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of uint8 images (N, 3, H, W) on the 0-1 scale.

    Exact: computed from each channel's 256-bin histogram in float64.
    """
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    values = np.arange(256, dtype=np.float64) / 255.0
    means, stds = [], []
    for c in range(images.shape[1]):
        counts = torch.bincount(images[:, c].reshape(-1), minlength=256).numpy().astype(np.float64)
        n = counts.sum()
        mean = float((counts * values).sum() / n)
        var = float((counts * (values - mean) ** 2).sum() / n)
        means.append(mean)
        stds.append(var**0.5)
    return tuple(means), tuple(stds)


def holdout_indices(num_samples: int, val_split: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of ``range(num_samples)`` into (train, val) indices, each in ascending order."""
    if not 0 <= val_split < num_samples:
        raise ConfigError(f"val_split must be between 0 and {num_samples - 1} (the training images), got {val_split}")
    perm = torch.randperm(num_samples, generator=torch.Generator().manual_seed(int(seed))).numpy()
    return np.sort(perm[val_split:]), np.sort(perm[:val_split])


def _resize_batch(images: np.ndarray, size: int) -> np.ndarray:
    """Bicubic antialiased resize of uint8 images (N, 3, h, w) to (N, 3, size, size)."""
    import torch.nn.functional as F

    out = np.empty((images.shape[0], 3, size, size), dtype=np.uint8)
    for start in range(0, images.shape[0], 2048):
        x = torch.from_numpy(images[start : start + 2048]).float()
        y = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
        out[start : start + 2048] = y.round_().clamp_(0, 255).to(torch.uint8).numpy()
    return out


def _read_split(src: Source, split: str, label_type: str, image_size: int, scans: dict):
    if src.format == "folder":
        return _read_folder(src.dir, split, image_size, scans)
    images, labels, classes = _read_official(src, split, label_type)
    if image_size != 32:
        images = _resize_batch(images, image_size)
    return images, labels, classes


_STATS_MEMO: dict[tuple, tuple] = {}


def _check_args(name, splits, val_split, label_type, image_size, seed):
    if name not in NAMES:
        raise ConfigError(f"unknown dataset {name!r}; choose one of {', '.join(NAMES)}")
    for s in splits:
        if s not in SPLITS:
            raise ConfigError(f"unknown split {s!r}; choose one of {', '.join(SPLITS)}")
    if label_type not in ("fine", "coarse"):
        raise ConfigError(f"label_type must be 'fine' or 'coarse', got {label_type!r}")
    if label_type == "coarse" and name != "cifar100":
        raise ConfigError("label_type='coarse' exists only for CIFAR-100")
    if not isinstance(image_size, int) or image_size < 1:
        raise ConfigError(f"image_size must be a positive integer, got {image_size!r}")
    if not isinstance(val_split, int) or val_split < 0:
        raise ConfigError(f"val_split must be a non-negative integer, got {val_split!r}")
    if "val" in splits and val_split == 0:
        raise ConfigError("split 'val' needs val_split > 0 (the number of training images to hold out)")
    if not isinstance(seed, int):
        raise ConfigError(f"seed must be an integer, got {seed!r}")


def load_splits(
    path: str | os.PathLike | None = None,
    name: str = "cifar10",
    splits: tuple[str, ...] | list[str] = ("train", "test"),
    *,
    val_split: int = 0,
    seed: int = 0,
    label_type: str = "fine",
    image_size: int = 32,
) -> dict[str, Dataset]:
    """Several splits at once, each file read once: ``{"train": Dataset, "test": Dataset, ...}``.

    Arguments are those of :func:`load_dataset`.
    """
    splits = tuple(splits)
    _check_args(name, splits, val_split, label_type, image_size, seed)
    root = resolve_data_dir(path)
    src = detect(root, name)

    scans: dict = {}
    stats_key = (_train_fingerprint(src, image_size, scans), val_split, seed)

    raw: dict[str, tuple] = {}
    need_train = any(s in ("train", "val") for s in splits) or stats_key not in _STATS_MEMO
    if need_train:
        raw["train"] = _read_split(src, "train", label_type, image_size, scans)
    if "test" in splits:
        raw["test"] = _read_split(src, "test", label_type, image_size, scans)

    result: dict[str, Dataset] = {}
    stats = _STATS_MEMO.get(stats_key)
    if "train" in raw:
        images, labels, classes = raw["train"]
        train_idx, val_idx = holdout_indices(len(labels), val_split, seed) if val_split else (None, None)
        train_images = images[train_idx] if train_idx is not None else images
        if stats is None:
            stats = channel_stats(train_images)
            _STATS_MEMO[stats_key] = stats
        parts = {"train": (train_images, labels[train_idx] if train_idx is not None else labels)}
        if val_idx is not None:
            parts["val"] = (images[val_idx], labels[val_idx])
        for s, (imgs, labs) in parts.items():
            if s in splits:
                result[s] = _make(imgs, labs, classes, stats, name, root, s, src.format)
    if "test" in raw:
        images, labels, classes = raw["test"]
        result["test"] = _make(images, labels, classes, stats, name, root, "test", src.format)
    return {s: result[s] for s in splits}


def _make(images, labels, classes, stats, name, root, split, fmt) -> Dataset:
    images = np.ascontiguousarray(images)
    if not images.flags.writeable:
        images = images.copy()
    return Dataset(
        images=torch.from_numpy(images),
        labels=torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64)),
        classes=list(classes),
        mean=tuple(float(m) for m in stats[0]),
        std=tuple(float(s) for s in stats[1]),
        name=name,
        root=str(root),
        split=split,
        format=fmt,
    )


def load_dataset(
    path: str | os.PathLike | None = None,
    name: str = "cifar10",
    split: str = "train",
    *,
    val_split: int = 0,
    seed: int = 0,
    label_type: str = "fine",
    image_size: int = 32,
) -> Dataset:
    """Load one split of CIFAR-10 or CIFAR-100 as uint8 tensors.

    ``path`` is the data directory (else ``$DENSENET_DATA``, else ``./data``); the format is
    detected. ``split`` is ``"train"``, ``"val"`` or ``"test"``; with ``val_split=N``, N training
    images chosen with ``seed`` are held out as ``"val"`` and left out of ``"train"``.
    ``label_type`` selects CIFAR-100's ``"fine"`` (100) or ``"coarse"`` (20) labels. Images of
    another size are resized to ``image_size``. Problems raise :class:`DataError`.
    """
    return load_splits(
        path, name, (split,), val_split=val_split, seed=seed, label_type=label_type, image_size=image_size
    )[split]
