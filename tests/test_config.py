"""The training configuration: flags generated from TrainConfig's fields, the docs' flag table, augmentation fields."""

from __future__ import annotations

import argparse
import inspect
import re
from dataclasses import MISSING, fields
from pathlib import Path

import pytest

from densenet import config as C
from densenet.augment import Augmenter
from densenet.errors import ConfigError
from densenet.train import add_arguments

DOC = Path(__file__).resolve().parents[1] / "docs" / "TRAINING.md"
COMMAND_FLAGS = {"--list-recipes", "--nproc"}  # flags of the train command that are not settings


def default_of(f):
    return f.default_factory() if f.default is MISSING else f.default


def flag_table() -> dict[str, str]:
    """docs/TRAINING.md's flag table: each flag (``--no-x`` forms dropped) -> its default cell."""
    text = DOC.read_text(encoding="utf-8")
    start = text.index("| flag | default | meaning |")
    rows = {}
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        flag_cell, default_cell = [c.strip() for c in line.strip("|").split("|")[:2]]
        flags = [f for f in re.findall(r"--[a-z][a-z-]*", flag_cell) if not f.startswith("--no-")]
        assert len(flags) == 1, f"one flag per row: {line}"
        rows[flags[0]] = default_cell
    return rows


def matches(default, cell: str) -> bool:
    """Whether a documented default cell states ``default``."""
    if default is None or default == {}:
        return True  # explained in words (none, all, the data's, ...)
    if isinstance(default, bool):
        return cell.split()[0] == ("on" if default else "off")
    if isinstance(default, (int, float)):
        number = re.search(r"-?\d+(?:\.\d+)?(?:e-?\d+)?", cell)
        return number is not None and float(number.group()) == float(default)
    if isinstance(default, list):
        return cell.strip("`") == ",".join(f"{v:g}" for v in default)
    return cell.split()[0].strip("`,") == str(default)


def test_every_setting_has_a_flag_with_its_default_in_the_help():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    actions = {a.dest: a for a in parser._actions}
    for f in fields(C.TrainConfig):
        action = actions[f.name]
        assert f"--{f.name.replace('_', '-')}" in action.option_strings
        assert action.default is None  # "not given": recipes and checkpoints fill the rest
        default = default_of(f)
        if default not in (None, {}):
            assert f"(default {C._format_default(default)})" in action.help, f.name


def test_the_docs_flag_table_is_the_fields():
    table = flag_table()
    field_flags = {f"--{f.name.replace('_', '-')}": f for f in fields(C.TrainConfig)}
    assert set(table) == set(field_flags) | COMMAND_FLAGS
    wrong = {flag: (default_of(f), table[flag]) for flag, f in field_flags.items()
             if not matches(default_of(f), table[flag])}
    assert wrong == {}


def test_augmentation_fields_are_the_augmenters_keywords():
    # a new augmentation: an Augmenter keyword argument plus a TrainConfig field with augment=True
    settings = C.augment_settings(C.TrainConfig(cutout=8, color_jitter=0.2, padding_mode="reflect"))
    assert settings == {"crop_padding": 4, "padding_mode": "reflect", "flip": True, "alternate_flip": False,
                        "cutout": 8, "color_jitter": 0.2}
    assert set(settings) <= set(inspect.signature(Augmenter).parameters)
    assert Augmenter((0.5,) * 3, (0.25,) * 3, **settings).padding_mode == "reflect"


def test_padding_mode_is_checked_and_parsed():
    C.validate(C.make_config(padding_mode="reflect"))
    with pytest.raises(ConfigError, match="unknown --padding-mode 'edge'; choose one of zeros, reflect"):
        C.validate(C.make_config(padding_mode="edge"))
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args(["--padding-mode", "reflect"]).padding_mode == "reflect"
    with pytest.raises(SystemExit):
        parser.parse_args(["--padding-mode", "edge"])


def test_model_kwargs_reach_the_model_and_bad_ones_are_one_line_errors():
    c = C.make_config(model="densenet-bc-mini", model_kwargs={"compression": 0.25}, dropout=0.1)
    assert C.model_overrides(c) == {"compression": 0.25, "drop_rate": 0.1}
    C.validate(c)
    with pytest.raises(ConfigError, match="cannot build 'densenet-bc-mini'"):
        C.validate(C.make_config(model="densenet-bc-mini", model_kwargs={"no_such_argument": 1}))
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args(["--model-kwargs", '{"growth_rate": 24}']).model_kwargs == {"growth_rate": 24}
    with pytest.raises(SystemExit):
        parser.parse_args(["--model-kwargs", "[1, 2]"])
