"""Training configuration: every setting of a run, the named recipes, validation, the schedule.

:class:`TrainConfig` holds every setting, each written once: its default, its help text and its
flag group live in the field (``setting(...)``), and :func:`add_config_arguments` generates the
``densenet train`` flags from the fields (``--batch-size`` for ``batch_size``; booleans get
``--x/--no-x``). :data:`RECIPES` are named presets of it; :func:`make_config` layers a recipe under
explicit values; :func:`validate` rejects a bad setting with one line; :func:`lr_factor` is the
learning-rate schedule. docs/TRAINING.md's flag table is checked against these fields by a test.

Fields marked ``augment=True`` are the :class:`densenet.augment.Augmenter`'s keyword arguments:
:func:`augment_settings` hands them over by name, so a new augmentation is a new ``Augmenter``
argument plus a field here.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

import numpy as np
import torch

from densenet.augment import PADDING_MODES
from densenet.errors import ConfigError
from densenet.registry import create_model, model_arguments
from densenet.runtime import resolve_device

__all__ = ["TrainConfig", "RECIPES", "SCHEDULES", "OPTIMIZERS", "AMPS", "PROGRESS", "RESUME_FIXED", "make_config",
           "recipe_settings", "config_fields", "parse_milestones", "milestone_epochs", "warmup_epochs",
           "validate", "lr_factor", "augment_settings", "model_overrides", "add_config_arguments",
           "explicit_settings", "format_recipes"]

SCHEDULES = ("step", "cosine", "onecycle", "constant")
OPTIMIZERS = ("sgd", "muon")
AMPS = ("none", "bf16", "fp16", "auto")
PROGRESS = ("auto", "bar", "lines", "none")
DATASETS = ("cifar10", "cifar100")
# settings a resumed run must share with its checkpoint (they define the model and the batches)
RESUME_FIXED = ("model", "model_kwargs", "dataset", "batch_size", "seed", "subset", "val_split", "dropout",
                "num_classes", "whiten", "train_stem", "bn_lr_scale", "optimizer")

# flag groups of `densenet train --help`, in order
MODEL, OPTIM, AUGMENT, HARDWARE, RUN = "model and data", "optimisation", "augmentation and evaluation", "hardware", "run"
DISTRIBUTED = "distributed (torchrun -m densenet train ...; see docs/DISTRIBUTED.md)"
GROUPS = (MODEL, OPTIM, AUGMENT, HARDWARE, RUN, DISTRIBUTED)


def setting(default: Any = None, help: str = "", group: str = RUN, *, factory=None, augment: bool = False,
            **argparse_options: Any) -> Any:
    """A :class:`TrainConfig` field with what its flag needs: help text, group, argparse options.

    ``augment=True`` marks an :class:`densenet.augment.Augmenter` keyword argument. ``argparse_options``
    (``choices``, ``metavar``, ``nargs``, ``const``) go to ``add_argument`` as they are.
    """
    metadata = {"help": help, "group": group, "augment": augment, "argparse": argparse_options}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    """Every setting of a training run. The defaults are the original design's (``recipe original``)."""

    recipe: str | None = setting(None, "named preset (see --list-recipes); flags override it", MODEL)
    model: str = setting("densenet121-cifar", "model name (see densenet analyze --list)", MODEL)
    model_kwargs: dict = setting(
        factory=dict, help="constructor arguments of the model as JSON, e.g. '{\"growth_rate\": 24}' "
        "(stored in the checkpoint: a resumed run rebuilds the same model); replaces the recipe's "
        "(quick: pooling before the transitions' 1x1 convolution; cpu-30m and cpu-90m: GELU and max-pooling "
        "transitions, cpu-30m's pooling first; '{}' for the paper's ReLU, average pooling and order), which "
        "go to another --model only where it takes them", group=MODEL, metavar="JSON")
    dataset: str = setting("cifar10", "", MODEL, choices=DATASETS)
    data_dir: str | None = setting(None, "dataset directory (default: $DENSENET_DATA, else ./data)", MODEL)
    num_classes: int | None = setting(None, "classifier outputs (default: the number of classes in the data)", MODEL)
    val_split: int = setting(0, "hold out N seeded training images for validation (and best-checkpoint choice)",
                             MODEL, metavar="N")
    subset: int | None = setting(None, "train on N training images drawn with the seed (default: all)", MODEL,
                                 metavar="N")
    test_subset: int | None = setting(None, "evaluate on N test images (default: all)", MODEL, metavar="N")
    dropout: float = setting(0.0, "dropout after each dense layer's last convolution", MODEL)
    memory_efficient: bool = setting(False, "recompute the concatenations in backward (less memory, more time)",
                                     MODEL)
    whiten: bool = setting(False, "set the stem to frozen patch-whitening filters of the training images (the "
                           "model's stem must have 2 x 27 = 54 channels, as the densenet-cpu-* models do)", MODEL)
    train_stem: bool = setting(False, "with --whiten: train the stem's filters from the whitening on, like every "
                               "other filter, instead of keeping them frozen", MODEL)

    epochs: int = setting(200, "", OPTIM)
    batch_size: int = setting(64, "images per step per process; under torchrun the global batch is this x the "
                              "number of processes, and --lr is used as given", OPTIM)
    lr: float = setting(0.01, "peak learning rate", OPTIM)
    momentum: float = setting(0.9, "SGD momentum", OPTIM)
    nesterov: bool = setting(False, "Nesterov momentum", OPTIM)
    weight_decay: float = setting(1e-4, "on all parameters (as in the paper)", OPTIM)
    optimizer: str = setting("sgd", "sgd: SGD for every parameter; muon: torch.optim.Muon for the convolution "
                             "filters (as out x in*k*k matrices, kept at unit length: each filter feeds a "
                             "BatchNorm) and SGD for the rest", OPTIM, choices=OPTIMIZERS)
    muon_lr: float = setting(0.02, "--optimizer muon: the filters' peak learning rate (about the angle, in "
                             "radians, a filter turns by per step; scheduled as --lr)", OPTIM, metavar="LR")
    muon_momentum: float = setting(0.95, "--optimizer muon: Muon's (Nesterov) momentum", OPTIM, metavar="M")
    bn_lr_scale: float = setting(1.0, "learning-rate multiplier for the BatchNorm weights and biases, whose weight "
                                 "decay is divided by it (fast CIFAR trainers' higher BN learning rate)", OPTIM,
                                 metavar="X")
    schedule: str = setting("step", "learning rate per optimizer step", OPTIM, choices=SCHEDULES)
    milestones: list[float] = setting(
        factory=lambda: [0.25, 0.375], help="step schedule: epochs, e.g. 50,75, or fractions of the run, e.g. "
        "0.5,0.75 (the default is epochs 50 and 75 of 200, scaled with --epochs)", group=OPTIM)
    gamma: float = setting(0.1, "factor at each milestone", OPTIM)
    warmup_epochs: float | None = setting(None, "linear warm-up before any schedule (default 0; onecycle: 30%% "
                                          "of the epochs)", OPTIM)
    label_smoothing: float = setting(0.0, "", OPTIM)
    bn_momentum: float | None = setting(None, "momentum of the BatchNorm running statistics, PyTorch's convention "
                                        "(the weight of each new batch; default: PyTorch's 0.1; fast CIFAR "
                                        "trainers use 0.4)", OPTIM, metavar="M")
    ema: float | None = setting(None, "keep and evaluate an exponential moving average of the weights with this "
                                "decay, e.g. 0.999 (default off)", OPTIM, metavar="DECAY")
    lookahead: float | None = setting(None, "lookahead of the weights: every 5 steps a slow copy takes 1 - DECAY x "
                                      "progress^3 of them and training restarts from it; the run ends on the "
                                      "slow weights, e.g. 0.77 (default off; 0: off)", OPTIM, metavar="DECAY")

    crop_padding: int = setting(4, "random crop of the image padded by this many pixels (0: no crops)", AUGMENT,
                                augment=True)
    padding_mode: str = setting("zeros", "how the crops' padding is filled: zeros (black; torchvision's default) "
                                "or reflect (the image mirrored at its edge, as the fast CIFAR trainers pad)",
                                AUGMENT, augment=True, choices=PADDING_MODES)
    flip: bool = setting(True, "random horizontal flip", AUGMENT, augment=True)
    alternate_flip: bool = setting(False, "flip each image in every other epoch instead of at random (a fixed "
                                   "half of the images in even epochs, the other half in odd ones; needs --flip)",
                                   AUGMENT, augment=True)
    cutout: int = setting(0, "cutout square side in pixels (0: off)", AUGMENT, augment=True)
    color_jitter: float = setting(0.0, "brightness/contrast/saturation strength (0: off)", AUGMENT, augment=True)
    augment_from: float = setting(0.0, "random crops, cutout and colour jitter only from this fraction of the run on "
                                  "(flips from the start; 0: all from the start), e.g. 0.5", AUGMENT, metavar="FRACTION")
    augment_until: float = setting(1.0, "random crops, cutout and colour jitter only until this fraction of the run "
                                   "(flips to the end; 1: all to the end), e.g. 0.9", AUGMENT, metavar="FRACTION")
    tta: bool = setting(False, "flip test-time augmentation in every evaluation", AUGMENT)
    final_tta: bool = setting(False, "flip test-time augmentation in the final evaluation only (the per-epoch "
                              "ones without)", AUGMENT)
    tta_translate: bool = setting(False, "with --tta or --final-tta: 6 views instead of 2, the mirror pair plus the "
                                  "mirror pairs of the image moved one pixel down-right and one up-left (the "
                                  "pair and the moved pairs weighted equally)", AUGMENT)
    low_res: int | None = setting(None, "progressive resizing: train on batches scaled down to this side (e.g. 24) "
                                  "until the first fraction of --low-res-ramp, then on sides growing in steps of 4 "
                                  "pixels to the full side at its second; --fit-epochs counts the cheaper steps "
                                  "(default off; 0: off)", AUGMENT, metavar="SIDE")
    low_res_ramp: list[float] = setting(
        factory=lambda: [0.5, 0.75], help="with --low-res: the fractions of the run where the sides start "
        "growing and where they reach the full side", group=AUGMENT)
    eval_every: int = setting(1, "evaluate every N epochs (and after the last)", AUGMENT, metavar="N")
    eval_batch_size: int | None = setting(None, "default: max(batch size, 500)", AUGMENT)

    device: str = setting("auto", "auto (CUDA when present), cpu or cuda", HARDWARE)
    amp: str = setting("none", "autocast precision; auto: bf16 on CUDA GPUs that support it and on CPUs with "
                       "AMX or AVX-512 BF16 (where it is fast), else none", HARDWARE, choices=AMPS)
    channels_last: bool = setting(True, "NHWC memory format for the model", HARDWARE)
    compile: bool = setting(False, "torch.compile the training model", HARDWARE)
    threads: int | None = setting(None, "CPU threads for torch (default: torch's)", HARDWARE)
    seed: int = setting(0, "initialisation, batch order, augmentation, hold-out", HARDWARE)

    out_dir: str | None = setting(None, "run directory (default runs/<model>-<timestamp>)", RUN)
    weights_dir: str | None = setting("densenet121_weights", "where the final weights go (also into the run "
                                      "directory)", RUN)
    resume: str | None = setting(None, "continue from a checkpoint or run directory; auto: from --out-dir (or the "
                                 "newest unfinished runs/<model>-*) if there is a checkpoint, else start afresh",
                                 RUN, metavar="PATH|auto")
    max_minutes: float | None = setting(None, "stop cleanly after this much wall time in this process (from the "
                                        "loading of the data on), less what the final evaluation and the "
                                        "weights will take (priced from the last evaluations, with a margin)", RUN)
    fit_epochs: bool = setting(False, "with --max-minutes: time the first optimizer steps and lower --epochs to "
                               "what fits in the budget, evaluations included, the last epoch possibly cut short; "
                               "fit again after each epoch from its measured time (the schedule follows; a resumed "
                               "run keeps the choice)", RUN)
    progress: str = setting("auto", "auto: a bar on a terminal, else one line per epoch", RUN, choices=PROGRESS)
    tensorboard: str | None = setting(
        None, "write per-epoch losses, accuracies, learning rate, images/s and peak memory as TensorBoard events "
        "to DIR (default <run directory>/tensorboard); needs the tensorboard extra", RUN, nargs="?", const="",
        metavar="DIR")

    sync_bn: bool = setting(False, "under torchrun: BatchNorm statistics over the global batch (SyncBatchNorm; "
                            "CUDA only)", DISTRIBUTED)
    dist_timeout: float = setting(300.0, "under torchrun: how long a process waits for the others (start-up, each "
                                  "collective) before failing", DISTRIBUTED, metavar="SECONDS")


# the CPU recipes' shared settings: densenet-cpu-s with a whitened stem (docs/TRAINING.md: how chosen)
_CPU_S = dict(model="densenet-cpu-s", whiten=True, batch_size=128, lr=0.2, momentum=0.9, nesterov=True,
              weight_decay=5e-4, schedule="onecycle", label_smoothing=0.1, crop_padding=4, flip=True,
              alternate_flip=True, bn_lr_scale=16.0, channels_last=True, final_tta=True, tta_translate=True,
              amp="auto")


# the fast CIFAR trainers' activation and max-pooling between blocks, for the 30- and 90-minute recipes
_GELU_MAX = {"activation": "gelu", "transition_pool": "max"}


def _cpu_recipe(minutes: int, most_epochs: int, warmup: float, description: str, **overrides) -> dict:
    """A CPU recipe: the shared densenet-cpu-s settings (with ``overrides``) for as many epochs as fit in
    ``minutes`` (at most ``most_epochs``), chosen by --fit-epochs from the measured speed."""
    settings = dict(_CPU_S, epochs=most_epochs, warmup_epochs=warmup, max_minutes=float(minutes), fit_epochs=True,
                    **overrides)
    return {"description": description, "settings": settings}


def _step_recipe(model: str, epochs: int, lr: float, nesterov: bool, milestones: list[float],
                 description: str) -> dict:
    """A step-decay SGD recipe: batch 64, momentum 0.9, wd 1e-4, x0.1 at each milestone, crop+flip."""
    settings = dict(model=model, epochs=epochs, batch_size=64, lr=lr, momentum=0.9, nesterov=nesterov,
                    weight_decay=1e-4, schedule="step", milestones=milestones, gamma=0.1, crop_padding=4, flip=True)
    return {"description": description, "settings": settings}


RECIPES: dict[str, dict] = {
    "original": _step_recipe("densenet121-cifar", 200, 0.01, False, [50.0, 75.0],
                             "the original design: densenet121-cifar, 200 epochs, batch 64, SGD lr 0.01 momentum "
                             "0.9, step x0.1 at epochs 50 and 75, He init, crop+flip"),
    "paper": _step_recipe("densenet-bc-100-12", 300, 0.1, True, [0.5, 0.75],
                          "Huang et al.'s CIFAR setup: densenet-bc-100-12, 300 epochs, batch 64, lr 0.1, Nesterov "
                          "0.9, wd 1e-4, x0.1 at 50% and 75%, crop+flip"),
    # The CPU recipes below were chosen by measured runs, lever by lever: docs/TRAINING.md's recipe table
    # says what each setting gave and when, its "What each lever gave" table what was tried and dropped.
    # quick: densenet-cpu-k96 (one layer at 16 pixels) and no random crops (6-10 epochs are too few for
    # them to pay); Muon for the filters since the thirty-third session (--optimizer sgd: the recipe before);
    # norm-pool-conv transitions since the forty-fourth (with average pooling the paper's function, 0.92 of
    # the step: 11.1 epochs in 10 minutes instead of 10.4 on the AMD Zen 4)
    "quick": _cpu_recipe(10, 20, 0.8, "CPU demo, <= 10 minutes: densenet-cpu-k96 with a whitened stem, as many "
                         "epochs as fit (--fit-epochs, at most 20), batch 128, one-cycle to lr 0.2 (0.8 warm-up "
                         "epochs), Muon for the convolution filters (peak lr 0.02, momentum 0.95) and Nesterov SGD "
                         "for the rest, wd 5e-4 (BatchNorm: lr x16, wd /16), label smoothing 0.1, alternating "
                         "flip and no crops, 6-view TTA (mirror and 1-pixel shifts) in the final evaluation, "
                         "channels_last, bf16 autocast where the CPU computes in bf16 (AMX or AVX-512 BF16: "
                         "--amp auto); its transitions average-pool before the 1x1 convolution (the paper's "
                         "function at a quarter of that convolution's cost)", crop_padding=0,
                         model="densenet-cpu-k96", model_kwargs={"transition_order": "norm-pool-conv"},
                         optimizer="muon", muon_lr=0.02),
    # cpu-30m: quick's optimisation with the fast CIFAR trainers' label smoothing 0.2, lookahead and BatchNorm
    # momentum, 2-pixel crops, progressive resizing from 24x24, densenet-cpu-m4 with GELU and max-pooling
    # transitions that pool first (pool-norm-conv: 0.78 of the step, forty-third session); eager, since
    # torch.compile was no faster for it on the Zen 5 or the AMX Xeon
    "cpu-30m": _cpu_recipe(30, 40, 1.8, "CPU, <= 30 minutes: the quick recipe (Muon for the filters) with "
                           "densenet-cpu-m4 (k=64, no "
                           "compression, a first block at 32 pixels, GELU, max-pooling transitions that pool the "
                           "block's output before their batch norm) for as many "
                           "epochs as fit (at most 40; "
                           "1.8 warm-up epochs), label smoothing 0.2, lookahead 0.77, BatchNorm momentum 0.4, "
                           "2-pixel random crops and progressive resizing (24x24 batches in the first half, full "
                           "size in the last quarter), eager (torch.compile measured no faster for densenet-cpu-m4 "
                           "on an AMD Zen 5 or an AMX Xeon)", model="densenet-cpu-m4",
                           model_kwargs=dict(_GELU_MAX, transition_order="pool-norm-conv"), crop_padding=2,
                           label_smoothing=0.2, lookahead=0.77,
                           bn_momentum=0.4, low_res=24, optimizer="muon", muon_lr=0.02),
    # cpu-90m: cpu-30m's network and settings with SGD for every parameter (Muon tied it in 90 minutes on
    # the Zen 5 and the AMX Xeon), 4-pixel crops and 12-pixel cutout (without: a higher training accuracy,
    # a lower test accuracy)
    "cpu-90m": _cpu_recipe(90, 120, 3.5, "CPU, <= 90 minutes: the cpu-30m recipe and network (densenet-cpu-m4, GELU, "
                           "max-pooling transitions) with SGD for every parameter (Muon tied it here), 4-pixel random crops and 12-pixel cutout for as many "
                           "epochs as fit (at most 120; 3.5 warm-up epochs), eager (torch.compile measured no "
                           "faster for densenet-cpu-m4 on an AMD Zen 5 or an AMX Xeon)",
                           model="densenet-cpu-m4",
                           model_kwargs=dict(_GELU_MAX), label_smoothing=0.2, lookahead=0.77, bn_momentum=0.4,
                           low_res=24, cutout=12),
    "fast": {
        "description": "GPU time-to-accuracy plumbing (untuned): densenet121-cifar, bf16, channels_last, "
        "batch 512, one-cycle to lr 0.8, label smoothing 0.1, EMA 0.999, flip TTA, torch.compile",
        "settings": dict(model="densenet121-cifar", epochs=30, batch_size=512, lr=0.8, momentum=0.9,
                         nesterov=True, weight_decay=5e-4, schedule="onecycle", warmup_epochs=6,
                         label_smoothing=0.1, amp="bf16", channels_last=True, ema=0.999, tta=True,
                         compile=True, device="cuda"),
    },
}



def config_fields() -> list[str]:
    """The names of :class:`TrainConfig`'s fields, in order."""
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
        base.update(recipe_settings(values["recipe"], values.get("model")))
    base.update({k: v for k, v in values.items()})
    return TrainConfig(**base)


def recipe_settings(name: str, model: str | None = None) -> dict:
    """The settings recipe ``name`` sets. Given another ``model`` than the recipe's, its ``model_kwargs``
    keep only the arguments that model takes (cpu-30m's GELU and max-pooling transitions are DenseNet
    arguments: ``--recipe cpu-30m --model resnet18-cifar --no-whiten`` trains the ResNet with the recipe's
    training)."""
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)} (see --list-recipes)")
    settings = dict(RECIPES[name]["settings"], recipe=name)
    if model and settings.get("model_kwargs"):
        takes = model_arguments(model)
        settings["model_kwargs"] = {k: v for k, v in settings["model_kwargs"].items() if k in takes}
    return settings


def parse_milestones(text: str | list | tuple | None, flag: str = "--milestones") -> list[float]:
    """``"50,75"`` or ``"0.5,0.75"`` (or a list) as a list of floats (``flag`` names it in errors)."""
    if text is None:
        return []
    if isinstance(text, (list, tuple)):
        items = list(text)
    else:
        items = [t for t in str(text).replace(" ", "").split(",") if t]
    try:
        return [float(t) for t in items]
    except ValueError:
        raise ConfigError(f"{flag} must be numbers separated by commas, got {text!r}") from None


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
    need(c.bn_lr_scale > 0, f"--bn-lr-scale must be positive, got {c.bn_lr_scale}")
    need(c.optimizer in OPTIMIZERS, f"unknown --optimizer {c.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    need(c.muon_lr > 0 and math.isfinite(c.muon_lr), f"--muon-lr must be positive, got {c.muon_lr}")
    need(0 <= c.muon_momentum < 1, f"--muon-momentum must be in [0, 1), got {c.muon_momentum}")
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
    need(c.bn_momentum is None or 0 < c.bn_momentum <= 1,
         f"--bn-momentum must be in (0, 1], e.g. 0.4, got {c.bn_momentum}")
    need(0 <= c.dropout < 1, f"--dropout must be in [0, 1), got {c.dropout}")
    need(is_int(c.crop_padding) and c.crop_padding >= 0, f"--crop-padding must be >= 0, got {c.crop_padding!r}")
    need(c.padding_mode in PADDING_MODES,
         f"unknown --padding-mode {c.padding_mode!r}; choose one of {', '.join(PADDING_MODES)}")
    need(c.flip or not c.alternate_flip, "--alternate-flip needs --flip")
    need(c.tta or c.final_tta or not c.tta_translate, "--tta-translate needs --tta or --final-tta")
    need(is_int(c.cutout) and c.cutout >= 0, f"--cutout must be >= 0, got {c.cutout!r}")
    need(c.color_jitter >= 0, f"--color-jitter must be >= 0, got {c.color_jitter}")
    need(0 <= c.augment_from < 1, f"--augment-from must be a fraction of the run in [0, 1), got {c.augment_from}")
    need(not c.augment_from or c.crop_padding or c.cutout or c.color_jitter,
         "--augment-from needs random crops, cutout or colour jitter to hold back")
    need(c.augment_from < c.augment_until <= 1,
         f"--augment-until must be a fraction of the run in (--augment-from, 1] = ({c.augment_from:g}, 1], "
         f"got {c.augment_until}")
    need(c.augment_until == 1 or c.crop_padding or c.cutout or c.color_jitter,
         "--augment-until needs random crops, cutout or colour jitter to leave out")
    need(is_int(c.val_split) and c.val_split >= 0, f"--val-split must be >= 0, got {c.val_split!r}")
    need(c.subset is None or (is_int(c.subset) and c.subset >= 1), f"--subset must be >= 1, got {c.subset!r}")
    need(c.test_subset is None or (is_int(c.test_subset) and c.test_subset >= 1),
         f"--test-subset must be >= 1, got {c.test_subset!r}")
    need(is_int(c.seed) and c.seed >= 0, f"--seed must be a non-negative integer, got {c.seed!r}")
    need(c.amp in AMPS, f"unknown --amp {c.amp!r}; choose one of {', '.join(AMPS)}")
    need(c.ema is None or 0 <= c.ema < 1, f"--ema must be a decay in (0, 1), e.g. 0.999 (0: off), got {c.ema}")
    need(c.lookahead is None or 0 <= c.lookahead < 1,
         f"--lookahead must be a decay in (0, 1), e.g. 0.77 (0: off), got {c.lookahead}")
    if c.low_res is not None and c.low_res != 0:
        need(is_int(c.low_res) and c.low_res >= 8, f"--low-res must be a side of at least 8 pixels (0: off), got {c.low_res!r}")
        ramp = parse_milestones(c.low_res_ramp, "--low-res-ramp")
        need(len(ramp) == 2 and 0 <= ramp[0] <= ramp[1] <= 1,
             f"--low-res-ramp must be two fractions of the run, 0 <= start <= end <= 1, got {c.low_res_ramp!r}")
    need(is_int(c.eval_every) and c.eval_every >= 1, f"--eval-every must be >= 1, got {c.eval_every!r}")
    need(c.eval_batch_size is None or c.eval_batch_size >= 1, "--eval-batch-size must be >= 1")
    need(c.max_minutes is None or c.max_minutes > 0, f"--max-minutes must be positive, got {c.max_minutes}")
    need(not c.fit_epochs or c.max_minutes, "--fit-epochs needs --max-minutes (the budget to fit)")
    need(c.threads is None or (is_int(c.threads) and c.threads >= 1), f"--threads must be >= 1, got {c.threads!r}")
    need(c.num_classes is None or (is_int(c.num_classes) and c.num_classes >= 2), "--num-classes must be >= 2")
    need(c.dataset in DATASETS, f"unknown --dataset {c.dataset!r}; choose cifar10 or cifar100")
    need(isinstance(c.model_kwargs, dict) and all(isinstance(k, str) for k in c.model_kwargs),
         f"--model-kwargs must be a JSON object of constructor arguments, got {c.model_kwargs!r}")
    if c.tensorboard is not None:
        need(importlib.util.find_spec("tensorboard") is not None,
             "--tensorboard needs the 'tensorboard' package, which is not installed: pip install 'densenet[tensorboard]'")
    need(c.progress in PROGRESS, f"progress must be one of {', '.join(PROGRESS)}, got {c.progress!r}")
    need(c.dist_timeout > 0 and math.isfinite(c.dist_timeout),
         f"--dist-timeout must be positive seconds, got {c.dist_timeout}")
    if c.recipe is not None:
        recipe_settings(c.recipe)
    device = resolve_device(c.device)
    need(not (c.amp == "fp16" and device.type == "cpu"),
         "--amp fp16 training needs CUDA (loss scaling); use --amp bf16 on the CPU (as densenet bench says too)")
    need(not (c.amp == "fp16" and c.optimizer == "muon"),
         "--optimizer muon does not take --amp fp16 (its loss scaling); use --amp bf16")
    need(not c.sync_bn or device.type == "cuda",
         "--sync-bn needs CUDA devices (PyTorch's SyncBatchNorm does not run on the CPU)")
    with torch.device("meta"):  # the name and the keyword arguments must build a model
        model = create_model(c.model, num_classes=10, **model_overrides(c))
    need(c.whiten or not c.train_stem, "--train-stem trains the whitened stem's filters: it needs --whiten")
    if c.whiten:
        conv = getattr(getattr(model, "features", None), "conv0", None)
        shape = tuple(conv.weight.shape) if isinstance(conv, torch.nn.Conv2d) else None
        need(shape is not None and shape[0] == 2 * shape[1] * shape[2] * shape[3],
             f"--whiten needs a stem convolution with 2 x 3 x 3 x 3 = 54 stem channels (for 3x3 patches); "
             f"{c.model} has {shape[0] if shape else 'no such stem'} (use a densenet-cpu-* model)")


# --- learning-rate schedule -------------------------------------------------------------------


def lr_factor(step: int, steps_per_epoch: int, config: TrainConfig, total_steps: int | None = None) -> float:
    """The learning rate at optimizer step ``step`` (0-based) as a fraction of ``config.lr``.

    A linear warm-up over ``warmup_epochs`` (from 1/warmup-steps to 1) precedes every schedule:
    ``constant``; ``step`` (multiplied by ``gamma`` at each milestone epoch); ``cosine`` (half a
    cosine down to 0 at the end); ``onecycle`` (after the warm-up peak, straight down to 0 at the
    end: a triangular one-cycle schedule). ``total_steps``: where the run ends (default ``config.epochs``
    whole epochs; --fit-epochs may end a run within an epoch).
    """
    total = total_steps or config.epochs * steps_per_epoch
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


def model_overrides(config: TrainConfig) -> dict[str, Any]:
    """The model's constructor arguments this run sets: ``model_kwargs``, then ``dropout`` and ``memory_efficient``."""
    overrides = dict(config.model_kwargs or {})
    if config.dropout:
        overrides["drop_rate"] = config.dropout
    if config.memory_efficient:
        overrides["memory_efficient"] = True
    return overrides


def augment_settings(config: TrainConfig) -> dict[str, Any]:
    """The :class:`densenet.augment.Augmenter` keyword arguments of ``config`` (its ``augment=True`` fields)."""
    return {f.name: getattr(config, f.name) for f in fields(TrainConfig) if f.metadata.get("augment")}


# --- command-line flags, generated from the fields --------------------------------------------


def _default(f) -> Any:
    return f.default_factory() if f.default is MISSING else f.default


def _format_default(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return ",".join(f"{v:g}" for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _parse_json_object(text: str) -> dict:
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON ({exc.msg}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object like '{{\"growth_rate\": 24}}', got {text!r}")
    return value


_TYPES = {"int": int, "float": float, "str": str, "dict": _parse_json_object}


def flag_help(f) -> str:
    """A field's help text with its default (None defaults are explained by the help text itself)."""
    text, default = f.metadata["help"], _default(f)
    if default is None or default == {}:
        return text
    return f"{text} (default {_format_default(default)})".lstrip()


def add_config_arguments(parser: argparse.ArgumentParser) -> dict[str, argparse._ArgumentGroup]:
    """One flag per :class:`TrainConfig` field, in its group; every default None (unset: see explicit_settings).

    Returns the argument groups by name, so that a command can add its own flags to them.
    """
    groups = {name: parser.add_argument_group(name) for name in GROUPS}
    for f in fields(TrainConfig):
        options = dict(f.metadata["argparse"])
        kind = str(f.type).split("|")[0].split("[")[0].strip()
        if kind == "bool":
            options["action"] = argparse.BooleanOptionalAction
        elif kind in _TYPES and kind != "str" and "nargs" not in options:
            options["type"] = _TYPES[kind]
        groups[f.metadata["group"]].add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, default=None,
                                                 help=flag_help(f), **options)
    return groups


_LISTS = ("milestones", "low_res_ramp")  # comma-separated numbers on the command line


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def explicit_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given on the command line (argparse leaves the others None)."""
    values = {}
    for name in config_fields():
        if name == "recipe":
            continue
        value = getattr(args, name, None)
        if value is not None:
            values[name] = parse_milestones(value, _flag(name)) if name in _LISTS else value
    return values


def format_recipes() -> str:
    """Each recipe: its description and the flags it sets (marked when equal to the default)."""
    defaults = asdict(TrainConfig())
    lines = []
    for name, recipe in RECIPES.items():
        lines.append(f"{name}: {recipe['description']}")
        for key, value in recipe["settings"].items():
            mark = "" if defaults.get(key) != value else "  (default)"
            lines.append(f"    --{key.replace('_', '-')} {value}{mark}")
    return "\n".join(lines)
