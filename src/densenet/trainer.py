"""The training loop: :func:`train` runs a :class:`densenet.config.TrainConfig` and returns a summary.

The whole training set sits on the device as uint8; each batch's indices come from
:func:`densenet.augment.epoch_batches` and its augmentation from a generator seeded with (seed,
epoch, batch index), and the global RNG state is checkpointed, so a resumed run -- even one stopped
in the middle of an epoch -- continues with exactly the batches, and on the CPU exactly the
weights, of an uninterrupted one. Checkpoints are written atomically to the run directory
(:class:`densenet.rundir.RunDir`).

Reading order: :class:`Trainer` ``run`` (process-wide set-up and the errors a run can end with),
``_run`` (paths, data, model, restore), ``_loop`` (epochs), ``_train_epoch`` (batches) and
``_step`` (one optimisation step). Where a run is lives in one :class:`RunState`; an epoch's
running sums in :class:`EpochSums`.

Under ``torchrun`` (or ``densenet train --nproc N``) the same code trains with
DistributedDataParallel (see :mod:`densenet.distributed` and docs/DISTRIBUTED.md): ``batch_size``
is per process, each process trains on its share of every epoch, metrics and evaluation are
reduced across processes, and only rank 0 prints and writes files.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from densenet import distributed
from densenet.augment import Augmenter, epoch_batches, progressive_side, resize_batch
from densenet.budget import EVAL_COST, FIT_STEPS, budget_reserve, fitting_epochs
from densenet.config import (
    RESUME_FIXED,
    TrainConfig,
    augment_settings,
    lr_factor,
    make_config,
    milestone_epochs,
    model_overrides,
    parse_milestones,
    validate,
    warmup_epochs,
)
from densenet.data import load_splits
from densenet.errors import ConfigError, DenseNetError, ResourceError, TrainingError
from densenet.files import remove_stale_temporaries
from densenet.inference import evaluate, tta_views, views_label
from densenet.models import whiten_stem
from densenet.optimization import Optimization
from densenet.plots import plot_curves
from densenet.registry import create_model
from densenet.rundir import RunDir, default_out_dir, find_resume_checkpoint
from densenet.runtime import autocast, environment, fast_amp, peak_memory_mb
from densenet.weights import load_checkpoint, make_meta, plain_state_dict, save_checkpoint, save_model

__all__ = ["train", "Trainer", "TrainResult", "RunState", "EpochSums", "StopRequest", "SIGTERM_AFTER_STEP_ENV",
           "batch_seed", "seeded_subset", "load_data"]

# test hook: send SIGTERM to this process after this many optimizer steps (global count); see step_hooks
SIGTERM_AFTER_STEP_ENV = "DENSENET_SIGTERM_AFTER_STEP"
WHITEN_IMAGES = 5000  # the stem's whitening statistics come from the first this-many training images


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
    splits = ("train", "val", "test") if config.val_split else ("train", "test")
    data = load_splits(config.data_dir, config.dataset, splits, val_split=config.val_split, seed=config.seed)
    data["train"] = seeded_subset(data["train"], config.subset, config.seed)
    data["test"] = seeded_subset(data["test"], config.test_subset, 0)
    return data


# --- run state --------------------------------------------------------------------------------


@dataclass
class EpochSums:
    """An epoch's running sums so far: what a mid-epoch checkpoint carries (``partial``) to its resumption."""

    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    seconds: float = 0.0

    @classmethod
    def from_checkpoint(cls, value: dict | None) -> EpochSums:
        return cls(**value) if value else cls()


@dataclass
class EpochOutcome:
    """What :meth:`Trainer._train_epoch` did: the sums, where it stopped and why (``""``: it finished)."""

    sums: EpochSums
    step: int
    stopped: str = ""
    seconds_this_run: float = 0.0
    images_this_run: int = 0


@dataclass
class RunState:
    """Where a run is, besides the tensors: what a checkpoint records and a resumed run starts from."""

    epoch: int = 0  # epochs completed
    step_in_epoch: int = 0  # steps done in the current epoch (a mid-epoch stop)
    global_step: int = 0
    partial: EpochSums | None = None  # the current epoch's sums at a mid-epoch stop
    history: list[dict] = field(default_factory=list)  # one row per completed epoch (metrics.csv)
    best_acc: float | None = None
    best_epoch: int | None = None
    elapsed_before: float = 0.0  # wall seconds of the earlier processes of this run
    fitted_epochs: float | None = None  # the epochs --fit-epochs chose (the last one may end early)
    # 0 before --augment-from's fraction, 1 inside the augmentation, 2 after --augment-until's; only ever
    # advances, so a refit that moves a fraction past the current step does not switch the augmentation back
    augment_phase: int = 0

    def checkpoint_fields(self) -> dict:
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
                "partial": asdict(self.partial) if self.partial else None, "history": self.history,
                "best": {"acc": self.best_acc, "epoch": self.best_epoch}, "fitted_epochs": self.fitted_epochs,
                "augment_phase": self.augment_phase}

    @classmethod
    def from_checkpoint(cls, checkpoint: dict) -> RunState:
        best = checkpoint.get("best") or {}
        partial = checkpoint.get("partial")
        return cls(epoch=int(checkpoint["epoch"]), step_in_epoch=int(checkpoint.get("step_in_epoch", 0)),
                   global_step=int(checkpoint.get("global_step", 0)),
                   partial=EpochSums.from_checkpoint(partial) if partial else None,
                   history=list(checkpoint.get("history", [])), best_acc=best.get("acc"),
                   best_epoch=best.get("epoch"), elapsed_before=float(checkpoint.get("elapsed_seconds", 0.0)),
                   fitted_epochs=checkpoint.get("fitted_epochs"),
                   augment_phase=int(checkpoint.get("augment_phase", 0)))


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


def step_hooks() -> list[Callable[[int], None]]:
    """Callbacks run after every optimizer step with the global step count: the test hooks.

    One so far: with ``$DENSENET_SIGTERM_AFTER_STEP=N`` the process sends itself SIGTERM after step
    N, which the fault-injection and resume tests use to stop a run at an exact step.
    """
    stop_after = int(os.environ.get(SIGTERM_AFTER_STEP_ENV, "0") or 0)
    if not stop_after:
        return []

    def sigterm(step: int) -> None:
        if step == stop_after:
            os.kill(os.getpid(), signal.SIGTERM)

    return [sigterm]


# --- the trainer ------------------------------------------------------------------------------


def train(config: TrainConfig | dict | None = None, **overrides) -> TrainResult:
    """Train a model; see :class:`TrainConfig` for the settings and :class:`densenet.rundir.RunDir` for the files.

    Returns a :class:`TrainResult`. SIGINT/SIGTERM stop the run after the current step with a
    checkpoint (``stop_reason`` names the signal); a loss that is not finite raises
    :class:`TrainingError` and leaves the last good checkpoint in place.
    """
    config = make_config(config, **overrides)
    validate(config)
    return Trainer(config).run()


def cpp_compiler() -> str | None:
    """The C++ compiler torch.compile would build CPU kernels with, or None where there is none."""
    names = [os.environ.get("CXX"), "g++", "clang++", "c++"]
    return next((found for name in names if name and (found := shutil.which(name))), None)


class Trainer:
    """One training run of a validated :class:`TrainConfig` (use :func:`train`)."""

    def __init__(self, config: TrainConfig):
        self.config = config
        self.dist = distributed.Context()
        self.run_dir: RunDir | None = None
        self.state = RunState()
        self.on_step = step_hooks()
        self._tb = None
        self.final_reserve = 0.0  # seconds the end of a budgeted run will take, as far as known (_budget_spent)
        self.view_seconds: list[float] = []  # the seconds of each evaluation so far, per view
        self.final_views: int | None = None  # the views of the final test accuracy's evaluation (_finish)
        self.cost_done = 0.0  # this process's optimizer steps, each weighted by its pixels (--low-res: < 1)
        self.side = None  # the side of the last training batch (--low-res reports its changes)
        self.strong = None  # whether the last training batch had crops and cutout (--augment-from/--augment-until report it)

    # process-wide set-up, and the errors a run can end with ---------------------------------------

    def run(self) -> TrainResult:
        c = self.config
        previous_deterministic = torch.are_deterministic_algorithms_enabled()
        previous_threads = torch.get_num_threads()
        try:
            # under torchrun: join the process group; the device is cuda:LOCAL_RANK or the CPU
            self.dist = distributed.setup(c.device, c.dist_timeout)
            self.device = self.dist.device
            if c.amp == "auto":  # resolved once, so that config.json and the checkpoint say what ran
                self.config = c = dataclasses.replace(c, amp=fast_amp(self.device))
                self._say(f"--amp auto: {c.amp} on {self.device}")
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
            if self._tb is not None:
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
        if self.run_dir is None or not self.run_dir.last.is_file():
            return "no checkpoint was written yet"
        return f"the last checkpoint {self.run_dir.last} is intact; continue with: densenet train --resume {self.run_dir}"

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

    # the run: paths, data, model, restore ------------------------------------------------------

    def _run(self) -> TrainResult:
        c, dist = self.config, self.dist
        self.t0 = time.monotonic()  # the budget and the wall time count the loading of the data too
        # rank 0 decides where the run lives and what it resumes from; every process loads that
        decided = self._on_every_rank(lambda: self._decide_paths() if dist.is_main else None)
        checkpoint_path, out_dir = dist.broadcast_object(decided)
        self.run_dir = RunDir(out_dir)
        self.out_dir = self.run_dir.path
        checkpoint = self._on_every_rank(lambda: self._load_checkpoint(checkpoint_path))
        self.checkpoint_source = checkpoint_path

        self.data = self._on_every_rank(lambda: load_data(c))
        self._on_every_rank(lambda: self.run_dir.create() if dist.is_main else None)
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
        self.full_side = int(train_set.images.shape[-1])
        if c.low_res and c.low_res >= self.full_side:
            raise ConfigError(f"--low-res {c.low_res} must be below the images' side, {self.full_side}")

        self._build(num_classes)
        self.rebased_from = None
        if checkpoint is not None:
            self._restore(checkpoint)
        distributed.debug_log(dist, "start", start_epoch=self.state.epoch, start_step=self.state.step_in_epoch,
                              global_step=self.state.global_step, device=str(self.device), backend=dist.backend)
        if dist.is_main:
            self._write_config()
        return self._loop()

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
        if path is None:
            return None
        checkpoint = load_checkpoint(path)
        self._check_resumable(checkpoint, path)
        return checkpoint

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
            then, now = _processes(world), _processes(self.dist.world_size)
            raise ConfigError(f"cannot resume {path}: it stopped in the middle of an epoch of a run with {then} and "
                              f"this run has {now}; resume it with {then} (densenet train --nproc {world}, or "
                              f"torchrun --nproc_per_node {world})")

    def _build(self, num_classes: int) -> None:
        c, device = self.config, self.device
        torch.manual_seed(c.seed)
        model = create_model(c.model, num_classes=num_classes, **model_overrides(c))
        if c.whiten:
            self._whiten(model)
        if c.bn_momentum is not None:
            for module in model.modules():
                if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                    module.momentum = c.bn_momentum
        if c.sync_bn and self.dist.distributed:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        memory_format = torch.channels_last if c.channels_last else torch.contiguous_format
        self.model = model.to(device=device, memory_format=memory_format)
        trained = self.model
        if self.dist.distributed:
            from torch.nn.parallel import DistributedDataParallel

            # DDP starts every process from rank 0's weights and averages the gradients; self.model
            # stays the plain module (saved state dicts have no "module." prefixes)
            device_ids = [device] if device.type == "cuda" else None
            trained = DistributedDataParallel(self.model, device_ids=device_ids)
            if self.dist.rank:
                torch.manual_seed(distributed.rank_seed(c.seed, self.dist.rank))  # distinct dropout per process
        if c.compile and device.type == "cpu" and not cpp_compiler():
            raise ConfigError("--compile on the CPU needs a C++ compiler for torch.compile's kernels and none "
                              "was found ($CXX, g++, clang++, c++): install one or pass --no-compile")
        # dynamic=False: one graph specialised to each input size (progressive resizing has three and the
        # batches are all full) rather than dynamo's shape-generic graph from the second size on
        self.train_model = torch.compile(trained, dynamic=False) if c.compile else trained
        spe = self.steps_per_epoch
        self.opt = Optimization(self.model, c, lambda s: lr_factor(s, spe, c, self.total_steps()), device.type)
        # NCHW batches even for a channels_last model: its stem convolution reorders the 3-channel
        # input for next to nothing (train steps measured equal), while a channels_last batch would
        # cost the Augmenter a transposing pass
        self.augmenter = Augmenter(self.data["train"].mean, self.data["train"].std, **augment_settings(c))
        # the data goes to the device once, as uint8
        self.train_images = self.data["train"].images.to(device)
        self.train_labels = self.data["train"].labels.to(device)
        # each process evaluates its own share of the evaluation sets (the whole sets in one process)
        shares = {split: distributed.shard_dataset(ds, self.dist.rank, self.dist.world_size)
                  for split, ds in self.data.items() if split != "train"}
        self.eval_sets = {
            split: dataclasses.replace(ds, images=ds.images.to(device), labels=ds.labels.to(device))
            for split, ds in shares.items()
        }

    def _whiten(self, model) -> None:
        """Whiten the stem from the first training images (no randomness: resumes rebuild it alike);
        frozen, or with --train-stem trained from there on."""
        train_set = self.data["train"]
        images = train_set.images[:WHITEN_IMAGES].float() / 255.0
        mean = torch.tensor(train_set.mean).view(1, 3, 1, 1)
        std = torch.tensor(train_set.std).view(1, 3, 1, 1)
        whiten_stem(model, (images - mean) / std)
        if self.config.train_stem:  # the whitening is only the filters' start
            model.features.conv0.weight.requires_grad_(True)

    def _restore(self, checkpoint: dict) -> None:
        try:
            self.model.load_state_dict(checkpoint["model"])
            self.opt.load_state_dict(checkpoint)
            self.state = RunState.from_checkpoint(checkpoint)
            if self.config.fit_epochs and self.state.fitted_epochs:
                self.config.epochs = math.ceil(self.state.fitted_epochs)
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:
            raise TrainingError(f"cannot resume from {self.checkpoint_source}: {exc}") from None
        world, dist = int(checkpoint.get("world_size", 1)), self.dist
        per_rank = checkpoint.get("rng_per_rank")
        if isinstance(per_rank, list) and len(per_rank) == dist.world_size:
            _set_rng_state(per_rank[dist.rank], self.device)
        else:
            _set_rng_state(checkpoint.get("rng", {}), self.device)
        if world != dist.world_size:
            self._rebase(world)
        if self.state.step_in_epoch > self.steps_per_epoch:
            raise TrainingError(f"{self.checkpoint_source} stopped at step {self.state.step_in_epoch}, beyond an epoch")

    def _rebase(self, world: int) -> None:
        """Continue an epoch-boundary checkpoint of a run with ``world`` processes in this one.

        The number of steps per epoch changes with the number of processes, so the step count
        (and the learning-rate schedule's position) restarts at epoch x steps_per_epoch.
        """
        c = self.config
        self.state.global_step = self.state.epoch * self.steps_per_epoch
        factor = lr_factor(self.state.global_step, self.steps_per_epoch, c, self.total_steps())
        self.opt.rebase(self.state.global_step, factor)
        if self.dist.rank:
            torch.manual_seed(distributed.rank_seed(c.seed, self.dist.rank))
        self.rebased_from = world

    def _meta(self, epochs_done: int, finished: bool, final_acc=None, stop_reason="") -> dict:
        c, train_set = self.config, self.data["train"]
        return make_meta(
            self.model, classes=train_set.classes, mean=train_set.mean, std=train_set.std,
            input_size=int(train_set.images.shape[-1]),
            training={
                "recipe": c.recipe, "dataset": c.dataset, "data": str(train_set.root),
                "train_images": len(train_set), "val_split": c.val_split, "seed": c.seed,
                "epochs": c.epochs, "fitted_epochs": self.state.fitted_epochs, "epochs_completed": epochs_done,
                "finished": finished,
                "stop_reason": stop_reason, "best_acc": self.state.best_acc, "best_epoch": self.state.best_epoch,
                "final_test_acc": final_acc, "ema": c.ema, "lookahead": c.lookahead,
                "date": datetime.now(timezone.utc).isoformat(),
                "world_size": self.dist.world_size,
                "global_batch_size": c.batch_size * self.dist.world_size,
            },
        )

    def _write_config(self) -> None:
        self._started = getattr(self, "_started", None) or datetime.now(timezone.utc).isoformat()
        resolved = asdict(self.config)
        resolved["out_dir"] = str(self.out_dir)
        self.run_dir.write_config({
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
            "started": self._started,
        })

    # checkpoints -------------------------------------------------------------------------------

    def _checkpoint(self, finished: bool) -> dict | None:
        """The checkpoint of :attr:`state` on rank 0, None on the others (every process must call
        it: it gathers their RNG states)."""
        rng = self.dist.gather_objects(_rng_state(self.device))
        if not self.dist.is_main:
            return None
        return {
            "format": "densenet-checkpoint",
            "format_version": 1,
            "config": asdict(self.config),
            "meta": self._meta(self.state.epoch, finished),
            "model": self.model.state_dict(),
            **self.opt.state_dict(),  # optimizer, scheduler, muon, scaler, ema, lookahead
            **self.state.checkpoint_fields(),
            "rng": rng[0],
            "rng_per_rank": rng if self.dist.distributed else None,
            "world_size": self.dist.world_size,
            "elapsed_seconds": self.state.elapsed_before + (time.monotonic() - self.t0),
            "finished": finished,
        }

    def _save(self, path: Path, checkpoint: dict | None) -> None:
        if checkpoint is None or not self.dist.is_main:
            return
        try:
            save_checkpoint(path, checkpoint)
        except OSError as exc:
            kept = (f"the previous checkpoint is intact; continue with: densenet train --resume {self.out_dir}"
                    if path.is_file() else self._kept())
            raise ResourceError(f"cannot write {path}: {exc.strerror or exc}; {kept}") from None

    # the loop ----------------------------------------------------------------------------------

    def _loop(self) -> TrainResult:
        c, dist, state = self.config, self.dist, self.state
        budget = c.max_minutes * 60 if c.max_minutes else None
        stop_reason, mid_epoch = "completed", False
        train_seconds, trained_images = 0.0, 0
        besides_seconds, epochs_here = 0.0, 0  # each epoch's evaluation, checkpoint and plot, for refits
        start_epoch, start_step = state.epoch, state.step_in_epoch

        refit = None
        if c.fit_epochs and state.fitted_epochs is None:  # also a resumed run stopped before its fit
            self.on_step.append(self._fit_hook(budget, state.global_step))
            refit = c.epochs  # this process fits, and fits again after each epoch, up to this many
        with StopRequest(grace=2.0 if dist.distributed else 0.0) as stop:
            if start_epoch < c.epochs:
                self._announce(start_epoch, start_step)
            while state.epoch < c.epochs:
                resumed = state.epoch == start_epoch and start_step
                # a resumed epoch's sums so far are all processes' together: rank 0 carries them
                sums = state.partial if resumed and dist.is_main else None
                epoch_started = time.monotonic()
                outcome = self._train_epoch(state.epoch, start_step if resumed else 0, sums, stop, budget)
                train_seconds += outcome.seconds_this_run
                trained_images += outcome.images_this_run
                if outcome.stopped:
                    stop_reason, mid_epoch = outcome.stopped, True
                    state.step_in_epoch, state.partial = outcome.step, outcome.sums
                    self._save(self.run_dir.last, self._checkpoint(finished=False))
                    dist.barrier()  # the others exit only once rank 0 has written it
                    self._say(f"stopped ({stop_reason}) in epoch {state.epoch + 1} after step {outcome.step}/"
                              f"{self.steps_per_epoch}; saved {self.run_dir.last}")
                    break
                self._end_epoch(outcome)
                if refit is not None and state.fitted_epochs is not None and state.epoch < c.epochs:
                    besides_seconds += time.monotonic() - epoch_started - outcome.seconds_this_run
                    epochs_here += 1
                    self._refit(budget, train_seconds, besides_seconds / epochs_here, most=refit)
                reason = stop.name if stop.signum is not None else ""
                if not reason and self._budget_spent(budget) and state.epoch < c.epochs:
                    reason = "time budget"
                reason = dist.agree_stop(reason)  # every process stops after the same epoch
                if reason:
                    stop_reason = reason
                    break
            final_acc = None
            if stop_reason in ("completed", "time budget"):
                final_acc = self._finish(stop_reason, mid_epoch)
            else:
                self._say(f"continue with: densenet train --resume {self.out_dir}")

        wall = state.elapsed_before + time.monotonic() - self.t0
        if dist.distributed:
            (trained_images,) = dist.sum([trained_images])
            (train_seconds,) = dist.max([train_seconds])
        ips = trained_images / train_seconds if train_seconds else 0.0
        if distributed.debug_enabled():
            distributed.debug_log(dist, "end", stop_reason=stop_reason, epochs_completed=state.epoch,
                                  model_sha256=distributed.state_hash(plain_state_dict(self._eval_model())))
        best = "-" if state.best_acc is None else f"{100 * state.best_acc:.2f}% (epoch {state.best_epoch})"
        final = "-" if final_acc is None else f"{100 * final_acc:.2f}%" + (
            f" ({views_label(self.final_views)})" if self.final_views else "")
        self._say(f"done ({stop_reason}): best {best}, final test accuracy {final}, "
                  f"wall time {wall:.0f} s, {ips:.0f} training images/s")
        exported = c.weights_dir if (c.weights_dir and stop_reason in ("completed", "time budget")) else None
        return TrainResult(
            out_dir=str(self.out_dir), weights_dir=str(exported) if exported else None,
            epochs_completed=state.epoch, stop_reason=stop_reason, best_acc=state.best_acc,
            best_epoch=state.best_epoch, final_test_acc=final_acc, wall_seconds=wall,
            images_per_second=ips, history=state.history,
        )

    def _fit_hook(self, budget: float, base: int) -> Callable[[int], None]:
        """The step callback of --fit-epochs: times steps FIT_STEPS of this process (which began after
        global step ``base``), then sets ``config.epochs``."""
        c, dist, started = self.config, self.dist, {}

        def fit(global_step: int) -> None:
            first, last = FIT_STEPS
            step = global_step - base
            if step == first:
                started["time"], started["cost"] = time.monotonic(), self.cost_done
            if step != last or "time" not in started:
                return
            # a full-size step's time (--low-res: the timed steps may be smaller ones)
            (per_step,) = dist.max([(time.monotonic() - started["time"]) / (self.cost_done - started["cost"])])
            (elapsed,) = dist.max([time.monotonic() - self.t0])
            # an evaluation, not yet timed, at EVAL_COST of a training step per image
            images = sum(len(ds) for ds in self.data.values() if ds is not self.data["train"])
            evaluation = images / c.batch_size * per_step * EVAL_COST
            views, extra = self._eval_views()
            # never fewer epochs than the warm-up needs or than this run is already in (a tiny epoch)
            least = max(math.floor(warmup_epochs(c)) + 1, self.state.epoch + 1)
            epochs = fitting_epochs(budget, elapsed, per_step, global_step, self.steps_per_epoch, views * evaluation,
                                    c.eval_every, most=max(c.epochs, least), least=least, extra_seconds=extra * evaluation,
                                    step_cost=self._step_cost())
            self._say(f"--fit-epochs: {per_step:.3f} s per step over steps {first + 1}-{last}, so {epochs:.2f} of "
                      f"at most {c.epochs} epochs fit in the {budget / 60:g}-minute budget")
            self._set_fitted(epochs)

        return fit

    def _refit(self, budget: float, train_seconds: float, besides: float, most: int) -> None:
        """--fit-epochs after an epoch: fit the epochs again from this process's measured times so far
        (``train_seconds`` for the steps of ``cost_done``; ``besides``: an epoch's evaluation, checkpoint and
        plot on average, evaluated or not, which is near enough for --eval-every 1 or every few)."""
        dist = self.dist
        if not self.cost_done:
            return
        (per_step,) = dist.max([train_seconds / self.cost_done])  # a full-size step's time
        (elapsed,) = dist.max([time.monotonic() - self.t0])
        (overhead,) = dist.max([besides])
        views, extra = self._eval_views()
        # the final evaluation's extra views, priced by the last evaluation (with --eval-every N not the last epoch's)
        (one_view,) = dist.max([self.view_seconds[-1] if self.view_seconds else 0.0])
        least = (self.state.global_step + 1) / self.steps_per_epoch
        epochs = fitting_epochs(budget, elapsed, per_step, self.state.global_step, self.steps_per_epoch, overhead,
                                1, most=max(most, least), least=least, extra_seconds=extra * one_view,
                                step_cost=self._step_cost())
        if epochs != self.state.fitted_epochs:
            self._say(f"--fit-epochs: {per_step:.3f} s per step and {overhead:.1f} s besides per epoch after "
                      f"epoch {self.state.epoch}, so {epochs:.2f} epochs in all")
            self._set_fitted(epochs)

    def _budget_spent(self, budget: float | None) -> bool:
        """Whether a run with ``budget`` seconds must stop now: the budget counts the final evaluation
        and the weights too, so it stops early by ``final_reserve`` (see :func:`densenet.budget.budget_reserve`)."""
        return budget is not None and time.monotonic() - self.t0 > budget - self.final_reserve

    def _eval_views(self) -> tuple[int, int]:
        """The views of each evaluation (2 with --tta, 6 with --tta-translate too) and the extra ones of the
        final (1 or 5 with --final-tta)."""
        c = self.config
        views = tta_views(True, c.tta_translate)
        return (views, 0) if c.tta else (1, views - 1 if c.final_tta else 0)

    def _set_fitted(self, epochs: float) -> None:
        self.config.epochs = math.ceil(epochs)
        self.state.fitted_epochs = epochs
        if self.dist.is_main:
            self._write_config()

    def total_steps(self) -> int:
        """The optimizer steps of the whole run: --epochs whole epochs, or as --fit-epochs chose."""
        fitted = self.state.fitted_epochs
        if fitted:
            return round(fitted * self.steps_per_epoch)
        return self.config.epochs * self.steps_per_epoch

    def _announce(self, epoch: int, step: int) -> None:
        c, dist = self.config, self.dist
        where = f" from epoch {epoch + 1}, step {step}" if self.checkpoint_source else ""
        planned = (f"at most {c.epochs} epochs (--fit-epochs chooses after step {FIT_STEPS[1]})"
                   if c.fit_epochs and self.state.fitted_epochs is None else f"{c.epochs} epochs")
        self._say(f"training {c.model} on {len(self.data['train'])} images for {planned} on "
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

    def _train_epoch(self, epoch: int, start_step: int, sums: EpochSums | None, stop: StopRequest,
                     budget: float | None) -> EpochOutcome:
        """Steps ``start_step`` onwards of ``epoch``, until its end (or the run's, when --fit-epochs ends it
        within the epoch), a signal or the time budget."""
        c, device, dist = self.config, self.device, self.dist
        batches = epoch_batches(len(self.train_labels), c.batch_size, epoch=epoch, seed=c.seed, rank=dist.rank,
                                world_size=dist.world_size)
        sums = sums or EpochSums()
        loss_sum = torch.tensor(float(sums.loss_sum), dtype=torch.float64, device=device)
        correct = torch.tensor(int(sums.correct), dtype=torch.long, device=device)
        seen = sums.seen
        check_every = 1 if device.type == "cpu" else 25  # a loss check syncs with the GPU
        self.train_model.train()
        end = max(1, min(len(batches), self.total_steps() - epoch * self.steps_per_epoch))
        bar = self._progress_bar(epoch, end, start_step)
        t_start = time.monotonic()
        images_this_run, stopped, done = 0, "", start_step
        try:
            for step in range(start_step, end):
                x, y = self._batch(epoch, step, batches[step])
                check = (step + 1) % check_every == 0 or step + 1 == end
                loss, logits = self._step(x, y, check_at=(epoch, step) if check else None)
                for hook in self.on_step:
                    hook(self.state.global_step)
                loss_sum += loss.detach().double() * len(y)
                correct += (logits.detach().argmax(dim=1) == y).sum()
                seen += len(y)
                images_this_run += len(y)
                done = step + 1
                if bar is not None:
                    self._update_bar(bar, done, end, loss_sum, correct, seen, images_this_run, t_start)
                # under torchrun the processes agree (every check_every steps) so they stop together
                if done < end and (dist.world_size == 1 or done % check_every == 0):
                    reason = stop.name if stop.signum is not None else ""
                    if not reason and self._budget_spent(budget):
                        reason = "time budget"
                    stopped = dist.agree_stop(reason)
                    if stopped:
                        break
        finally:
            if bar is not None:
                bar.close()
        if seen or dist.world_size > 1:
            self._check_finite(loss_sum, epoch, done - 1)
        seconds = time.monotonic() - t_start
        sums = EpochSums(float(loss_sum), int(correct), seen, sums.seconds + seconds)
        if distributed.debug_enabled():
            consumed = torch.cat(batches[start_step:done]).tolist() if done > start_step else []
            distributed.debug_log(dist, "epoch", epoch=epoch, start_step=start_step, steps=done, indices=consumed,
                                  **asdict(sums))
        sums = EpochSums(**distributed.reduce_partial(dist, asdict(sums)))  # the sums of all processes
        return EpochOutcome(sums=sums, step=done, stopped=stopped, seconds_this_run=seconds,
                            images_this_run=images_this_run)

    def _batch(self, epoch: int, step: int, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch ``step`` of ``epoch``: its images augmented on the device from a seed of its own."""
        idx = index.to(self.device, non_blocking=True)
        generator = torch.Generator(device=self.device)
        generator.manual_seed(batch_seed(self.config.seed, epoch, step, self.dist.rank))
        c, done, total = self.config, self.state.global_step, self.total_steps()
        phase = max(self.state.augment_phase,
                    0 if done < c.augment_from * total else 1 if done < c.augment_until * total else 2)
        self.state.augment_phase, strong = phase, phase == 1
        if strong != self.strong:
            if self.strong is not None or not strong:
                named = [what for what, on in (("random crops", c.crop_padding), ("colour jitter", c.color_jitter),
                                               ("cutout", c.cutout)) if on]
                flag = "--augment-until" if phase == 2 else "--augment-from"
                self._say(f"{flag}: {' and '.join(named) if strong else 'no ' + ' or '.join(named)} "
                          f"from step {done + 1}")
            self.strong = strong
        x = self.augmenter(self.train_images, generator=generator, train=True, index=idx, epoch=epoch, strong=strong)
        side = self._side(self.state.global_step)
        if side != self.side:
            if self.side is not None or side != self.full_side:
                self._say(f"--low-res: training on {side}x{side} batches from step {self.state.global_step + 1}")
            self.side = side
        return resize_batch(x, side), self.train_labels[idx]

    def _side(self, global_step: int) -> int:
        """The side of the training batch for optimizer step ``global_step`` + 1 (--low-res)."""
        c = self.config
        if not c.low_res:
            return self.full_side
        ramp = parse_milestones(c.low_res_ramp, "--low-res-ramp")
        return progressive_side(global_step / self.total_steps(), c.low_res, self.full_side, ramp)

    def _step_cost(self) -> Callable[[np.ndarray], np.ndarray] | None:
        """--low-res: a step's cost (its pixels over a full-size step's) at fractions of the run."""
        c = self.config
        if not c.low_res:
            return None
        ramp, full = parse_milestones(c.low_res_ramp, "--low-res-ramp"), self.full_side
        return lambda progress: (progressive_side(progress, c.low_res, full, ramp) / full) ** 2

    def _step(self, x: torch.Tensor, y: torch.Tensor, check_at: tuple[int, int] | None = None):
        """One optimisation step on (x, y); returns (loss, logits). ``check_at``: (epoch, step) to
        check the loss is finite at, before the weights change."""
        c = self.config
        with autocast(self.device, c.amp):
            logits = self.train_model(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=c.label_smoothing)
        if check_at is not None:
            self._check_finite(loss, *check_at)
        self.opt.step(loss, self.model, self.state.global_step + 1, self.total_steps())
        self.state.global_step += 1
        self.cost_done += (x.shape[-1] / self.full_side) ** 2
        return loss, logits

    def _check_finite(self, loss: torch.Tensor, epoch: int, step: int) -> None:
        finite = bool(torch.isfinite(loss))
        if not self.dist.any(not finite):  # under torchrun: the loss is finite in every process
            return
        last = self.run_dir.last
        kept = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint was written yet"
        value = float(loss.detach()) if not finite else "not finite in another process"
        raise TrainingError(
            f"the loss became {value} at epoch {epoch + 1}, step {step + 1} "
            f"(lr {self.opt.lr:.3g}); training stopped, {kept}. "
            f"Lower --lr or add --warmup-epochs"
        )

    def _end_epoch(self, outcome: EpochOutcome) -> None:
        """Evaluate, record the epoch's row, checkpoint (best first), write metrics and curves."""
        c, state = self.config, self.state
        epoch, sums = state.epoch, outcome.sums
        seen = max(sums.seen, 1)
        row = {
            "epoch": epoch + 1,
            "train_loss": sums.loss_sum / seen,
            "train_acc": sums.correct / seen,
            "lr": self.opt.lr,
            "train_seconds": sums.seconds,
            "images_per_second": sums.seen / sums.seconds if sums.seconds else None,
        }
        evaluate_now = (epoch + 1) % c.eval_every == 0 or epoch + 1 == c.epochs
        t_eval = time.monotonic()
        for split in ("val", "test"):
            row[f"{split}_loss"] = row[f"{split}_acc"] = row[f"{split}_views"] = None
            if evaluate_now and split in self.eval_sets:
                result = self._evaluate(split, final=epoch + 1 == c.epochs)
                row[f"{split}_loss"], row[f"{split}_acc"] = result["loss"], result["top1"]
                row[f"{split}_views"] = tta_views(result["tta"], result["tta_translate"])
        row["eval_seconds"] = time.monotonic() - t_eval
        views, extra = self._eval_views()
        if row["test_acc"] is not None or row["val_acc"] is not None:
            self.view_seconds.append(row["eval_seconds"] / views)
        row["peak_memory_mb"] = peak_memory_mb(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        row["elapsed_seconds"] = state.elapsed_before + time.monotonic() - self.t0
        state.history.append(row)

        select = row["val_acc"] if "val" in self.eval_sets else row["test_acc"]
        improved = select is not None and (state.best_acc is None or select > state.best_acc)
        if improved:
            state.best_acc, state.best_epoch = select, epoch + 1
        state.epoch, state.step_in_epoch, state.partial = epoch + 1, 0, None
        checkpoint = self._checkpoint(finished=state.epoch >= c.epochs)
        write_seconds = 0.0  # rank 0 writes
        if self.dist.is_main:
            if improved:  # best first: if it fails, last still points at the epoch before, which is redone
                self._save(self.run_dir.best, checkpoint)
            t_write = time.monotonic()
            self._save(self.run_dir.last, checkpoint)
            write_seconds = time.monotonic() - t_write
            self.run_dir.write_metrics(state.history)
            self._log_tensorboard(row)
            plot_curves(state.history, self.run_dir.curves, title=f"{c.model} ({c.dataset})")
        self.final_reserve = budget_reserve(self.view_seconds, views + extra, write_seconds)
        self._report_epoch(row)

    def _eval_model(self):
        return self.opt.eval_model(self.model)

    def _evaluate(self, split: str, final: bool = False) -> dict:
        """Evaluate on ``split`` (``final``: the run's last evaluation); under torchrun each process
        its share, the counts added up."""
        c, model, share = self.config, self._eval_model(), self.eval_sets[split]
        tta = c.tta or (c.final_tta and final)
        self.dist.broadcast_buffers(model)  # everyone evaluates rank 0's BatchNorm statistics
        result = None
        if len(share):
            result = evaluate(
                model, share, batch_size=c.eval_batch_size or max(c.batch_size, 500),
                tta=tta, tta_translate=tta and c.tta_translate, device=self.device, mean=self.augmenter.mean, std=self.augmenter.std, amp=c.amp,
                channels_last=c.channels_last,
            )
        if not self.dist.distributed:
            return result
        return distributed.reduce_evaluation(self.dist, result, list(share.classes), tta=tta,
                                             tta_translate=tta and c.tta_translate)

    def _finish(self, stop_reason: str, mid_epoch: bool) -> float:
        """Write the final weights (run directory and weights directory); return their test accuracy."""
        c, state = self.config, self.state
        last = state.history[-1] if state.history else None
        if mid_epoch or last is None or last.get("test_acc") is None:
            result = self._evaluate("test", final=True)
            final_acc, self.final_views = result["top1"], tta_views(result["tta"], result["tta_translate"])
        else:
            # the last epoch's evaluation: a budget stop at an epoch boundary before the planned last
            # epoch reports that epoch's views (one without --tta), not the --final-tta ones
            final_acc, self.final_views = last["test_acc"], last.get("test_views")
        if not self.dist.is_main:
            return final_acc
        meta = self._meta(state.epoch, stop_reason == "completed", final_acc, stop_reason)
        meta["training"]["final_test_views"] = self.final_views
        meta["training"]["test_acc_per_epoch"] = [row.get("test_acc") for row in state.history]
        meta["training"]["wall_seconds"] = state.elapsed_before + time.monotonic() - self.t0
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

    # output ------------------------------------------------------------------------------------

    def _say(self, text: str) -> None:
        if self.config.progress != "none" and self.dist.is_main:
            print(text, flush=True)

    def _progress_mode(self) -> str:
        if not self.dist.is_main:
            return "none"
        mode = self.config.progress
        if mode == "auto":
            return "bar" if sys.stderr.isatty() else "lines"
        return mode

    def _progress_bar(self, epoch: int, steps: int, start_step: int):
        if self._progress_mode() != "bar":
            return None
        from tqdm import tqdm

        return tqdm(total=steps, initial=start_step, desc=f"epoch {epoch + 1}/{self.config.epochs}",
                    unit="batch", leave=True, dynamic_ncols=True)

    def _update_bar(self, bar, done: int, steps: int, loss_sum, correct, seen: int, images: int, t_start: float):
        bar.update(1)
        if done % 10 == 0 or done == steps:
            elapsed = time.monotonic() - t_start
            bar.set_postfix(loss=f"{float(loss_sum) / seen:.3f}", acc=f"{int(correct) / seen:.3f}",
                            lr=f"{self.opt.lr:.3g}",
                            img_s=f"{images / max(elapsed, 1e-9):.0f}", refresh=False)

    def _log_tensorboard(self, row: dict) -> None:
        """The epoch's scalars as TensorBoard events (step = epoch), with --tensorboard."""
        c = self.config
        if c.tensorboard is None:
            return
        if self._tb is None:
            from torch.utils.tensorboard import SummaryWriter

            folder = Path(c.tensorboard) if c.tensorboard else self.run_dir.tensorboard
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


# --- helpers ----------------------------------------------------------------------------------


def _processes(n: int) -> str:
    return f"{n} process{'es' if n != 1 else ''}"


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
