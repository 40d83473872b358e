"""``densenet sweep``: one training run per value of a model parameter, then a table and plots.

``densenet sweep --param growth_rate --values 8,12,24,32 [--out DIR] [train flags]`` trains the
model (``--model``, else the recipe's, else densenet121-cifar) once per value, one run after the
other, through :func:`densenet.trainer.train` with the same training settings; each run has its own
run directory ``DIR/<param>-<value>``. ``sweep.json`` records the sweep's settings when it starts;
at the end it writes ``sweep.md`` and ``sweep-results.json`` (a table of parameters, MACs and test
accuracy per value) and ``sweep.png`` (accuracy against parameters and against MACs).

A sweep is resumable: running the same command again skips the finished runs (those with a
``sweep-done.json`` marker, or final weights that say they finished), resumes an interrupted one
from its last checkpoint (``resume auto``) and starts the rest. SIGINT/SIGTERM stop the current run
with a checkpoint and end the sweep. Changing the training settings of an existing sweep
directory is an error (use another ``--out``).

Which model each value gives:

- ``growth_rate`` and ``depth`` of the paper's CIFAR families, ``densenet-bc-L-k`` and
  ``densenet-L-k``, change the name (``densenet-bc-100-12`` with growth rate 24 becomes
  ``densenet-bc-100-24``; depth 40 becomes ``densenet-bc-40-12``), so the block configuration and
  the stem width (2k for BC models) follow the paper's rules;
- any other constructor argument of the model (``compression``, ``bn_size``, ``growth_rate`` of
  other models, ``num_init_features``, ``drop_rate``, a ResNet's ``widths``...) is a keyword
  argument of the run (``TrainConfig.model_kwargs``, stored in its checkpoint), labelled
  ``<model>@<param>=<value>`` in the table. Nothing is registered anywhere: every run of a sweep
  resumes with plain ``densenet train --resume RUN_DIR``, and its weights record the full
  configuration, so ``densenet evaluate``/``predict``/``report`` load them anywhere.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from densenet.analysis import analyze_model
from densenet.config import add_config_arguments, explicit_settings, format_recipes, make_config
from densenet.errors import ConfigError, ResourceError
from densenet.files import atomic_write_text
from densenet.plots import plot_sweep
from densenet.registry import create_model, model_from_config
from densenet.rundir import RunDir, read_run
from densenet.trainer import train

__all__ = ["parse_values", "variant_model", "variant_label", "sweep", "format_table", "add_arguments", "run"]

DONE_MARKER = "sweep-done.json"
SWEEP_FILE = "sweep.json"
# settings a sweep owns, and settings that may differ between invocations without changing results
OWNED = ("model", "out_dir", "weights_dir", "resume")
RUNTIME_ONLY = ("progress", "threads", "max_minutes", "device", "data_dir", "eval_batch_size")
_FAMILIES = (("densenet-bc-{}-{}", re.compile(r"densenet-bc-(\d+)-(\d+)")),
             ("densenet-{}-{}", re.compile(r"densenet-(\d+)-(\d+)")))


def parse_values(text: str) -> list[int | float]:
    """``"8,12,24"`` -> [8, 12, 24]; ``"0.25,0.5"`` -> [0.25, 0.5] (ints where the text is an integer)."""
    values: list[int | float] = []
    for item in (t.strip() for t in str(text).split(",")):
        if not item:
            continue
        try:
            values.append(int(item) if re.fullmatch(r"[+-]?\d+", item) else float(item))
        except ValueError:
            raise ConfigError(f"--values must be numbers separated by commas, got {item!r} in {text!r}") from None
    if not values:
        raise ConfigError("--values needs at least one value, e.g. --values 8,12,24,32")
    if len(set(values)) != len(values):
        raise ConfigError(f"--values has repeats: {text!r}")
    return values


def _text(value: int | float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def variant_model(model: str, param: str, value: int | float) -> tuple[str, dict[str, Any]]:
    """The model name and keyword arguments that give ``model`` with ``param`` set to ``value`` (see above)."""
    base = model.strip().lower()
    kwargs: dict[str, Any] = {}
    for template, pattern in _FAMILIES:
        match = pattern.fullmatch(base)
        if match and param in ("depth", "growth_rate"):
            if not isinstance(value, int):
                raise ConfigError(f"{param} must be an integer, got {value}")
            depth, k = int(match.group(1)), int(match.group(2))
            name = template.format(value, k) if param == "depth" else template.format(depth, value)
            break
    else:
        if param == "depth":
            raise ConfigError(f"--param depth needs a densenet-bc-L-k or densenet-L-k model, not {model!r} "
                              f"(for others sweep block_config's members directly)")
        name, kwargs = base, {param: value}
    with torch.device("meta"):  # fail now, before any training, if the value does not fit
        try:
            create_model(name, **kwargs)
        except ConfigError as exc:
            raise ConfigError(f"{param}={_text(value)} does not work for {model}: {exc}") from None
    return name, kwargs


def variant_label(name: str, kwargs: dict[str, Any]) -> str:
    """How the table names a variant: the model name, with ``@param=value`` for keyword arguments."""
    return name + "".join(f"@{k}={_text(v)}" for k, v in kwargs.items())


def _is_done(run_dir: Path) -> bool:
    if (run_dir / DONE_MARKER).is_file():
        return True
    meta_file = RunDir(run_dir).meta
    if meta_file.is_file():
        try:
            return bool(json.loads(meta_file.read_text(encoding="utf-8"))["training"]["finished"])
        except (OSError, ValueError, KeyError, TypeError):
            return False
    return False


def _check_sweep_file(out: Path, record: dict[str, Any]) -> None:
    """Refuse to mix runs of different settings in one sweep directory; record the settings."""
    path = out / SWEEP_FILE
    if path.is_file():
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read {path}: {exc}") from None
        for key in ("model", "param"):
            if stored.get(key) != record[key]:
                raise ConfigError(f"{out} holds a sweep of {key} {stored.get(key)!r}, not {record[key]!r}; "
                                  "use another --out")
        old, new = stored.get("settings", {}), record["settings"]
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                raise ConfigError(f"{out} was swept with {key}={old.get(key)!r}, this run asks for "
                                  f"{key}={new.get(key)!r}; use another --out")
        record = dict(record, values=list(dict.fromkeys(stored.get("values", []) + record["values"])))
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")


def _row(param: str, value, name: str, kwargs: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """One table row: the model's size (as the run built it, when there is a run) and the run's results."""
    files = RunDir(run_dir)
    run = read_run(run_dir) if files.config.is_file() or files.meta.is_file() else None
    with torch.device("meta"):  # the run's classifier has as many outputs as its data has classes
        model = model_from_config(run["model_config"]) if run and run["model_config"] else create_model(name, **kwargs)
    analysis = analyze_model(model)
    row = {"param": param, "value": value, "model": variant_label(name, kwargs), "params": analysis["total"]["params"],
           "macs": analysis["total"]["macs"], "run_dir": str(run_dir), "status": "not started",
           "epochs_completed": 0, "epochs": None, "final_test_acc": None, "best_acc": None, "best_epoch": None,
           "wall_seconds": None, "images_per_second": None}
    if run is not None:
        row.update({k: run[k] for k in ("epochs_completed", "epochs", "final_test_acc", "best_acc", "best_epoch",
                                        "wall_seconds", "images_per_second")})
        row["status"] = "done" if _is_done(run_dir) else "unfinished"
    return row


def sweep(param: str, values: list[int | float], settings: dict[str, Any] | None = None,
          out_dir: str | Path | None = None, say=print) -> dict[str, Any]:
    """Train once per value (skipping finished runs, resuming unfinished ones); return the table.

    ``settings`` are :class:`densenet.config.TrainConfig` fields (``recipe`` included) shared by
    every run; ``model`` is the model whose ``param`` is swept. Returns ``{"param", "model",
    "out_dir", "rows", "stopped"}``; ``stopped`` is ``"SIGINT"``/``"SIGTERM"`` when a signal ended
    the sweep early, else ``""``. The table files are written in both cases.
    """
    settings = dict(settings or {})
    for key in OWNED[1:]:
        if settings.get(key) not in (None, ""):
            raise ConfigError(f"densenet sweep chooses --{key.replace('_', '-')} itself for every run; "
                              "use --out for the sweep directory")
        settings.pop(key, None)
    if not re.fullmatch(r"[a-z_][a-z0-9_]*", param or ""):
        raise ConfigError(f"--param must be a model parameter name such as growth_rate, got {param!r}")
    base = make_config(settings)
    variants = [variant_model(base.model, param, v) for v in values]
    out = Path(out_dir) if out_dir else Path("runs") / f"sweep-{base.model}-{param}"
    shared = {k: v for k, v in asdict(base).items() if k not in OWNED + RUNTIME_ONLY}
    try:
        out.mkdir(parents=True, exist_ok=True)
        _check_sweep_file(out, {"model": base.model, "param": param, "values": list(values), "settings": shared})
    except OSError as exc:
        raise ResourceError(f"cannot write the sweep directory {out}: {exc.strerror or exc}") from None

    stopped = ""
    for i, (value, (name, kwargs)) in enumerate(zip(values, variants), start=1):
        run_dir = out / f"{param}-{_text(value)}"
        label = f"[{i}/{len(values)}] {param}={_text(value)} ({variant_label(name, kwargs)})"
        if _is_done(run_dir):
            say(f"{label}: finished before, skipped ({run_dir})")
            continue
        resuming = RunDir(run_dir).last.is_file()
        say(f"{label}: {'resuming' if resuming else 'training'} in {run_dir}")
        config = make_config(base, model=name, model_kwargs={**base.model_kwargs, **kwargs}, out_dir=str(run_dir),
                             weights_dir=None, resume="auto")
        result = train(config)
        if result.stop_reason == "completed":
            summary = {"param": param, "value": value, "model": variant_label(name, kwargs), "final_test_acc": result.final_test_acc,
                       "best_acc": result.best_acc, "epochs_completed": result.epochs_completed}
            atomic_write_text(run_dir / DONE_MARKER, json.dumps(summary, indent=2) + "\n")
        elif result.stop_reason in ("SIGINT", "SIGTERM"):
            stopped = result.stop_reason
            say(f"{label}: stopped by {stopped}; run the same command again to resume")
            break
        else:
            say(f"{label}: stopped ({result.stop_reason}); the next invocation resumes it")

    rows = [_row(param, v, n, kw, out / f"{param}-{_text(v)}") for v, (n, kw) in zip(values, variants)]
    data = {"param": param, "model": base.model, "out_dir": str(out), "rows": rows, "stopped": stopped}
    _write_outputs(data, out)
    return data


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def format_table(data: dict[str, Any]) -> str:
    """The sweep as a markdown table."""
    lines = [f"Sweep of {data['param']} for {data['model']} ({data['out_dir']})", "",
             f"| {data['param']} | model | params | MACs (G) | epochs | final test | best test | train img/s | "
             "wall s | status |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in data["rows"]:
        ips = "-" if r["images_per_second"] is None else f"{r['images_per_second']:.1f}"
        wall = "-" if r["wall_seconds"] is None else f"{r['wall_seconds']:.0f}"
        lines.append(f"| {_text(r['value'])} | {r['model']} | {r['params']:,} | {r['macs'] / 1e9:.4f} | "
                     f"{r['epochs_completed']}/{r['epochs'] or '-'} | {_pct(r['final_test_acc'])} | "
                     f"{_pct(r['best_acc'])} | {ips} | {wall} | {r['status']} |")
    return "\n".join(lines)


def _write_outputs(data: dict[str, Any], out: Path) -> None:
    atomic_write_text(out / "sweep.md", format_table(data) + "\n")
    atomic_write_text(out / "sweep-results.json", json.dumps(data, indent=2) + "\n")
    plot_sweep(data, out / "sweep.png")


# --------------------------------------------------------------------------------------------
# command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("sweep")
    g.add_argument("--param", default=None, help="model parameter to vary: growth_rate, compression, bn_size, "
                                                   "depth (densenet-bc-L-k / densenet-L-k), ...")
    g.add_argument("--values", default=None, help="comma-separated values, e.g. 8,12,24,32")
    g.add_argument("--out", default=None, metavar="DIR",
                   help="sweep directory (default runs/sweep-<model>-<param>); one run directory per value")
    groups = add_config_arguments(parser)
    groups["model and data"].add_argument("--list-recipes", action="store_true",
                                          help="show the recipes and what they set, then exit")


def run(args: argparse.Namespace) -> int:
    if args.list_recipes:
        print(format_recipes())
        return 0
    if not args.param or not args.values:
        raise ConfigError("give the parameter and its values, e.g. --param growth_rate --values 8,12,24,32")
    settings = explicit_settings(args)
    if args.recipe:
        settings["recipe"] = args.recipe
    data = sweep(args.param, parse_values(args.values), settings, args.out)
    print()
    print(format_table(data))
    out = Path(data["out_dir"])
    print(f"\nwrote {out / 'sweep.md'}, {out / 'sweep-results.json'}, {out / 'sweep.png'}")
    return {"SIGINT": 130, "SIGTERM": 143}.get(data["stopped"], 0)
