"""``densenet report``: one self-contained HTML page about one or more training runs.

For each run directory of ``densenet train`` the page shows the settings, the training curves,
the final metrics, the per-class accuracy and confusion matrix on the test set, and the
feature-reuse map of the trained DenseNet (:mod:`densenet.reuse`); with several runs a
comparison table comes first. Pictures are PNGs embedded as base64 ``data:`` URIs and the page
has no scripts, no external style sheets and no links to fetch, so the single file can be
mailed, archived or opened offline.

The confusion matrix comes from the run's ``confusion.json`` (written by ``densenet evaluate
--weights RUN``); without it the final weights are evaluated on the test split here (the data
is found as in ``densenet train``: the run's ``--data-dir``, else ``$DENSENET_DATA``, else
``./data``), unless ``--no-evaluate``.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from densenet import __version__
from densenet.analysis import analyze_model
from densenet.data import load_dataset
from densenet.errors import ConfigError, DenseNetError, ResourceError
from densenet.files import atomic_write_text
from densenet.inference import align_classes, evaluate, views_label
from densenet.plots import plot_confusion, plot_curves, plot_feature_reuse
from densenet.registry import model_from_config
from densenet.reuse import feature_reuse
from densenet.rundir import RunDir, read_run
from densenet.runtime import resolve_device
from densenet.weights import load_model

__all__ = ["build_report", "add_arguments", "run"]


# --------------------------------------------------------------------------------------------
# the pieces of a run's section


def _png_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _img(uri: str, alt: str, css_class: str) -> str:
    return f'<img class="{css_class}" alt="{html.escape(alt)}" src="{uri}">'


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _images(run: dict[str, Any]) -> str:
    views = run.get("final_test_views")
    on = [f"{run['test_images']:,} test images"] if run["test_images"] else []
    on += [f"{views_label(views)} of each"] if views else []
    return f" (on {', '.join(on)})" if on else ""


def _table(headers: list[str] | None, rows: list[list[Any]], numeric_from: int = 1) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers or [])
    body = []
    for row in rows:
        cells = "".join(f'<td class="{"num" if i >= numeric_from else ""}">{html.escape(str(v))}</td>'
                        for i, v in enumerate(row))
        body.append(f"<tr>{cells}</tr>")
    thead = f"<thead><tr>{head}</tr></thead>" if head else ""
    return f"<table>{thead}<tbody>{''.join(body)}</tbody></table>"


def _analysis(run: dict[str, Any]) -> dict[str, Any] | None:
    import torch


    if not run["model_config"]:
        return None
    try:
        with torch.device("meta"):
            return analyze_model(model_from_config(run["model_config"]))
    except DenseNetError:
        return None


def _evaluate_run(run: dict[str, Any], data_dir: str | None, device: str) -> tuple[dict | None, str]:
    """The test-set evaluation of the run's final weights: (result, note)."""
    settings, meta = run["settings"], run["meta"] or {}
    try:
        model, meta = load_model(run["dir"], device=device)
        dataset = load_dataset(data_dir or settings.get("data_dir"), name=settings.get("dataset", "cifar10"),
                               split="test", image_size=int(meta.get("input_size", 32)))
        dataset = align_classes(dataset, meta["classes"])
        result = evaluate(model, dataset, batch_size=500, device=device, tta=bool(settings.get("tta")),
                          tta_translate=bool(settings.get("tta") and settings.get("tta_translate")))
    except DenseNetError as exc:
        return None, f"not evaluated: {exc}"
    return result, f"evaluated now on {len(dataset):,} test images of {dataset.root}"


def _run_section(run: dict[str, Any], index: int, workdir: Path, evaluate_missing: bool, data_dir, device) -> str:
    parts = [f'<section id="run{index}"><h2>{html.escape(run["name"])}: {html.escape(run["model_name"])}</h2>',
             f'<p class="path">{html.escape(run["dir"])}</p>']

    analysis = _analysis(run)
    metrics = [
        ["model", run["model_name"]],
        ["parameters", f"{analysis['total']['params']:,}" if analysis else "-"],
        ["MACs per image", f"{analysis['total']['macs'] / 1e9:.3f} G" if analysis else "-"],
        ["epochs completed", f"{run['epochs_completed']} of {run['epochs']}"],
        ["stop reason", run["stop_reason"] or "-"],
        ["final test accuracy", _pct(run["final_test_acc"]) + _images(run)],
        ["best test accuracy", f"{_pct(run['best_acc'])} (epoch {run['best_epoch']})" if run["best_acc"] is not None else "-"],
        ["wall time", "-" if run["wall_seconds"] is None else f"{run['wall_seconds']:.0f} s"],
        ["training images/s", "-" if run["images_per_second"] is None else f"{run['images_per_second']:.1f}"],
    ]
    if run["history"]:
        last = run["history"][-1]
        metrics.append(["last epoch train loss / accuracy", f"{last['train_loss']:.4f} / {_pct(last['train_acc'])}"])
        if last.get("test_loss") is not None:
            metrics.append(["last epoch test loss", f"{last['test_loss']:.4f}"])
    parts.append('<div class="row"><div><h3>final metrics</h3>' + _table(None, metrics) + "</div>")

    settings = [[k, json.dumps(v) if isinstance(v, (list, dict)) else str(v)] for k, v in run["settings"].items()]
    env = run["environment"]
    for key in ("device", "device_name", "threads", "torch", "git_commit"):
        if env.get(key) is not None:
            settings.append([f"environment: {key}", str(env[key])])
    per_row = (len(settings) + 2) // 3  # three (setting, value) column pairs side by side
    columns = [settings[i:i + per_row] for i in range(0, len(settings), per_row)]
    grid = [sum((col[r] if r < len(col) else ["", ""] for col in columns), []) for r in range(per_row)]
    parts.append("<div><h3>settings</h3>" + (_table(["setting", "value"] * len(columns), grid, numeric_from=99)
                                               if settings else "<p>no config.json</p>") + "</div></div>")

    curves = RunDir(run["dir"]).curves
    if not curves.is_file() and run["history"]:
        curves = plot_curves(run["history"], workdir / f"curves{index}.png", title=run["model_name"])
    parts.append("<h3>training curves</h3>" + (_img(_png_uri(curves), "training curves", "chart curves")
                                               if curves.is_file() else "<p>no metrics recorded</p>"))

    confusion, note = run["confusion"], "from confusion.json"
    if confusion is None and evaluate_missing and run["meta"]:
        confusion, note = _evaluate_run(run, data_dir, device)
    elif confusion is None:
        note = "no confusion.json (run densenet evaluate --weights RUN)"
    parts.append(f'<h3>test set: per-class accuracy and confusion matrix</h3><p class="note">{html.escape(note)}</p>')
    if confusion is not None:
        per_class = [[r["class"], r["correct"], r["total"], _pct(r["accuracy"])] for r in confusion["per_class"]]
        per_class.append(["all", sum(r["correct"] for r in confusion["per_class"]), confusion["num_samples"],
                          _pct(confusion["top1"])])
        picture = plot_confusion(confusion["confusion"], confusion["classes"], workdir / f"confusion{index}.png",
                                 title=f"{run['model_name']} (top-1 {_pct(confusion['top1'])})")
        parts.append('<div class="row"><div>' + _table(["class", "correct", "total", "accuracy"], per_class)
                     + "</div><div>" + _img(_png_uri(picture), "confusion matrix", "chart confusion") + "</div></div>")

    parts.append("<h3>feature reuse</h3>")
    parts.append(_reuse_figure(run, index, workdir, plot_feature_reuse))
    parts.append("</section>")
    return "\n".join(parts)


def _reuse_figure(run: dict[str, Any], index: int, workdir: Path, plot) -> str:
    if (run["model_config"] or {}).get("arch") != "densenet":
        return "<p>not a DenseNet: no dense blocks to map</p>"
    try:
        model, _ = load_model(run["dir"])
    except DenseNetError as exc:
        return f"<p>no weights to map: {html.escape(str(exc))}</p>"
    picture = plot(feature_reuse(model), workdir / f"reuse{index}.png", title=f"feature reuse: {run['model_name']}")
    return ('<p class="note">mean |weight| of each layer\'s first convolution over the channels of each source, '
            "normalised per target layer; last column: the next transition (T) or the classifier (C)</p>"
            + _img(_png_uri(picture), "feature-reuse map", "chart reuse"))


def _comparison(runs: list[dict[str, Any]]) -> str:
    rows = []
    for run in runs:
        analysis = _analysis(run)
        rows.append([run["name"], run["model_name"], f"{analysis['total']['params']:,}" if analysis else "-",
                     f"{analysis['total']['macs'] / 1e9:.3f}" if analysis else "-",
                     f"{run['epochs_completed']}/{run['epochs']}", run["test_images"] or "-", _pct(run["best_acc"]),
                     _pct(run["final_test_acc"]),
                     "-" if run["images_per_second"] is None else f"{run['images_per_second']:.1f}",
                     "-" if run["wall_seconds"] is None else f"{run['wall_seconds']:.0f}"])
    headers = ["run", "model", "params", "MACs (G)", "epochs", "test images", "best test", "final test", "train img/s",
               "wall s"]
    return "<h2>comparison</h2>" + _table(headers, rows, numeric_from=2)


STYLE = """
body { font-family: sans-serif; color: #222; background: #fff; margin: 24px; max-width: 1500px; }
h1 { font-size: 22px; } h2 { font-size: 18px; border-bottom: 1px solid #999; margin-top: 32px; }
h3 { font-size: 15px; margin: 18px 0 6px; }
table { border-collapse: collapse; font-size: 13px; margin: 4px 0; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; vertical-align: top; }
td.num { text-align: right; } th { background: #eee; }
.row { display: flex; flex-wrap: wrap; gap: 28px; align-items: flex-start; }
.path, .note { color: #666; font-size: 12px; }
img.chart { display: block; max-width: 100%; height: auto; border: 1px solid #ddd; }
"""


def build_report(run_dirs: list[str | Path], *, evaluate_missing: bool = True, data_dir: str | None = None,
                 device: str = "cpu") -> str:
    """The HTML page for ``run_dirs`` (see the module docstring)."""
    if not run_dirs:
        raise ConfigError("name at least one run directory")
    runs = [read_run(d) for d in run_dirs]
    title = "densenet report: " + ", ".join(run["name"] for run in runs)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = [f"<h1>{html.escape(title)}</h1>", f'<p class="note">written {stamp} by densenet {__version__}</p>']
    if len(runs) > 1:
        body.append(_comparison(runs))
    with tempfile.TemporaryDirectory(prefix="densenet-report-") as tmp:
        for i, run in enumerate(runs):
            body.append(_run_section(run, i, Path(tmp), evaluate_missing, data_dir, device))
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")


# --------------------------------------------------------------------------------------------
# command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories of densenet train")
    parser.add_argument("--out", default="report.html", help="the HTML file to write (default report.html)")
    parser.add_argument("--evaluate", action=argparse.BooleanOptionalAction, default=True,
                        help="evaluate runs without confusion.json on the test split (default on)")
    parser.add_argument("--data-dir", default=None, help="test data for that (default: the run's, $DENSENET_DATA, ./data)")
    parser.add_argument("--device", default="cpu", help="device for that evaluation (default cpu)")


def run(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    page = build_report(args.run_dirs, evaluate_missing=args.evaluate, data_dir=args.data_dir, device=str(device))
    try:
        atomic_write_text(args.out, page)
    except OSError as exc:
        raise ResourceError(f"cannot write {args.out}: {exc.strerror or exc}") from None
    print(f"wrote {args.out} ({len(page.encode('utf-8')) / 1e6:.2f} MB, {len(args.run_dirs)} run(s))")
    return 0
