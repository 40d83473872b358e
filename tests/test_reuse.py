"""Feature-reuse maps (``densenet analyze --weights PATH --feature-reuse``) on hand-set weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from densenet.cli import main
from densenet.models import DenseNet
from densenet.registry import create_model
from densenet.reuse import feature_reuse
from densenet.weights import save_model


def set_slices(weight: torch.Tensor, bounds: list[int], values) -> None:
    """Fill input-channel slice s of ``weight`` with +-values[s] (alternating signs, so |.| matters)."""
    with torch.no_grad():
        for s, value in enumerate(values):
            piece = weight[:, bounds[s]:bounds[s + 1]]
            signs = torch.ones_like(piece)
            signs.view(-1)[::2] = -1
            piece.copy_(signs * value)


def test_bottleneck_block_read_by_the_classifier():
    # one block: input 4 channels, k=2, 3 bottleneck layers; the classifier reads 4 + 3*2 = 10 channels
    model = DenseNet(growth_rate=2, block_config=[3], num_init_features=4, bn_size=2, num_classes=3, stem="cifar")
    bounds = [0, 4, 6, 8, 10]
    layers = list(model.features.denseblock1.children())
    for target, layer in enumerate(layers, start=1):
        assert layer.conv1.weight.shape[:2] == (4, 4 + 2 * (target - 1))  # bn_size*k outputs
        set_slices(layer.conv1.weight, bounds, [10 * target + s for s in range(target)])
    set_slices(model.classifier.weight, bounds, [1.0, 2.0, 3.0, 4.0])

    block = feature_reuse(model)["blocks"][0]
    assert block["block"] == "denseblock1" and block["consumer"] == "classifier"
    assert (block["layers"], block["input_channels"], block["growth_rate"], block["bottleneck"]) == (3, 4, 2, True)
    assert block["sources"] == ["input", "1", "2", "3"] and block["targets"] == ["1", "2", "3", "classifier"]
    assert block["raw"] == [
        [10.0, 20.0, 30.0, 1.0],
        [None, 21.0, 31.0, 2.0],
        [None, None, 32.0, 3.0],
        [None, None, None, 4.0],
    ]
    expected = [
        [1.0, 20 / 21, 30 / 32, 0.25],
        [None, 1.0, 31 / 32, 0.5],
        [None, None, 1.0, 0.75],
        [None, None, None, 1.0],
    ]
    for got_row, want_row in zip(block["normalized"], expected):
        assert got_row == [None if w is None else pytest.approx(w) for w in want_row]


def test_basic_layers_and_transition_consumer():
    # blocks of 2 basic layers, k=3: block 1 reads 5 channels and outputs 11, the transition keeps 5
    model = DenseNet(growth_rate=3, block_config=[2, 2], num_init_features=5, bn_size=0, compression=0.5,
                     num_classes=4, stem="cifar")
    torch.manual_seed(0)
    data = feature_reuse(model)
    first, second = data["blocks"]
    assert (first["consumer"], second["consumer"]) == ("transition1", "classifier")
    assert (first["bottleneck"], first["growth_rate"], second["input_channels"]) == (False, 3, 5)
    # a basic layer's first convolution is its 3x3: the mean runs over the kernel too
    conv = model.features.denseblock1.denselayer2.conv1.weight
    assert conv.shape == (3, 8, 3, 3)
    with torch.no_grad():
        conv.zero_()
        conv[:, :5] = 0.5  # the block input
        conv[0, 5:8, 1, 1] = -2.7  # layer 1's output: one cell per (output, kernel) row of 3x3x3 x 3
    transition = model.features.transition1.conv.weight  # 5 x 11 x 1 x 1
    with torch.no_grad():
        transition.fill_(1.0)
        transition[:, 8:11] = 4.0
    first = feature_reuse(model)["blocks"][0]
    layer1_mean = 3 * 2.7 / (3 * 3 * 9)
    assert first["raw"][0][1] == pytest.approx(0.5) and first["raw"][1][1] == pytest.approx(layer1_mean)
    assert first["normalized"][1][1] == pytest.approx(layer1_mean / 0.5)
    assert [row[2] for row in first["raw"]] == [1.0, 1.0, 4.0]
    assert [row[2] for row in first["normalized"]] == [0.25, 0.25, 1.0]
    assert all(first["normalized"][s][t] is None for t in range(2) for s in range(t + 1, 3))


def test_every_column_peaks_at_one_on_a_real_model():
    torch.manual_seed(1)
    data = feature_reuse(create_model("densenet-bc-mini"))
    assert [b["layers"] for b in data["blocks"]] == [6, 12, 8]
    for block in data["blocks"]:
        columns = list(zip(*block["normalized"]))
        assert len(columns) == block["layers"] + 1
        for t, column in enumerate(columns):
            values = [v for v in column if v is not None]
            assert len(values) == (t + 1 if t < block["layers"] else block["layers"] + 1)
            assert max(values) == pytest.approx(1.0) and min(values) > 0


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(2)
    model = create_model("densenet-bc-10-4")
    save_model(tmp_path / "w", model, {"classes": list("abcdefghij"), "mean": [0.5] * 3, "std": [0.25] * 3})
    return model, tmp_path / "w"


def test_cli_writes_json_and_png(saved, tmp_path, capsys):
    model, weights = saved
    assert main(["analyze", "--weights", str(weights), "--feature-reuse", "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "denseblock1: 1 bottleneck layer, 8 input channels, k=4, read by transition1" in out
    written = json.loads((tmp_path / "o" / "feature_reuse.json").read_text())
    expected = feature_reuse(model)
    assert [b["normalized"] for b in written["blocks"]] == [b["normalized"] for b in expected["blocks"]]
    assert [b["consumer"] for b in written["blocks"]] == ["transition1", "transition2", "classifier"]
    picture = np.asarray(Image.open(tmp_path / "o" / "feature_reuse.png").convert("RGB"))
    assert picture.shape[1] > 1000 and picture.std() > 10  # three panels with colours, not a blank page


def test_cli_default_out_is_beside_the_weights_and_plain_analysis(saved, capsys):
    model, weights = saved
    assert main(["analyze", "--weights", str(weights), "--feature-reuse", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["files"] == [str(weights / "feature_reuse.json"), str(weights / "feature_reuse.png")]
    assert (weights / "feature_reuse.png").is_file()
    # --weights without --feature-reuse analyses the trained model like the registry name does
    assert main(["analyze", "--weights", str(weights), "--json"]) == 0
    from_weights = json.loads(capsys.readouterr().out)
    assert main(["analyze", "densenet-bc-10-4", "--json"]) == 0
    from_name = json.loads(capsys.readouterr().out)
    assert from_weights["total"] == from_name["total"] and from_weights["stages"] == from_name["stages"]


@pytest.mark.parametrize("argv,message", [
    (["--feature-reuse"], "--feature-reuse needs trained weights: add --weights PATH"),
    (["densenet-bc-mini", "--weights", "{w}"], "either a MODEL name or --weights"),
    (["--weights", "{tmp}/nowhere", "--feature-reuse"], "weights not found"),
    (["--weights", "{r}", "--feature-reuse"], "feature reuse needs a DenseNet; resnet18-cifar is a resnet"),
])
def test_bad_input_is_one_line(saved, tmp_path, capsys, argv, message):
    _, weights = saved
    resnet = create_model("resnet18-cifar", widths=[4, 4, 4, 4])
    save_model(tmp_path / "r", resnet, {"classes": list("abcdefghij"), "mean": [0.5] * 3, "std": [0.25] * 3})
    argv = [a.format(w=weights, r=tmp_path / "r", tmp=tmp_path) for a in argv]
    assert main(["analyze", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("densenet analyze: error: ") and message in err and err.count("\n") == 1
