"""``densenet train``: training with resumable, atomic checkpoints, on the CPU or a CUDA device.

:class:`TrainConfig` holds every setting; :data:`RECIPES` are named presets of it; :func:`train`
runs a configuration and returns a summary. The whole training set sits on the device as uint8;
each batch's indices come from :func:`densenet.augment.epoch_batches` and its augmentation from a
generator seeded with (seed, epoch, batch index), and the global RNG state is checkpointed, so a
resumed run -- even one stopped in the middle of an epoch -- continues with exactly the batches,
and on the CPU exactly the weights, of an uninterrupted one.

Run directory (``out_dir``): ``config.json``, ``metrics.csv``, ``metrics.jsonl``, ``curves.png``,
``checkpoint-last.pt`` (every epoch and when stopped), ``checkpoint-best.pt``, and at the end
``model.safetensors`` + ``model.json`` (also written to ``weights_dir``).

Under ``torchrun`` (or ``densenet train --nproc N``) the same code trains with
DistributedDataParallel (see :mod:`densenet.distributed` and docs/DISTRIBUTED.md): ``batch_size``
is per process, each process trains on its share of every epoch, metrics and evaluation are
reduced across processes, and only rank 0 prints and writes files.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from densenet.errors import ConfigError, DenseNetError, ResourceError, WeightsError
from densenet.runtime import peak_rss_mb, set_malloc_policy

SCHEDULES = ("step", "cosine", "onecycle", "constant")
AMPS = ("none", "bf16", "fp16")
PROGRESS = ("auto", "bar", "lines", "none")
# settings a resumed run must share with its checkpoint (they define the model and the batches)
RESUME_FIXED = ("model", "dataset", "batch_size", "seed", "subset", "val_split", "dropout", "num_classes",
                "whiten")
# test hook: send SIGTERM to this process after this many optimizer steps (global count)
SIGTERM_AFTER_STEP_ENV = "DENSENET_SIGTERM_AFTER_STEP"


class TrainingError(DenseNetError):
    """Training cannot go on: the loss diverged, or a checkpoint does not fit the run."""


@dataclass
class TrainConfig:
    """Every setting of a training run. The defaults are the original design's (``recipe original``)."""

    model: str = "densenet121-cifar"
    dataset: str = "cifar10"
    data_dir: str | None = None
    num_classes: int | None = None  # None: the number of classes in the data
    epochs: int = 200
    batch_size: int = 64
    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    schedule: str = "step"
    # step-schedule milestones in epochs, or fractions of the run when all are below 1; the default is
    # epochs 50 and 75 of the original 200, scaled with --epochs
    milestones: list[float] = field(default_factory=lambda: [0.25, 0.375])
    gamma: float = 0.1
    warmup_epochs: float | None = None  # None: 0, or 30% of the epochs for onecycle
    label_smoothing: float = 0.0
    dropout: float = 0.0
    whiten: bool = False  # stem set to frozen patch-whitening filters of the training images
    crop_padding: int = 4
    flip: bool = True
    cutout: int = 0
    color_jitter: float = 0.0
    val_split: int = 0
    subset: int | None = None  # train on N training images drawn with the seed
    test_subset: int | None = None  # evaluate on N test images (always the same N)
    seed: int = 0
    device: str = "auto"
    amp: str = "none"
    channels_last: bool = True
    compile: bool = False
    memory_efficient: bool = False
    ema: float | None = None  # decay of an exponential moving average of the weights; None or 0: off
    tta: bool = False
    eval_every: int = 1
    eval_batch_size: int | None = None  # None: max(batch_size, 500)
    out_dir: str | None = None  # None: runs/<model>-<timestamp>
    weights_dir: str | None = "densenet121_weights"  # None: final weights only in the run directory
    resume: str | None = None  # a checkpoint, a run directory, or "auto"
    max_minutes: float | None = None  # stop cleanly after this much wall time in this process
    threads: int | None = None
    recipe: str | None = None
    progress: str = "auto"  # auto: a tqdm bar on a terminal, else one line per epoch
    tensorboard: str | None = None  # TensorBoard event files: a folder, "" for <out_dir>/tensorboard, None: off
    sync_bn: bool = False  # under torchrun: BatchNorm statistics over the global batch (CUDA only)
    dist_timeout: float = 300.0  # under torchrun: seconds a process waits for the others before failing


# the CPU recipes' shared settings: densenet-cpu-s with a whitened stem (docs/TRAINING.md: how chosen)
_CPU_S = dict(model="densenet-cpu-s", whiten=True, batch_size=128, lr=0.2, momentum=0.9, nesterov=True,
              weight_decay=5e-4, schedule="onecycle", label_smoothing=0.1, crop_padding=4, flip=True,
              channels_last=True)

RECIPES: dict[str, dict] = {
    "original": {
        "description": "the original design: densenet121-cifar, 200 epochs, batch 64, SGD lr 0.01 momentum 0.9, "
        "step x0.1 at epochs 50 and 75, He init, crop+flip",
        "settings": dict(model="densenet121-cifar", epochs=200, batch_size=64, lr=0.01, momentum=0.9,
                         nesterov=False, weight_decay=1e-4, schedule="step", milestones=[50.0, 75.0],
                         gamma=0.1, crop_padding=4, flip=True),
    },
    "paper": {
        "description": "Huang et al.'s CIFAR setup: densenet-bc-100-12, 300 epochs, batch 64, lr 0.1, Nesterov "
        "0.9, wd 1e-4, x0.1 at 50% and 75%, crop+flip",
        "settings": dict(model="densenet-bc-100-12", epochs=300, batch_size=64, lr=0.1, momentum=0.9,
                         nesterov=True, weight_decay=1e-4, schedule="step", milestones=[0.5, 0.75],
                         gamma=0.1, crop_padding=4, flip=True),
    },
    "quick": {
        "description": "CPU demo, <= 10 minutes: densenet-cpu-s with a whitened stem, 3 epochs, batch 128, "
        "one-cycle to lr 0.2, Nesterov, wd 5e-4, label smoothing 0.1, crop+flip, channels_last",
        "settings": dict(_CPU_S, epochs=3, warmup_epochs=0.6, max_minutes=10.0),
    },
    "cpu-30m": {
        "description": "CPU, <= 30 minutes: the quick recipe for 8 epochs (1.3 warm-up epochs)",
        "settings": dict(_CPU_S, epochs=8, warmup_epochs=1.3, max_minutes=30.0),
    },
    "fast": {
        "description": "GPU time-to-accuracy plumbing (untuned): densenet121-cifar, bf16, channels_last, "
        "batch 512, one-cycle to lr 0.8, label smoothing 0.1, EMA 0.999, flip TTA, torch.compile",
        "settings": dict(model="densenet121-cifar", epochs=30, batch_size=512, lr=0.8, momentum=0.9,
                         nesterov=True, weight_decay=5e-4, schedule="onecycle", warmup_epochs=6,
                         label_smoothing=0.1, amp="bf16", channels_last=True, ema=0.999, tta=True,
                         compile=True, device="cuda"),
    },
}


# --- configuration ----------------------------------------------------------------------------


def config_fields() -> list[str]:
    return [f.name for f in fields(TrainConfig)]


def make_config(config: TrainConfig | dict | None = None, **overrides) -> TrainConfig:
    """A :class:`TrainConfig` from a config, a dict (recipe values under explicit ones), or keywords.

    A dict or keywords may name ``recipe``: its settings apply first, the other values on top.
    """
    if isinstance(config, TrainConfig):
        values = asdict(config)
        values.update(overrides)
        return TrainConfig(**values)
    values = dict(config or {})
    values.update(overrides)
    unknown = sorted(set(values) - set(config_fields()))
    if unknown:
        raise ConfigError(f"unknown training setting(s): {', '.join(unknown)}")
    base: dict = {}
    if values.get("recipe"):
        base.update(recipe_settings(values["recipe"]))
    base.update({k: v for k, v in values.items()})
    return TrainConfig(**base)


def recipe_settings(name: str) -> dict:
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)} (see --list-recipes)")
    return dict(RECIPES[name]["settings"], recipe=name)


def parse_milestones(text: str | list | tuple | None) -> list[float]:
    """``"50,75"`` or ``"0.5,0.75"`` (or a list) as a list of floats."""
    if text is None:
        return []
    if isinstance(text, (list, tuple)):
        items = list(text)
    else:
        items = [t for t in str(text).replace(" ", "").split(",") if t]
    try:
        return [float(t) for t in items]
    except ValueError:
        raise ConfigError(f"--milestones must be numbers separated by commas, got {text!r}") from None


def milestone_epochs(config: TrainConfig) -> list[float]:
    """Milestones in epochs: fractions (all values < 1) are scaled by the number of epochs."""
    values = parse_milestones(config.milestones)
    if values and all(0 < v < 1 for v in values):
        return [v * config.epochs for v in values]
    return values


def warmup_epochs(config: TrainConfig) -> float:
    if config.warmup_epochs is not None:
        return float(config.warmup_epochs)
    return 0.3 * config.epochs if config.schedule == "onecycle" else 0.0


def validate(config: TrainConfig) -> None:
    """Raise :class:`ConfigError` with one line for the first bad setting."""
    from densenet.models import create_model

    c = config

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    def is_int(v) -> bool:
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

    need(is_int(c.epochs) and c.epochs >= 1, f"--epochs must be a positive integer, got {c.epochs!r}")
    need(is_int(c.batch_size) and c.batch_size >= 1, f"--batch-size must be a positive integer, got {c.batch_size!r}")
    need(c.lr > 0 and math.isfinite(c.lr), f"--lr must be positive, got {c.lr}")
    need(0 <= c.momentum < 1, f"--momentum must be in [0, 1), got {c.momentum}")
    need(not (c.nesterov and c.momentum == 0), "--nesterov needs a momentum above 0")
    need(c.weight_decay >= 0, f"--weight-decay must not be negative, got {c.weight_decay}")
    need(c.schedule in SCHEDULES, f"unknown --schedule {c.schedule!r}; choose one of {', '.join(SCHEDULES)}")
    need(0 < c.gamma <= 1, f"--gamma must be in (0, 1], got {c.gamma}")
    if c.schedule == "step":
        values = parse_milestones(c.milestones)
        fractions = [v for v in values if 0 < v < 1]
        need(not fractions or len(fractions) == len(values),
             f"--milestones mixes fractions and epochs: {values} (give all as epochs or all below 1)")
        for m in milestone_epochs(c):
            need(0 < m < c.epochs, f"milestone {m:g} is outside the run's epochs (0, {c.epochs})")
        need(values == sorted(values), f"--milestones must be increasing, got {values}")
    w = warmup_epochs(c)
    need(0 <= w < c.epochs, f"--warmup-epochs must be in [0, epochs), got {w:g}")
    need(0 <= c.label_smoothing < 1, f"--label-smoothing must be in [0, 1), got {c.label_smoothing}")
    need(0 <= c.dropout < 1, f"--dropout must be in [0, 1), got {c.dropout}")
    need(is_int(c.crop_padding) and c.crop_padding >= 0, f"--crop-padding must be >= 0, got {c.crop_padding!r}")
    need(is_int(c.cutout) and c.cutout >= 0, f"--cutout must be >= 0, got {c.cutout!r}")
    need(c.color_jitter >= 0, f"--color-jitter must be >= 0, got {c.color_jitter}")
    need(is_int(c.val_split) and c.val_split >= 0, f"--val-split must be >= 0, got {c.val_split!r}")
    need(c.subset is None or (is_int(c.subset) and c.subset >= 1), f"--subset must be >= 1, got {c.subset!r}")
    need(c.test_subset is None or (is_int(c.test_subset) and c.test_subset >= 1),
         f"--test-subset must be >= 1, got {c.test_subset!r}")
    need(is_int(c.seed) and c.seed >= 0, f"--seed must be a non-negative integer, got {c.seed!r}")
    need(c.amp in AMPS, f"unknown --amp {c.amp!r}; choose one of {', '.join(AMPS)}")
    need(c.ema is None or 0 <= c.ema < 1, f"--ema must be a decay in (0, 1), e.g. 0.999 (0: off), got {c.ema}")
    need(is_int(c.eval_every) and c.eval_every >= 1, f"--eval-every must be >= 1, got {c.eval_every!r}")
    need(c.eval_batch_size is None or c.eval_batch_size >= 1, "--eval-batch-size must be >= 1")
    need(c.max_minutes is None or c.max_minutes > 0, f"--max-minutes must be positive, got {c.max_minutes}")
    need(c.threads is None or (is_int(c.threads) and c.threads >= 1), f"--threads must be >= 1, got {c.threads!r}")
    need(c.num_classes is None or (is_int(c.num_classes) and c.num_classes >= 2), "--num-classes must be >= 2")
    need(c.dataset in ("cifar10", "cifar100"), f"unknown --dataset {c.dataset!r}; choose cifar10 or cifar100")
    if c.tensorboard is not None:
        from importlib.util import find_spec

        need(find_spec("tensorboard") is not None,
             "--tensorboard needs the 'tensorboard' package, which is not installed: pip install 'densenet[tensorboard]'")
    need(c.progress in PROGRESS, f"progress must be one of {', '.join(PROGRESS)}, got {c.progress!r}")
    need(c.dist_timeout > 0 and math.isfinite(c.dist_timeout),
         f"--dist-timeout must be positive seconds, got {c.dist_timeout}")
    if c.recipe is not None:
        recipe_settings(c.recipe)
    from densenet.runtime import resolve_device

    device = resolve_device(c.device)
    need(not (c.amp == "fp16" and device.type == "cpu"),
         "--amp fp16 training needs CUDA (loss scaling); use --amp bf16 on the CPU (as densenet bench says too)")
    need(not c.sync_bn or device.type == "cuda",
         "--sync-bn needs CUDA devices (PyTorch's SyncBatchNorm does not run on the CPU)")
    with torch.device("meta"):
        model = create_model(c.model, num_classes=10)
    if c.whiten:
        conv = getattr(getattr(model, "features", None), "conv0", None)
        shape = tuple(conv.weight.shape) if isinstance(conv, torch.nn.Conv2d) else None
        need(shape is not None and shape[0] == 2 * shape[1] * shape[2] * shape[3],
             f"--whiten needs a stem convolution with 2 x 3 x 3 x 3 = 54 stem channels (for 3x3 patches); "
             f"{c.model} has {shape[0] if shape else 'no such stem'} (use a densenet-cpu-* model)")


# --- learning-rate schedule -------------------------------------------------------------------


def lr_factor(step: int, steps_per_epoch: int, config: TrainConfig) -> float:
    """The learning rate at optimizer step ``step`` (0-based) as a fraction of ``config.lr``.

    A linear warm-up over ``warmup_epochs`` (from 1/warmup-steps to 1) precedes every schedule:
    ``constant``; ``step`` (multiplied by ``gamma`` at each milestone epoch); ``cosine`` (half a
    cosine down to 0 at the end); ``onecycle`` (after the warm-up peak, straight down to 0 at the
    end: a triangular one-cycle schedule).
    """
    total = config.epochs * steps_per_epoch
    warm = round(warmup_epochs(config) * steps_per_epoch)
    if step < warm:
        return (step + 1) / warm
    epoch = step / steps_per_epoch
    progress = (step - warm) / max(1, total - warm)
    if config.schedule == "constant":
        return 1.0
    if config.schedule == "step":
        return config.gamma ** sum(1 for m in milestone_epochs(config) if epoch >= m)
    if config.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return max(0.0, 1.0 - progress)


# --- data -------------------------------------------------------------------------------------


def seeded_subset(dataset, n: int | None, seed: int):
    """``n`` images of ``dataset`` drawn without replacement from ``seed`` (kept in file order)."""
    if n is None or n >= len(dataset):
        return dataset
    perm = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    idx = perm[:n].sort().values
    return dataclasses.replace(dataset, images=dataset.images[idx], labels=dataset.labels[idx])


def batch_seed(seed: int, epoch: int, index: int, rank: int = 0) -> int:
    """The augmentation seed of one batch, mixed from (seed, epoch, batch index) and, above 0, the rank."""
    entropy = [seed, epoch, index] + ([rank] if rank else [])
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> 1)


def load_data(config: TrainConfig) -> dict:
    """``{"train": Dataset, "test": Dataset, ("val": Dataset)}`` with the subsets applied."""
    from densenet.data import load_splits

    splits = ("train", "val", "test") if config.val_split else ("train", "test")
    data = load_splits(config.data_dir, config.dataset, splits, val_split=config.val_split, seed=config.seed)
    data["train"] = seeded_subset(data["train"], config.subset, config.seed)
    data["test"] = seeded_subset(data["test"], config.test_subset, 0)
    return data


# --- run directory ----------------------------------------------------------------------------


def default_out_dir(model: str) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path = Path("runs") / f"{model}-{stamp}"
    n = 1
    while path.exists():
        n += 1
        path = Path("runs") / f"{model}-{stamp}-{n}"
    return path


def find_resume_checkpoint(resume: str | None, out_dir: str | None, model: str) -> Path | None:
    """The checkpoint a ``--resume`` value points at, or None to start afresh.

    ``auto``: ``out_dir/checkpoint-last.pt`` when ``out_dir`` is given; otherwise the newest
    ``runs/<model>-*/checkpoint-last.pt`` of an unfinished run; None when there is none. A path:
    a checkpoint file or a run directory, which must exist.
    """
    if not resume:
        return None
    if resume == "auto":
        if out_dir:
            candidate = Path(out_dir) / "checkpoint-last.pt"
            return candidate if candidate.is_file() else None
        candidates = sorted(Path("runs").glob(f"{model}-*/checkpoint-last.pt"), key=lambda p: p.stat().st_mtime)
        for path in reversed(candidates):
            try:
                from densenet.weights import load_checkpoint

                if not load_checkpoint(path).get("finished"):
                    return path
            except WeightsError as exc:  # damaged: say so rather than silently resuming another run
                print(f"densenet train: warning: --resume auto skips {path.parent}: {exc}", file=sys.stderr)
                continue
        return None
    path = Path(resume)
    if path.is_dir():
        path = path / "checkpoint-last.pt"
    if not path.is_file():
        raise ConfigError(f"--resume: no checkpoint at {path}")
    return path


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
            text=True, timeout=5, check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def environment(device: torch.device) -> dict:
    from densenet import __version__

    env = {
        "densenet": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
        or platform.machine(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "git_commit": _git_commit(),
    }
    return env


def _write_metrics(out_dir: Path, history: list[dict]) -> None:
    from densenet.weights import atomic_write_text

    lines = "".join(json.dumps(row) + "\n" for row in history)
    atomic_write_text(out_dir / "metrics.jsonl", lines)
    columns: list[str] = []
    for row in history:
        columns.extend(k for k in row if k not in columns)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    atomic_write_text(out_dir / "metrics.csv", buffer.getvalue())


def _peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: CUDA's allocator peak, or this process's peak RSS (``VmHWM``, as bench)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss_mb()


# --- signals ----------------------------------------------------------------------------------


class StopRequest:
    """Turns SIGINT/SIGTERM into a flag checked between steps; a second Ctrl-C interrupts at once.

    With ``grace`` seconds, a second SIGINT within that time of the first counts as the same one
    (under torchrun, Ctrl-C reaches a worker twice: from the terminal and from the agent).
    """

    def __init__(self, grace: float = 0.0):
        self.signum: int | None = None
        self._previous: dict = {}
        self._grace = grace
        self._first = 0.0

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            if time.monotonic() - self._first >= self._grace:
                raise KeyboardInterrupt
            return
        self.signum = signum
        self._first = time.monotonic()

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""


# --- the training loop ------------------------------------------------------------------------


@dataclass
class TrainResult:
    """What :func:`train` returns."""

    out_dir: str
    weights_dir: str | None
    epochs_completed: int
    stop_reason: str  # "completed", "time budget", "SIGINT" or "SIGTERM"
    best_acc: float | None
    best_epoch: int | None
    final_test_acc: float | None
    wall_seconds: float
    images_per_second: float
    history: list[dict]

    @property
    def exit_code(self) -> int:
        return {"SIGINT": 130, "SIGTERM": 143}.get(self.stop_reason, 0)


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` means an allocation failed (CUDA, the CPU allocator, oneDNN's scratch space, Python)."""
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        s in text for s in ("can't allocate memory", "out of memory", "could not create a primitive"))


def _allocation(exc: BaseException) -> str:
    """The failed allocation in a few words: its size when the message gives it, else the message's start."""
    text = str(exc).strip()
    size = re.search(r"tried to allocate (\d+) bytes", text)
    if size:
        return f"an allocation of {int(size.group(1)) / 2**20:.1f} MiB failed"
    return (text.splitlines() or [type(exc).__name__])[0][:120]


def _rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    if "cpu" in state:
        torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and state.get("cuda"):
        torch.cuda.set_rng_state_all(state["cuda"])


def train(config: TrainConfig | dict | None = None, **overrides) -> TrainResult:
    """Train a model; see :class:`TrainConfig` for the settings and the module docstring for the files.

    Returns a :class:`TrainResult`. SIGINT/SIGTERM stop the run after the current step with a
    checkpoint (``stop_reason`` names the signal); a loss that is not finite raises
    :class:`TrainingError` and leaves the last good checkpoint in place.
    """
    config = make_config(config, **overrides)
    validate(config)
    return _Trainer(config).run()


class _Trainer:
    def __init__(self, config: TrainConfig):
        self.config = config

    # set-up ------------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        c = self.config
        from densenet import distributed

        previous_deterministic = torch.are_deterministic_algorithms_enabled()
        previous_threads = torch.get_num_threads()
        self.dist = distributed.Context()
        self.out_dir = None
        try:
            # under torchrun: join the process group; the device is cuda:LOCAL_RANK or the CPU
            self.dist = distributed.setup(c.device, c.dist_timeout)
            self.device = self.dist.device
            if c.threads:
                torch.set_num_threads(c.threads)
            if self.device.type == "cpu":
                torch.use_deterministic_algorithms(True, warn_only=True)
            else:
                torch.backends.cudnn.benchmark = True
            return self._run()
        except OSError as exc:  # disk full, quota, read-only file system while writing the run's files
            where = f"{exc.filename}: " if exc.filename else ""
            raise ResourceError(f"cannot write {where}{exc.strerror or exc}; {self._kept()}") from None
        except (MemoryError, RuntimeError) as exc:
            if self.dist.distributed and distributed.is_peer_failure(exc):
                raise distributed.peer_failure(self.dist, exc, self._kept()) from None
            if not out_of_memory(exc):
                raise
            raise ResourceError(
                f"out of memory at batch size {c.batch_size} ({_allocation(exc)}); use a smaller --batch-size or "
                f"--memory-efficient (--eval-batch-size for evaluation); {self._kept()}"
            ) from None
        finally:
            if getattr(self, "_tb", None) is not None:
                self._tb.close()
            # drop the DDP wrapper while the process group is still registered: the group must not be
            # destroyed from DDP's destructor (with the GIL held, gloo's threads can deadlock on it)
            self.__dict__.pop("train_model", None)
            if c.compile and self.dist.distributed:
                torch._dynamo.reset()
            distributed.teardown(self.dist)
            torch.use_deterministic_algorithms(previous_deterministic)
            torch.set_num_threads(previous_threads)

    def _kept(self) -> str:
        """What a failed run leaves to continue from, for its error message."""
        out_dir = getattr(self, "out_dir", None)
        last = out_dir / "checkpoint-last.pt" if out_dir is not None else None
        if last is None or not last.is_file():
            return "no checkpoint was written yet"
        return f"the last checkpoint {last} is intact; continue with: densenet train --resume {out_dir}"

    def _on_every_rank(self, fn):
        """``fn()`` on every process; a :class:`DenseNetError` on any of them is raised on all of them.

        So that a process that cannot read the data or the checkpoint does not leave the others
        waiting in the next collective.
        """
        error, value = None, None
        try:
            value = fn()
        except DenseNetError as exc:
            error = exc
        if self.dist.distributed:
            for rank, other in enumerate(self.dist.gather_objects(error)):
                if other is not None and error is None:
                    raise type(other)(f"(rank {rank}) {other}")
        if error is not None:
            raise error
        return value

    def _decide_paths(self) -> tuple[Path | None, Path]:
        """The checkpoint to resume from (or None) and the run directory."""
        c = self.config
        checkpoint_path = find_resume_checkpoint(c.resume, c.out_dir, c.model)
        if checkpoint_path is not None:
            out_dir = Path(c.out_dir) if c.out_dir else checkpoint_path.parent
        else:
            out_dir = Path(c.out_dir) if c.out_dir else default_out_dir(c.model)
        return checkpoint_path, out_dir

    def _load_checkpoint(self, path: Path | None) -> dict | None:
        from densenet.weights import load_checkpoint

        if path is None:
            return None
        checkpoint = load_checkpoint(path)
        self._check_resumable(checkpoint, path)
        return checkpoint

    def _make_out_dir(self) -> None:
        from densenet.weights import remove_stale_temporaries

        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ResourceError(
                f"cannot create the run directory {self.out_dir}: {exc.strerror or exc}"
            ) from None
        remove_stale_temporaries(self.out_dir)  # what a killed predecessor was writing

    def _run(self) -> TrainResult:
        c, dist = self.config, self.dist
        from densenet import distributed

        # rank 0 decides where the run lives and what it resumes from; every process loads that
        decided = self._on_every_rank(lambda: self._decide_paths() if dist.is_main else None)
        checkpoint_path, out_dir = dist.broadcast_object(decided)
        self.out_dir = out_dir
        checkpoint = self._on_every_rank(lambda: self._load_checkpoint(checkpoint_path))
        self.checkpoint_source = checkpoint_path

        self.data = self._on_every_rank(lambda: load_data(c))
        self._on_every_rank(lambda: self._make_out_dir() if dist.is_main else None)
        train_set = self.data["train"]
        num_classes = c.num_classes or train_set.num_classes
        if num_classes != train_set.num_classes:
            raise ConfigError(f"--num-classes {num_classes} but the data has {train_set.num_classes} classes")
        # batch_size is per process: each process takes every world_size-th image of the epoch
        self.steps_per_epoch = len(train_set) // dist.world_size // c.batch_size
        if self.steps_per_epoch == 0:
            per = f" per process x {dist.world_size} processes" if dist.world_size > 1 else ""
            raise ConfigError(
                f"{len(train_set)} training images are fewer than one batch of {c.batch_size}{per}"
            )

        self._build(num_classes)
        self.history: list[dict] = []
        self.best = {"acc": None, "epoch": None}
        self.start_epoch, self.start_step, self.partial, self.global_step = 0, 0, None, 0
        self.elapsed_before = 0.0
        self.rebased_from = None
        if checkpoint is not None:
            self._restore(checkpoint)
        distributed.debug_log(dist, "start", start_epoch=self.start_epoch, start_step=self.start_step,
                              global_step=self.global_step, device=str(self.device), backend=dist.backend)

        if dist.is_main:
            self._write_config()
        return self._loop()

    def _check_resumable(self, checkpoint: dict, path: Path) -> None:
        stored = checkpoint.get("config") or {}
        for key in RESUME_FIXED:
            if key in stored and stored[key] != getattr(self.config, key):
                raise ConfigError(
                    f"cannot resume {path}: it was trained with {key}={stored[key]!r}, this run asks for "
                    f"{key}={getattr(self.config, key)!r}"
                )
        world = int(checkpoint.get("world_size", 1))
        if world != self.dist.world_size and int(checkpoint.get("step_in_epoch", 0)):

            def procs(n: int) -> str:
                return f"{n} process{'es' if n != 1 else ''}"

            raise ConfigError(
                f"cannot resume {path}: it stopped in the middle of an epoch of a run with {procs(world)} "
                f"and this run has {procs(self.dist.world_size)}; resume it with {procs(world)} "
                f"(densenet train --nproc {world}, or torchrun --nproc_per_node {world})"
            )

    def _build(self, num_classes: int) -> None:
        from densenet.augment import Augmenter
        from densenet.models import create_model

        c, device = self.config, self.device
        torch.manual_seed(c.seed)
        overrides = {}
        if c.dropout:
            overrides["drop_rate"] = c.dropout
        if c.memory_efficient:
            overrides["memory_efficient"] = True
        model = create_model(c.model, num_classes=num_classes, **overrides)
        if c.whiten:
            self._whiten(model)
        if c.sync_bn and self.dist.distributed:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        memory_format = torch.channels_last if c.channels_last else torch.contiguous_format
        self.model = model.to(device=device, memory_format=memory_format)
        trained = self.model
        if self.dist.distributed:
            from torch.nn.parallel import DistributedDataParallel

            from densenet.distributed import rank_seed

            # DDP starts every process from rank 0's weights and averages the gradients; self.model
            # stays the plain module (saved state dicts have no "module." prefixes)
            device_ids = [device] if device.type == "cuda" else None
            trained = DistributedDataParallel(self.model, device_ids=device_ids)
            if self.dist.rank:
                torch.manual_seed(rank_seed(c.seed, self.dist.rank))  # distinct dropout per process
        self.train_model = torch.compile(trained) if c.compile else trained
        self.optimizer = torch.optim.SGD(
            self.model.parameters(), lr=c.lr, momentum=c.momentum, nesterov=c.nesterov,
            weight_decay=c.weight_decay,
        )
        spe = self.steps_per_epoch
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, spe, c))
        self.scaler = torch.amp.GradScaler(device.type) if c.amp == "fp16" else None
        self.ema = None
        if c.ema:
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

            self.ema = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(c.ema), use_buffers=True)
        self.augmenter = Augmenter(
            self.data["train"].mean, self.data["train"].std, crop_padding=c.crop_padding, flip=c.flip,
            cutout=c.cutout, color_jitter=c.color_jitter,
            # NCHW batches even for a channels_last model: its stem convolution reorders the 3-channel
            # input for next to nothing (train steps measured equal), while a channels_last batch would
            # cost the Augmenter a transposing pass
        )
        # the data goes to the device once, as uint8
        self.train_images = self.data["train"].images.to(device)
        self.train_labels = self.data["train"].labels.to(device)
        # each process evaluates its own share of the evaluation sets (the whole sets in one process)
        from densenet.distributed import shard_dataset

        shares = {split: shard_dataset(ds, self.dist.rank, self.dist.world_size)
                  for split, ds in self.data.items() if split != "train"}
        self.eval_sets = {
            split: dataclasses.replace(ds, images=ds.images.to(device), labels=ds.labels.to(device))
            for split, ds in shares.items()
        }

    def _whiten(self, model) -> None:
        """Whiten the stem from the first 5,000 training images (no randomness: resumes rebuild it alike)."""
        from densenet.models import whiten_stem

        train_set = self.data["train"]
        images = train_set.images[:5000].float() / 255.0
        mean = torch.tensor(train_set.mean).view(1, 3, 1, 1)
        std = torch.tensor(train_set.std).view(1, 3, 1, 1)
        whiten_stem(model, (images - mean) / std)

    def _restore(self, checkpoint: dict) -> None:
        try:
            self.model.load_state_dict(checkpoint["model"])
            self.optimizer.load_state_dict(checkpoint["optimizer"])
            self.scheduler.load_state_dict(checkpoint["scheduler"])
            if self.scaler is not None and checkpoint.get("scaler"):
                self.scaler.load_state_dict(checkpoint["scaler"])
            if self.ema is not None:
                if not checkpoint.get("ema"):
                    raise TrainingError("the checkpoint has no EMA weights; resume without --ema or start afresh")
                self.ema.load_state_dict(checkpoint["ema"])
        except (KeyError, RuntimeError, ValueError) as exc:
            raise TrainingError(f"cannot resume from {self.checkpoint_source}: {exc}") from None
        self.start_epoch = int(checkpoint["epoch"])
        self.start_step = int(checkpoint.get("step_in_epoch", 0))
        self.partial = checkpoint.get("partial")
        self.global_step = int(checkpoint.get("global_step", 0))
        self.history = list(checkpoint.get("history", []))
        self.best = dict(checkpoint.get("best") or self.best)
        self.elapsed_before = float(checkpoint.get("elapsed_seconds", 0.0))
        world, dist = int(checkpoint.get("world_size", 1)), self.dist
        per_rank = checkpoint.get("rng_per_rank")
        if isinstance(per_rank, list) and len(per_rank) == dist.world_size:
            _set_rng_state(per_rank[dist.rank], self.device)
        else:
            _set_rng_state(checkpoint.get("rng", {}), self.device)
        if world != dist.world_size:
            self._rebase(world)
        if self.start_step > self.steps_per_epoch:
            raise TrainingError(f"{self.checkpoint_source} stopped at step {self.start_step}, beyond an epoch")

    def _rebase(self, world: int) -> None:
        """Continue an epoch-boundary checkpoint of a run with ``world`` processes in this one.

        The number of steps per epoch changes with the number of processes, so the step count
        (and the learning-rate schedule's position) restarts at start_epoch x steps_per_epoch.
        """
        from densenet.distributed import rank_seed

        c = self.config
        self.global_step = self.start_epoch * self.steps_per_epoch
        self.scheduler.last_epoch = self.global_step
        factor = lr_factor(self.global_step, self.steps_per_epoch, c)
        lrs = [base * factor for base in self.scheduler.base_lrs]
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        self.scheduler._last_lr = lrs
        if self.dist.rank:
            torch.manual_seed(rank_seed(c.seed, self.dist.rank))
        self.rebased_from = world

    def _meta(self, epochs_done: int, finished: bool, final_acc=None, stop_reason="") -> dict:
        from densenet.weights import make_meta

        c, train_set = self.config, self.data["train"]
        return make_meta(
            self.model, classes=train_set.classes, mean=train_set.mean, std=train_set.std,
            input_size=int(train_set.images.shape[-1]),
            training={
                "recipe": c.recipe, "dataset": c.dataset, "data": str(train_set.root),
                "train_images": len(train_set), "val_split": c.val_split, "seed": c.seed,
                "epochs": c.epochs, "epochs_completed": epochs_done, "finished": finished,
                "stop_reason": stop_reason, "best_acc": self.best["acc"], "best_epoch": self.best["epoch"],
                "final_test_acc": final_acc, "ema": c.ema, "date": datetime.now(timezone.utc).isoformat(),
                "world_size": self.dist.world_size,
                "global_batch_size": c.batch_size * self.dist.world_size,
            },
        )

    def _write_config(self) -> None:
        from densenet.weights import atomic_write_text

        resolved = asdict(self.config)
        resolved["out_dir"] = str(self.out_dir)
        info = {
            "config": resolved,
            "resolved": {
                "milestone_epochs": milestone_epochs(self.config), "warmup_epochs": warmup_epochs(self.config),
                "steps_per_epoch": self.steps_per_epoch, "train_images": len(self.data["train"]),
                "world_size": self.dist.world_size,
                "global_batch_size": self.config.batch_size * self.dist.world_size,
                "backend": self.dist.backend,
                "test_images": len(self.data["test"]), "classes": self.data["train"].classes,
                "mean": self.data["train"].mean, "std": self.data["train"].std,
                "parameters": sum(p.numel() for p in self.model.parameters()),
                "model_config": self.model.config,
            },
            "environment": environment(self.device),
            "resumed_from": str(self.checkpoint_source) if self.checkpoint_source else None,
            "started": datetime.now(timezone.utc).isoformat(),
        }
        atomic_write_text(self.out_dir / "config.json", json.dumps(info, indent=2) + "\n")

    # checkpoints -------------------------------------------------------------------------------

    def _checkpoint(self, epoch: int, step: int, partial, finished: bool) -> dict | None:
        """The checkpoint dict on rank 0, None on the others (every process must call it: it
        gathers their RNG states)."""
        rng = self.dist.gather_objects(_rng_state(self.device))
        if not self.dist.is_main:
            return None
        return {
            "format": "densenet-checkpoint",
            "format_version": 1,
            "config": asdict(self.config),
            "meta": self._meta(epoch, finished),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "ema": self.ema.state_dict() if self.ema is not None else {},
            "epoch": epoch,
            "step_in_epoch": step,
            "global_step": self.global_step,
            "partial": partial,
            "history": self.history,
            "best": self.best,
            "rng": rng[0],
            "rng_per_rank": rng if self.dist.distributed else None,
            "world_size": self.dist.world_size,
            "elapsed_seconds": self.elapsed_before + (time.monotonic() - self.t0),
            "finished": finished,
        }

    def _save(self, name: str, checkpoint: dict | None) -> None:
        from densenet.weights import save_checkpoint

        if checkpoint is None or not self.dist.is_main:
            return
        try:
            save_checkpoint(self.out_dir / name, checkpoint)
        except OSError as exc:
            previous = (self.out_dir / name).is_file()
            kept = (f"the previous checkpoint is intact; continue with: densenet train --resume {self.out_dir}"
                    if previous else self._kept())
            raise ResourceError(f"cannot write {self.out_dir / name}: {exc.strerror or exc}; {kept}") from None

    # the loop ----------------------------------------------------------------------------------

    def _eval_model(self):
        return self.ema.module if self.ema is not None else self.model

    def _evaluate(self, split: str) -> dict:
        """Evaluate on ``split``; under torchrun each process its share, the counts added up."""
        from densenet.distributed import reduce_evaluation
        from densenet.evaluate import evaluate

        c, model, share = self.config, self._eval_model(), self.eval_sets[split]
        self.dist.broadcast_buffers(model)  # everyone evaluates rank 0's BatchNorm statistics
        result = None
        if len(share):
            result = evaluate(
                model, share, batch_size=c.eval_batch_size or max(c.batch_size, 500),
                tta=c.tta, device=self.device, mean=self.augmenter.mean, std=self.augmenter.std, amp=c.amp,
                channels_last=c.channels_last,
            )
        if not self.dist.distributed:
            return result
        return reduce_evaluation(self.dist, result, list(share.classes), tta=c.tta)

    def _progress_mode(self) -> str:
        if not self.dist.is_main:
            return "none"
        mode = self.config.progress
        if mode == "auto":
            return "bar" if sys.stderr.isatty() else "lines"
        return mode

    def _loop(self) -> TrainResult:
        c = self.config
        self.t0 = time.monotonic()
        budget = c.max_minutes * 60 if c.max_minutes else None
        stop_after = int(os.environ.get(SIGTERM_AFTER_STEP_ENV, "0") or 0)
        stop_reason = "completed"
        train_seconds = 0.0
        trained_images = 0
        mid_epoch = False
        epoch = self.start_epoch

        dist = self.dist
        with StopRequest(grace=2.0 if dist.distributed else 0.0) as stop:
            if self.start_epoch < c.epochs:
                where = f" from epoch {epoch + 1}, step {self.start_step}" if self.checkpoint_source else ""
                self._say(f"training {c.model} on {len(self.data['train'])} images for {c.epochs} epochs on "
                          f"{self.device}{where}; run directory {self.out_dir}")
                if dist.distributed:
                    w, b = dist.world_size, c.batch_size
                    self._say(f"{w} processes ({dist.backend}), global batch {b * w} = {b} per process x {w}, "
                              f"lr {c.lr:g} (as given: not scaled with the number of processes)"
                              + (", synchronised BatchNorm" if c.sync_bn else ""))
                if self.rebased_from is not None:
                    self._say(f"note: the checkpoint comes from a run with {self.rebased_from} process(es), "
                              f"this one has {dist.world_size}: steps per epoch are now {self.steps_per_epoch} "
                              f"and the batches differ from those of an uninterrupted run")
            while epoch < c.epochs:
                start_step = self.start_step if epoch == self.start_epoch else 0
                # a resumed epoch's sums so far are all processes' together: rank 0 carries them
                resumed = epoch == self.start_epoch and start_step and dist.is_main
                partial = self.partial if resumed else None
                outcome = self._train_epoch(epoch, start_step, partial, stop, stop_after, budget)
                train_seconds += outcome["seconds_this_run"]
                trained_images += outcome["images_this_run"]
                if outcome["stopped"]:
                    stop_reason, mid_epoch = outcome["stopped"], True
                    checkpoint = self._checkpoint(epoch, outcome["step"], outcome["partial"], False)
                    self._save("checkpoint-last.pt", checkpoint)
                    dist.barrier()  # the others exit only once rank 0 has written it
                    self._say(f"stopped ({stop_reason}) in epoch {epoch + 1} after step {outcome['step']}/"
                              f"{self.steps_per_epoch}; saved {self.out_dir / 'checkpoint-last.pt'}")
                    break
                self._end_epoch(epoch, outcome)
                epoch += 1
                reason = stop.name if stop.signum is not None else ""
                over_budget = budget is not None and time.monotonic() - self.t0 > budget
                if not reason and over_budget and epoch < c.epochs:
                    reason = "time budget"
                reason = dist.agree_stop(reason)  # every process stops after the same epoch
                if reason:
                    stop_reason = reason
                    break
            final_acc = None
            if stop_reason in ("completed", "time budget"):
                final_acc = self._finish(epoch, stop_reason, mid_epoch)
            else:
                self._say(f"continue with: densenet train --resume {self.out_dir}")

        wall = self.elapsed_before + time.monotonic() - self.t0
        if dist.distributed:
            (trained_images,) = dist.sum([trained_images])
            (train_seconds,) = dist.max([train_seconds])
        ips = trained_images / train_seconds if train_seconds else 0.0
        from densenet.distributed import debug_enabled, debug_log

        if debug_enabled():
            from densenet.distributed import state_hash
            from densenet.weights import plain_state_dict

            debug_log(dist, "end", stop_reason=stop_reason, epochs_completed=epoch,
                      model_sha256=state_hash(plain_state_dict(self._eval_model())))
        best = "-" if self.best["acc"] is None else f"{100 * self.best['acc']:.2f}% (epoch {self.best['epoch']})"
        final = "-" if final_acc is None else f"{100 * final_acc:.2f}%"
        self._say(f"done ({stop_reason}): best {best}, final test accuracy {final}, "
                  f"wall time {wall:.0f} s, {ips:.0f} training images/s")
        exported = c.weights_dir if (c.weights_dir and stop_reason in ("completed", "time budget")) else None
        return TrainResult(
            out_dir=str(self.out_dir), weights_dir=str(exported) if exported else None,
            epochs_completed=epoch, stop_reason=stop_reason, best_acc=self.best["acc"],
            best_epoch=self.best["epoch"], final_test_acc=final_acc, wall_seconds=wall,
            images_per_second=ips, history=self.history,
        )

    def _say(self, text: str) -> None:
        if self.config.progress != "none" and self.dist.is_main:
            print(text, flush=True)

    def _train_epoch(self, epoch, start_step, partial, stop, stop_after, budget) -> dict:
        from densenet.augment import epoch_batches
        from densenet.runtime import autocast

        c, device = self.config, self.device
        rank, world = self.dist.rank, self.dist.world_size
        batches = epoch_batches(len(self.train_labels), c.batch_size, epoch=epoch, seed=c.seed, rank=rank,
                                world_size=world)
        partial = partial or {}
        loss_sum = torch.tensor(float(partial.get("loss_sum", 0.0)), dtype=torch.float64, device=device)
        correct = torch.tensor(int(partial.get("correct", 0)), dtype=torch.long, device=device)
        seen = int(partial.get("seen", 0))
        seconds_before = float(partial.get("seconds", 0.0))
        check_every = 1 if device.type == "cpu" else 25
        self.train_model.train()
        bar = None
        if self._progress_mode() == "bar":
            from tqdm import tqdm

            bar = tqdm(total=len(batches), initial=start_step, desc=f"epoch {epoch + 1}/{c.epochs}",
                       unit="batch", leave=True, dynamic_ncols=True)
        t_start = time.monotonic()
        images_this_run = 0
        stopped = ""
        step = start_step
        try:
            for step in range(start_step, len(batches)):
                idx = batches[step].to(device, non_blocking=True)
                generator = torch.Generator(device=device)
                generator.manual_seed(batch_seed(c.seed, epoch, step, rank))
                x = self.augmenter(self.train_images, generator=generator, train=True, index=idx)
                y = self.train_labels[idx]
                with autocast(device, c.amp):
                    logits = self.train_model(x)
                    loss = F.cross_entropy(logits.float(), y, label_smoothing=c.label_smoothing)
                if (step + 1) % check_every == 0 or step + 1 == len(batches):
                    self._check_finite(loss, epoch, step)
                self.optimizer.zero_grad(set_to_none=True)
                if self.scaler is not None:
                    self.scaler.scale(loss).backward()
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                else:
                    loss.backward()
                    self.optimizer.step()
                self.scheduler.step()
                if self.ema is not None:
                    self.ema.update_parameters(self.model)
                self.global_step += 1
                loss_sum += loss.detach().double() * len(idx)
                correct += (logits.detach().argmax(dim=1) == y).sum()
                seen += len(idx)
                images_this_run += len(idx)
                if bar is not None:
                    bar.update(1)
                    if (step + 1) % 10 == 0 or step + 1 == len(batches):
                        elapsed = time.monotonic() - t_start
                        bar.set_postfix(loss=f"{float(loss_sum) / seen:.3f}", acc=f"{int(correct) / seen:.3f}",
                                        lr=f"{self.optimizer.param_groups[0]['lr']:.3g}",
                                        img_s=f"{images_this_run / max(elapsed, 1e-9):.0f}", refresh=False)
                if stop_after and self.global_step == stop_after:
                    os.kill(os.getpid(), signal.SIGTERM)
                done = step + 1
                # under torchrun the processes agree (every check_every steps) so they stop together
                if done < len(batches) and (world == 1 or done % check_every == 0):
                    reason = stop.name if stop.signum is not None else ""
                    if not reason and budget is not None and time.monotonic() - self.t0 > budget:
                        reason = "time budget"
                    stopped = self.dist.agree_stop(reason)
                    if stopped:
                        break
            else:
                done = len(batches)
        finally:
            if bar is not None:
                bar.close()
        if seen or world > 1:
            self._check_finite(loss_sum, epoch, done - 1)
        seconds = time.monotonic() - t_start
        partial = {"loss_sum": float(loss_sum), "correct": int(correct), "seen": seen,
                   "seconds": seconds_before + seconds}
        from densenet.distributed import debug_enabled, debug_log, reduce_partial

        if debug_enabled():
            consumed = torch.cat(batches[start_step:done]).tolist() if done > start_step else []
            debug_log(self.dist, "epoch", epoch=epoch, start_step=start_step, steps=done, indices=consumed,
                      **partial)
        partial = reduce_partial(self.dist, partial)  # the sums of all processes
        return {"stopped": stopped, "step": done, "partial": partial, "seconds_this_run": seconds,
                "images_this_run": images_this_run}

    def _check_finite(self, loss: torch.Tensor, epoch: int, step: int) -> None:
        finite = bool(torch.isfinite(loss))
        if not self.dist.any(not finite):  # under torchrun: the loss is finite in every process
            return
        last = self.out_dir / "checkpoint-last.pt"
        kept = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint was written yet"
        value = float(loss.detach()) if not finite else "not finite in another process"
        raise TrainingError(
            f"the loss became {value} at epoch {epoch + 1}, step {step + 1} "
            f"(lr {self.optimizer.param_groups[0]['lr']:.3g}); training stopped, {kept}. "
            f"Lower --lr or add --warmup-epochs"
        )

    def _end_epoch(self, epoch: int, outcome: dict) -> None:
        c = self.config
        from densenet.plots import plot_curves

        partial = outcome["partial"]
        seen = max(partial["seen"], 1)
        row = {
            "epoch": epoch + 1,
            "train_loss": partial["loss_sum"] / seen,
            "train_acc": partial["correct"] / seen,
            "lr": self.optimizer.param_groups[0]["lr"],
            "train_seconds": partial["seconds"],
            "images_per_second": partial["seen"] / partial["seconds"] if partial["seconds"] else None,
        }
        evaluate_now = (epoch + 1) % c.eval_every == 0 or epoch + 1 == c.epochs
        t_eval = time.monotonic()
        for split in ("val", "test"):
            row[f"{split}_loss"] = row[f"{split}_acc"] = None
            if evaluate_now and split in self.eval_sets:
                result = self._evaluate(split)
                row[f"{split}_loss"], row[f"{split}_acc"] = result["loss"], result["top1"]
        row["eval_seconds"] = time.monotonic() - t_eval
        row["peak_memory_mb"] = _peak_memory_mb(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        row["elapsed_seconds"] = self.elapsed_before + time.monotonic() - self.t0
        self.history.append(row)

        select = row["val_acc"] if "val" in self.eval_sets else row["test_acc"]
        improved = select is not None and (self.best["acc"] is None or select > self.best["acc"])
        if improved:
            self.best = {"acc": select, "epoch": epoch + 1}
        checkpoint = self._checkpoint(epoch + 1, 0, None, finished=epoch + 1 >= c.epochs)
        if self.dist.is_main:
            if improved:  # best first: if it fails, last still points at the epoch before, which is redone
                self._save("checkpoint-best.pt", checkpoint)
            self._save("checkpoint-last.pt", checkpoint)
            _write_metrics(self.out_dir, self.history)
            self._log_tensorboard(row)
            plot_curves(self.history, self.out_dir / "curves.png", title=f"{c.model} ({c.dataset})")
        self._report_epoch(row)

    def _log_tensorboard(self, row: dict) -> None:
        """The epoch's scalars as TensorBoard events (step = epoch), with --tensorboard."""
        c = self.config
        if c.tensorboard is None:
            return
        if getattr(self, "_tb", None) is None:
            from torch.utils.tensorboard import SummaryWriter

            folder = Path(c.tensorboard) if c.tensorboard else self.out_dir / "tensorboard"
            # a resumed run drops the events an interrupted run wrote after its checkpoint
            self._tb = SummaryWriter(str(folder), purge_step=row["epoch"])
        for key, tag in (("train_loss", "loss/train"), ("test_loss", "loss/test"), ("val_loss", "loss/val"),
                         ("train_acc", "accuracy/train"), ("test_acc", "accuracy/test"), ("val_acc", "accuracy/val"),
                         ("lr", "lr"), ("images_per_second", "speed/train_images_per_second"),
                         ("peak_memory_mb", "memory/peak_mb")):
            if row.get(key) is not None:
                self._tb.add_scalar(tag, row[key], row["epoch"])
        self._tb.flush()

    def _report_epoch(self, row: dict) -> None:
        if self._progress_mode() == "none":
            return

        def pct(v):
            return "-" if v is None else f"{100 * v:.2f}%"

        parts = [f"epoch {row['epoch']}/{self.config.epochs}", f"loss {row['train_loss']:.4f}",
                 f"train {pct(row['train_acc'])}"]
        if row.get("val_acc") is not None:
            parts.append(f"val {pct(row['val_acc'])}")
        if row.get("test_acc") is not None:
            parts.append(f"test {pct(row['test_acc'])}")
        ips = row["images_per_second"]
        parts += [f"lr {row['lr']:.3g}", f"{row['train_seconds']:.0f}+{row['eval_seconds']:.0f} s",
                  f"{ips:.0f} img/s" if ips else ""]
        self._say("  ".join(p for p in parts if p))

    def _finish(self, epochs_done: int, stop_reason: str, mid_epoch: bool) -> float:
        """Write the final weights (run directory and weights directory); return their test accuracy."""
        from densenet.weights import remove_stale_temporaries, save_model

        c = self.config
        last = self.history[-1] if self.history else None
        if mid_epoch or last is None or last.get("test_acc") is None:
            final_acc = self._evaluate("test")["top1"]
        else:
            final_acc = last["test_acc"]
        if not self.dist.is_main:
            return final_acc
        finished = stop_reason == "completed"
        meta = self._meta(epochs_done, finished, final_acc, stop_reason)
        meta["training"]["test_acc_per_epoch"] = [row.get("test_acc") for row in self.history]
        meta["training"]["wall_seconds"] = self.elapsed_before + time.monotonic() - self.t0
        model = self._eval_model()
        save_model(self.out_dir, model, meta)
        if c.weights_dir:
            try:
                remove_stale_temporaries(c.weights_dir)
                save_model(c.weights_dir, model, meta)
            except OSError as exc:
                raise ResourceError(f"cannot write the weights to {c.weights_dir}: {exc.strerror or exc}") from None
            self._say(f"weights: {Path(c.weights_dir) / 'model.safetensors'} and model.json")
        return final_acc


# --- command line -----------------------------------------------------------------------------


def add_arguments(parser) -> None:
    B = __import__("argparse").BooleanOptionalAction
    g = parser.add_argument_group("model and data")
    g.add_argument("--recipe", default=None, help="named preset (see --list-recipes); flags override it")
    g.add_argument("--list-recipes", action="store_true", help="show the recipes and what they set, then exit")
    g.add_argument("--model", default=None, help="model name (default densenet121-cifar; see densenet analyze --list)")
    g.add_argument("--dataset", default=None, choices=("cifar10", "cifar100"))
    g.add_argument("--data-dir", default=None, help="dataset directory (default: $DENSENET_DATA, else ./data)")
    g.add_argument("--num-classes", type=int, default=None, help="default: the number of classes in the data")
    g.add_argument("--val-split", type=int, default=None, help="hold out N training images for validation")
    g.add_argument("--subset", type=int, default=None, help="train on N training images (seeded draw)")
    g.add_argument("--test-subset", type=int, default=None, help="evaluate on N test images")
    g.add_argument("--dropout", type=float, default=None, help="dropout after each dense layer's conv")
    g.add_argument("--memory-efficient", action=B, default=None, help="checkpoint the concatenations")
    g.add_argument("--whiten", action=B, default=None,
                   help="set the stem to frozen patch-whitening filters of the training images (the model's "
                        "stem must have 2 x 27 = 54 channels, as the densenet-cpu-* models do)")

    g = parser.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=None, help="default 200")
    g.add_argument("--batch-size", type=int, default=None,
                   help="images per step per process (default 64); under torchrun the global batch is this "
                        "x the number of processes, and --lr is used as given")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (default 0.01)")
    g.add_argument("--momentum", type=float, default=None, help="default 0.9")
    g.add_argument("--nesterov", action=B, default=None)
    g.add_argument("--weight-decay", type=float, default=None, help="default 1e-4")
    g.add_argument("--schedule", default=None, choices=SCHEDULES, help="default step")
    g.add_argument("--milestones", default=None,
                   help="step epochs, e.g. 50,75, or fractions, e.g. 0.5,0.75 (default 0.25,0.375: 50,75 of 200)")
    g.add_argument("--gamma", type=float, default=None, help="factor at each milestone (default 0.1)")
    g.add_argument("--warmup-epochs", type=float, default=None, help="linear warm-up (default 0; onecycle 30%%)")
    g.add_argument("--label-smoothing", type=float, default=None)
    g.add_argument("--ema", type=float, default=None, metavar="DECAY", help="keep and evaluate an EMA of the weights")

    g = parser.add_argument_group("augmentation and evaluation")
    g.add_argument("--crop-padding", type=int, default=None, help="random crop of the padded image (default 4)")
    g.add_argument("--no-flip", dest="flip", action="store_const", const=False, default=None)
    g.add_argument("--cutout", type=int, default=None, help="cutout square size (default 0: off)")
    g.add_argument("--color-jitter", type=float, default=None, help="brightness/contrast/saturation strength")
    g.add_argument("--tta", action=B, default=None, help="flip test-time augmentation in evaluation")
    g.add_argument("--eval-every", type=int, default=None, help="evaluate every N epochs (and at the end)")
    g.add_argument("--eval-batch-size", type=int, default=None)

    g = parser.add_argument_group("hardware")
    g.add_argument("--device", default=None, help="auto (CUDA when present), cpu or cuda")
    g.add_argument("--amp", default=None, choices=AMPS, help="autocast precision (default none)")
    g.add_argument("--channels-last", action=B, default=None, help="NHWC memory format (default on)")
    g.add_argument("--compile", action=B, default=None, help="torch.compile the model")
    g.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    g.add_argument("--seed", type=int, default=None, help="default 0")

    g = parser.add_argument_group("run")
    g.add_argument("--out-dir", default=None, help="run directory (default runs/<model>-<timestamp>)")
    g.add_argument("--weights-dir", default=None, help="where the final weights go (default densenet121_weights)")
    g.add_argument("--resume", default=None, metavar="PATH|auto",
                   help="continue from a checkpoint or run directory; auto: from --out-dir (or the newest "
                        "unfinished runs/<model>-*) if there is a checkpoint, else start afresh")
    g.add_argument("--max-minutes", type=float, default=None, help="stop cleanly after this much wall time")
    g.add_argument("--progress", default=None, choices=PROGRESS, help="auto: a bar on a terminal, else lines")
    g.add_argument("--tensorboard", nargs="?", const="", default=None, metavar="DIR",
                   help="write per-epoch losses, accuracies, learning rate, images/s and peak memory as "
                        "TensorBoard events to DIR (default <run directory>/tensorboard); needs the "
                        "tensorboard extra")

    g = parser.add_argument_group("distributed (torchrun -m densenet train ...; see docs/DISTRIBUTED.md)")
    g.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="train with N processes on this machine (one per GPU): runs python -m "
                        "torch.distributed.run --standalone --nproc_per_node N -m densenet train <the other "
                        "arguments>")
    g.add_argument("--sync-bn", action=B, default=None,
                   help="under torchrun: BatchNorm statistics over the global batch (SyncBatchNorm; "
                        "CUDA only)")
    g.add_argument("--dist-timeout", type=float, default=None, metavar="SECONDS",
                   help="under torchrun: how long a process waits for the others (start-up, each collective) "
                        "before failing (default 300)")


def format_recipes() -> str:
    defaults = asdict(TrainConfig())
    lines = []
    for name, recipe in RECIPES.items():
        lines.append(f"{name}: {recipe['description']}")
        for key, value in recipe["settings"].items():
            mark = "" if defaults.get(key) != value else "  (default)"
            lines.append(f"    --{key.replace('_', '-')} {value}{mark}")
    return "\n".join(lines)


def explicit_settings(args) -> dict:
    """The settings given on the command line (argparse leaves the others None)."""
    values = {}
    for name in config_fields():
        if name in ("recipe",):
            continue
        value = getattr(args, name, None)
        if value is not None:
            values[name] = parse_milestones(value) if name == "milestones" else value
    return values


def config_from_args(args) -> TrainConfig:
    """Built-in defaults, then the recipe, then explicit flags; on resume the checkpoint's settings first."""
    from densenet.weights import load_checkpoint

    given = explicit_settings(args)
    model = given.get("model") or (recipe_settings(args.recipe)["model"] if args.recipe else TrainConfig.model)
    path = find_resume_checkpoint(given.get("resume"), given.get("out_dir"), model)
    if path is None:
        values = recipe_settings(args.recipe) if args.recipe else {}
        values.update(given)
        if given.get("resume") == "auto":
            values["resume"] = None
        return TrainConfig(**values)
    stored = load_checkpoint(path).get("config")
    if not isinstance(stored, dict):
        raise WeightsError(f"{path} holds no training configuration")
    if args.recipe and stored.get("recipe") != args.recipe:
        raise ConfigError(f"{path} was trained with recipe {stored.get('recipe')!r}, not {args.recipe!r}")
    values = {k: v for k, v in stored.items() if k in config_fields()}
    values.update(given)
    values["resume"] = str(path)
    values["out_dir"] = given.get("out_dir", str(path.parent))
    return TrainConfig(**values)


def run(args) -> int:
    if args.list_recipes:
        print(format_recipes())
        return 0
    if getattr(args, "nproc", None) is not None:
        import argparse

        from densenet.distributed import argv_from_args, launch

        parser = argparse.ArgumentParser()
        add_arguments(parser)
        return launch(args.nproc, argv_from_args(parser, args, skip={"nproc"}))
    config = config_from_args(args)
    validate(config)
    # CPU tensors: keep freed memory for the next step instead of faulting it in again page by page.
    # Measured (docs/BENCHMARKS.md): under glibc's default policy the memory-efficient mode's steps
    # took 1.6-1.7x the standard mode's, with this one 1.1-1.25x, for 20% more peak memory (still
    # under half the standard mode's).
    set_malloc_policy("retain")
    result = _Trainer(config).run()
    return result.exit_code
