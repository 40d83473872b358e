"""``densenet train``: the command line over :mod:`densenet.config` and :mod:`densenet.trainer`.

The flags are generated from :class:`densenet.config.TrainConfig`'s fields; this module adds
``--list-recipes`` and ``--nproc`` (a ``torchrun`` launcher), resolves the configuration (built-in
defaults, then the recipe, then explicit flags; on ``--resume`` the checkpoint's settings first),
and runs the :class:`densenet.trainer.Trainer`. The Python API is :func:`densenet.trainer.train`.
"""

from __future__ import annotations

import argparse

from densenet.config import (
    TrainConfig,
    add_config_arguments,
    config_fields,
    explicit_settings,
    format_recipes,
    recipe_settings,
    validate,
)
from densenet.distributed import argv_from_args, launch
from densenet.errors import ConfigError, WeightsError
from densenet.rundir import find_resume_checkpoint
from densenet.runtime import set_malloc_policy
from densenet.trainer import Trainer
from densenet.weights import load_checkpoint

__all__ = ["add_arguments", "config_from_args", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Every :class:`TrainConfig` field as a flag, plus ``--list-recipes`` and ``--nproc``."""
    groups = add_config_arguments(parser)
    groups["model and data"].add_argument("--list-recipes", action="store_true",
                                          help="show the recipes and what they set, then exit")
    groups["distributed (torchrun -m densenet train ...; see docs/DISTRIBUTED.md)"].add_argument(
        "--nproc", type=int, default=None, metavar="N",
        help="train with N processes on this machine (one per GPU): runs python -m torch.distributed.run "
             "--standalone --nproc_per_node N -m densenet train <the other arguments>")


def config_from_args(args) -> TrainConfig:
    """Built-in defaults, then the recipe, then explicit flags; on resume the checkpoint's settings first."""
    given = explicit_settings(args)
    model = given.get("model") or (recipe_settings(args.recipe)["model"] if args.recipe else TrainConfig.model)
    path = find_resume_checkpoint(given.get("resume"), given.get("out_dir"), model)
    if path is None:
        values = recipe_settings(args.recipe, given.get("model")) if args.recipe else {}
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
    result = Trainer(config).run()
    return result.exit_code
