"""``densenet sweep``: model variants per value, resumability (skip, resume, start), table and plots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from densenet import trainer as TR
from densenet.cli import main
from densenet.errors import ConfigError
from densenet.models import count_parameters
from densenet.registry import create_model
from densenet.sweep import DONE_MARKER, parse_values, sweep, variant_label, variant_model
from densenet.weights import load_checkpoint, load_model
from helpers import channel_image_folder


def make_image_folder(root: Path, per_class=(16, 4)) -> Path:
    return channel_image_folder(root, per_class, ("a", "b", "c"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("sweepdata") / "data")


@pytest.fixture(autouse=True)
def _registers_nothing(isolated_run):
    from densenet import registry

    names = registry.list_models()
    yield
    assert registry.list_models() == names  # a sweep registers nothing


def settings(data, **kw) -> dict:
    values = dict(model="densenet-bc-10-4", data_dir=str(data), epochs=1, batch_size=16, lr=0.05,
                  schedule="constant", device="cpu", progress="none")
    values.update(kw)
    return values


def test_parse_values():
    assert parse_values("8,12, 24,32") == [8, 12, 24, 32]
    assert parse_values("0.25,0.5,1") == [0.25, 0.5, 1]
    assert isinstance(parse_values("0")[0], int) and isinstance(parse_values("0.5")[0], float)
    for bad, message in (("8,x", "must be numbers"), ("", "at least one value"), ("4,4", "repeats")):
        with pytest.raises(ConfigError, match=message):
            parse_values(bad)


def test_variants_follow_the_paper_families_or_override():
    assert variant_model("densenet-bc-100-12", "growth_rate", 24) == ("densenet-bc-100-24", {})
    assert variant_model("densenet-bc-100-12", "depth", 40) == ("densenet-bc-40-12", {})
    assert variant_model("densenet-40-12", "depth", 100) == ("densenet-100-12", {})
    name, kwargs = variant_model("densenet-bc-mini", "compression", 0.25)
    assert (name, kwargs) == ("densenet-bc-mini", {"compression": 0.25})
    assert variant_label(name, kwargs) == "densenet-bc-mini@compression=0.25"
    model = create_model(name, **kwargs)
    assert model.config["compression"] == 0.25 and model.config["name"] == name
    assert model.features.transition1.conv.out_channels == int(0.25 * (24 + 6 * 12))
    name, kwargs = variant_model("densenet121-cifar", "growth_rate", 12)
    assert count_parameters(create_model(name, **kwargs)) == count_parameters(
        create_model("densenet121-cifar", growth_rate=12))
    name, kwargs = variant_model("densenet-bc-mini", "bn_size", 0)
    assert create_model(name, **kwargs).config["bn_size"] == 0
    with pytest.raises(ConfigError, match="--param depth needs a densenet-bc-L-k or densenet-L-k model"):
        variant_model("densenet-bc-mini", "depth", 40)
    with pytest.raises(ConfigError, match="compression=1.5 does not work for densenet-bc-mini: compression must"):
        variant_model("densenet-bc-mini", "compression", 1.5)
    with pytest.raises(ConfigError, match="depth must be 6n\\+4"):
        variant_model("densenet-bc-100-12", "depth", 41)
    with pytest.raises(ConfigError, match="cannot build"):
        variant_model("densenet-bc-mini", "no_such_thing", 3)


def test_sweep_skips_finished_resumes_interrupted_and_tabulates(data, tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    first = sweep("growth_rate", [2], settings(data), out, say=lambda _: None)
    run2, run4 = out / "growth_rate-2", out / "growth_rate-4"
    assert (run2 / DONE_MARKER).is_file() and first["rows"][0]["status"] == "done"
    weights_before = (run2 / "model.safetensors").stat().st_mtime_ns

    # a second invocation with one more value, stopped by SIGTERM after 2 of the new run's 3 steps
    monkeypatch.setenv(TR.SIGTERM_AFTER_STEP_ENV, "2")
    said = []
    second = sweep("growth_rate", [2, 4], settings(data), out, say=said.append)
    assert second["stopped"] == "SIGTERM"
    assert said[0].startswith("[1/2] growth_rate=2 (densenet-bc-10-2): finished before, skipped")
    assert (run2 / "model.safetensors").stat().st_mtime_ns == weights_before
    checkpoint = load_checkpoint(run4 / "checkpoint-last.pt")
    assert (checkpoint["epoch"], checkpoint["step_in_epoch"], checkpoint["global_step"]) == (0, 2, 2)
    assert not (run4 / DONE_MARKER).exists()
    assert [r["status"] for r in second["rows"]] == ["done", "unfinished"]

    # the third invocation resumes the interrupted run at step 2 and finishes it
    monkeypatch.delenv(TR.SIGTERM_AFTER_STEP_ENV)
    third = sweep("growth_rate", [2, 4], settings(data), out, say=lambda _: None)
    assert third["stopped"] == "" and [r["status"] for r in third["rows"]] == ["done", "done"]
    assert json.loads((run4 / "config.json").read_text())["resumed_from"] == str(run4 / "checkpoint-last.pt")
    assert load_checkpoint(run4 / "checkpoint-last.pt")["global_step"] == 3
    assert (run2 / "model.safetensors").stat().st_mtime_ns == weights_before

    # the table holds each run's own numbers and the models' sizes as densenet analyze counts them
    table = json.loads((out / "sweep-results.json").read_text())
    for row, run_dir, k in zip(table["rows"], (run2, run4), (2, 4)):
        model, meta = load_model(run_dir)
        assert row["model"] == f"densenet-bc-10-{k}" and model.config["growth_rate"] == k
        assert row["params"] == count_parameters(model)
        assert row["final_test_acc"] == meta["training"]["final_test_acc"]
        assert row["epochs_completed"] == 1
    from densenet.analysis import analyze_model

    with torch.device("meta"):
        assert table["rows"][1]["macs"] == analyze_model(create_model("densenet-bc-10-4", num_classes=3))["total"]["macs"]
    markdown = (out / "sweep.md").read_text()
    assert f"| 4 | densenet-bc-10-4 | {table['rows'][1]['params']:,} |" in markdown
    assert (out / "sweep.png").stat().st_size > 10_000
    assert json.loads((out / "sweep.json").read_text())["values"] == [2, 4]

    # other training settings in the same directory are refused, before any training
    with pytest.raises(ConfigError, match="was swept with lr=0.05, this run asks for lr=0.1"):
        sweep("growth_rate", [2, 4], settings(data, lr=0.1), out, say=lambda _: None)


def test_cli_override_sweep_trains_the_variant(data, tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["sweep", "--param", "compression", "--values", "0.25", "--model", "densenet-bc-10-4",
                 "--data-dir", str(data), "--epochs", "1", "--batch-size", "16", "--device", "cpu",
                 "--progress", "none", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| 0.25 | densenet-bc-10-4@compression=0.25 |" in printed
    model, meta = load_model(out / "compression-0.25")
    assert model.config["compression"] == 0.25 and model.features.transition1.conv.out_channels == 3
    assert meta["training"]["finished"]


def test_a_sweep_run_resumes_with_plain_densenet_train(data, tmp_path, monkeypatch, capsys):
    # the variant is a model name plus model_kwargs stored in the checkpoint, not a registered name
    out = tmp_path / "s"
    monkeypatch.setenv(TR.SIGTERM_AFTER_STEP_ENV, "1")
    stopped = sweep("compression", [0.25], settings(data, epochs=2), out, say=lambda _: None)
    assert stopped["stopped"] == "SIGTERM"
    monkeypatch.delenv(TR.SIGTERM_AFTER_STEP_ENV)
    run_dir = out / "compression-0.25"
    assert load_checkpoint(run_dir / "checkpoint-last.pt")["config"]["model_kwargs"] == {"compression": 0.25}
    assert main(["train", "--resume", str(run_dir)]) == 0
    capsys.readouterr()
    model, meta = load_model(run_dir)
    assert model.config["compression"] == 0.25 and meta["training"]["epochs_completed"] == 2
    assert load_checkpoint(run_dir / "checkpoint-last.pt")["global_step"] == 6


@pytest.mark.parametrize("argv,message", [
    (["--param", "growth_rate", "--values", "2", "--out-dir", "x"], "chooses --out-dir itself"),
    (["--param", "growth_rate", "--values", "2", "--resume", "auto"], "chooses --resume itself"),
    (["--param", "growth_rate", "--values", "2,a"], "--values must be numbers"),
    (["--param", "growth rate", "--values", "2"], "--param must be a model parameter name"),
    (["--values", "2"], "give the parameter and its values"),
    (["--param", "depth", "--values", "40", "--model", "densenet-bc-mini"], "--param depth needs"),
])
def test_bad_input_is_one_line(argv, message, capsys):
    assert main(["sweep", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("densenet sweep: error: ") and message in err and err.count("\n") == 1
