"""ResNet baselines (registry, counts, weights, training) and ``densenet compare`` against ``densenet analyze``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from densenet.cli import main
from densenet.models import count_parameters
from densenet.registry import create_model, describe_models, list_models, model_from_config
from densenet.resnet import ResNet
from densenet.weights import load_model, save_model
from helpers import channel_image_folder

PARAMS = {"resnet18-cifar": 11_173_962, "resnet34-cifar": 21_282_122, "resnet50-cifar": 23_520_842}
LAYERS = {"resnet18-cifar": ("basic", [2, 2, 2, 2]), "resnet34-cifar": ("basic", [3, 4, 6, 3]),
          "resnet50-cifar": ("bottleneck", [3, 4, 6, 3])}


def expected_macs(block: str, layers: list[int], classes: int = 10, size: int = 32) -> int:
    """Multiply-accumulates of a CIFAR ResNet from the layer formulas (H*W*Cout*Cin*kh*kw)."""
    side, channels = size, 64
    macs = side * side * 64 * 3 * 9
    for s, n in enumerate(layers):
        width = 64 * 2**s
        for i in range(n):
            stride = 2 if (i == 0 and s > 0) else 1
            out_side = side // stride
            if block == "basic":
                out = width
                macs += out_side**2 * width * channels * 9 + out_side**2 * width * width * 9
            else:
                out = 4 * width
                macs += side**2 * width * channels + out_side**2 * width * width * 9 + out_side**2 * out * width
            if stride != 1 or channels != out:
                macs += out_side**2 * out * channels
            channels, side = out, out_side
    return macs + channels * classes


@pytest.mark.parametrize("name", list(PARAMS))
def test_parameter_counts_and_macs(name, capsys):
    with torch.device("meta"):
        model = create_model(name)
    assert count_parameters(model) == PARAMS[name]
    assert main(["analyze", name, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["total"]["params"] == PARAMS[name]
    assert data["total"]["macs"] == expected_macs(*LAYERS[name])
    shapes = {r["stage"]: r["output_shape"] for r in data["stages"]}
    wide = 4 if LAYERS[name][0] == "bottleneck" else 1
    assert shapes == {"stem": [64, 32, 32], "layer1": [64 * wide, 32, 32], "layer2": [128 * wide, 16, 16],
                      "layer3": [256 * wide, 8, 8], "layer4": [512 * wide, 4, 4], "head": [10]}


def test_registered_everywhere():
    assert set(PARAMS) <= set(list_models())
    rows = {r["name"]: r for r in describe_models()}
    assert {n: rows[n]["params"] for n in PARAMS} == PARAMS and rows["resnet18-cifar"]["stem"] == "cifar"
    model = create_model("resnet18-cifar", num_classes=100)
    assert model.config == {"arch": "resnet", "name": "resnet18-cifar", "block": "basic", "layers": [2, 2, 2, 2],
                            "widths": [64, 128, 256, 512], "num_classes": 100, "stem_channels": 64, "stem": "cifar"}
    rebuilt = model_from_config(json.loads(json.dumps(model.config)))
    assert isinstance(rebuilt, ResNet) and rebuilt.state_dict().keys() == model.state_dict().keys()
    # torchvision's ResNet parameter names
    keys = model.state_dict().keys()
    assert {"conv1.weight", "bn1.running_mean", "layer2.0.downsample.0.weight", "layer4.1.conv2.weight",
            "fc.bias"} <= set(keys)
    assert "layer1.0.downsample.0.weight" not in keys  # identity shortcut where shapes agree


def test_bad_settings_are_config_errors(capsys):
    assert main(["analyze", "resnet18-cifar", "--num-classes", "0"]) == 2
    with pytest.raises(Exception, match="widths needs one positive width per stage"):
        create_model("resnet18-cifar", widths=[8, 8])
    with pytest.raises(Exception, match="cannot build 'resnet18-cifar'"):
        create_model("resnet18-cifar", drop_rate=0.2)


def test_weights_round_trip_gives_the_same_outputs(tmp_path):
    torch.manual_seed(0)
    model = create_model("resnet50-cifar", widths=[4, 8, 8, 8]).eval()
    with torch.no_grad():  # non-trivial batch-norm statistics
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    save_model(tmp_path / "w", model, {"classes": [str(i) for i in range(10)], "mean": [0.5] * 3, "std": [0.2] * 3})
    loaded, meta = load_model(tmp_path / "w")
    assert meta["config"]["arch"] == "resnet" and meta["config"]["widths"] == [4, 8, 8, 8]
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def make_image_folder(root: Path, per_class=(8, 4)) -> Path:
    return channel_image_folder(root, per_class, ("a", "b", "c"))


@pytest.fixture(scope="module")
def resnet_run(tmp_path_factory, module_cache):
    """``densenet train --model resnet18-cifar`` for one epoch of 24 tiny images."""
    tmp = tmp_path_factory.mktemp("resnet")
    data = make_image_folder(tmp / "data")
    assert main(["train", "--model", "resnet18-cifar", "--data-dir", str(data), "--epochs", "1",
                 "--batch-size", "8", "--lr", "0.01", "--schedule", "constant", "--device", "cpu",
                 "--out-dir", str(tmp / "run"), "--weights-dir", str(tmp / "w"), "--progress", "none"]) == 0
    return tmp / "run"


def test_train_resnet18_through_densenet_train(resnet_run):
    model, meta = load_model(resnet_run)
    assert isinstance(model, ResNet) and meta["config"]["name"] == "resnet18-cifar"
    assert count_parameters(model) == PARAMS["resnet18-cifar"] - 7 * 513  # 3 classes, not 10
    info = json.loads((resnet_run / "config.json").read_text())
    assert info["resolved"]["parameters"] == count_parameters(model) and info["resolved"]["steps_per_epoch"] == 3
    assert meta["training"]["finished"] and meta["training"]["final_test_acc"] is not None


def test_compare_matches_analyze_and_the_run(resnet_run, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "densenet-bc-10-4", "--run-dir", str(resnet_run), "--batch-size", "4", "--steps", "1",
                 "--device", "cpu", "--out", str(out), "--json"]) == 0
    rows = {r["model"]: r for r in json.loads(capsys.readouterr().out)}
    assert list(rows) == ["densenet-bc-10-4", "resnet18-cifar"]
    for name, argv in (("densenet-bc-10-4", []), ("resnet18-cifar", ["--num-classes", "3"])):
        assert main(["analyze", name, *argv, "--json"]) == 0
        total = json.loads(capsys.readouterr().out)["total"]
        assert (rows[name]["params"], rows[name]["macs"]) == (total["params"], total["macs"])
    meta = json.loads((resnet_run / "model.json").read_text())
    assert rows["resnet18-cifar"]["test_acc"] == meta["training"]["final_test_acc"]
    assert rows["densenet-bc-10-4"]["test_acc"] is None
    # inference is timed on the path densenet evaluate/predict take on the CPU
    assert (rows["densenet-bc-10-4"]["inference_model"], rows["resnet18-cifar"]["inference_model"]) == (
        "InferenceDenseNet", "ResNet")
    for row in rows.values():
        assert row["batch_size"] == 4 and row["device"] == "cpu" and row["steps"] == 1
        assert row["train_images_per_second"] > 0 and row["infer_images_per_second"] > 0
    # weights, gradients and momentum buffers alone are three copies of the fp32 parameters
    assert rows["resnet18-cifar"]["train_memory_mb"] > 3 * 4 * rows["resnet18-cifar"]["params"] / 2**20
    assert rows["resnet18-cifar"]["peak_rss_mb"] > rows["resnet18-cifar"]["baseline_rss_mb"]
    table = (out / "compare.md").read_text()
    # 3 classes: the 10-class count less 7 rows of the 512-feature classifier and 7 biases
    params, macs = PARAMS["resnet18-cifar"] - 7 * 512 - 7, expected_macs(*LAYERS["resnet18-cifar"], classes=3)
    assert f"| resnet18-cifar | {params:,} | {macs / 1e9:.3f} |" in table
    assert f"| {100 * meta['training']['final_test_acc']:.2f}% |" in table
    assert json.loads((out / "compare.json").read_text()) == list(rows.values())
    assert (out / "compare.png").stat().st_size > 10_000


@pytest.mark.parametrize("argv,message", [
    ([], "name at least one MODEL or --run-dir"),
    (["resnet19-cifar"], "unknown model 'resnet19-cifar'"),
    (["--run-dir", "{tmp}/nowhere"], "run directory not found"),
    (["densenet-bc-10-4", "--steps", "0"], "--batch-size and --steps must be positive"),
])
def test_compare_bad_input_is_one_line(tmp_path, capsys, argv, message):
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert main(["compare", *argv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("densenet compare: error: ") and message in err and err.count("\n") == 1
