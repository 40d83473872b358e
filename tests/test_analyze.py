"""Tests of ``densenet analyze`` and :func:`densenet.analysis.analyze_model`."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from densenet.analysis import analyze_model
from densenet.cli import main
from densenet.registry import create_model

CIFAR121_SHAPES = {
    "stem": [64, 32, 32],
    "denseblock1": [256, 32, 32],
    "transition1": [128, 16, 16],
    "denseblock2": [512, 16, 16],
    "transition2": [256, 8, 8],
    "denseblock3": [1024, 8, 8],
    "transition3": [512, 4, 4],
    "denseblock4": [1024, 4, 4],
    "head": [10],
}


def expected_macs(k, blocks, init, size, classes, bn_size=4, theta=0.5, stem_stride=1):
    """Multiply-accumulates of a CIFAR-stem DenseNet, from the layer formulas (H*W*Cout*Cin*kh*kw)."""
    side = size // stem_stride
    macs = side * side * init * 3 * 9
    channels = init
    for b, n in enumerate(blocks):
        for i in range(n):
            cin = channels + i * k
            if bn_size:
                macs += side * side * (bn_size * k * cin + k * bn_size * k * 9)
            else:
                macs += side * side * k * cin * 9
        channels += n * k
        if b < len(blocks) - 1:
            out = int(theta * channels)
            macs += side * side * out * channels
            channels, side = out, side // 2
    return macs + channels * classes


def analyze_json(capsys, *args):
    assert main(["analyze", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_densenet121_cifar_json(capsys):
    data = analyze_json(capsys, "densenet121-cifar")
    assert data["model"] == "densenet121-cifar" and data["input_shape"] == [3, 32, 32]
    assert {r["stage"]: r["output_shape"] for r in data["stages"]} == CIFAR121_SHAPES
    assert data["total"]["params"] == 6_956_298
    assert sum(r["params"] for r in data["stages"]) == 6_956_298
    assert data["total"]["macs"] == expected_macs(32, (6, 12, 24, 16), 64, 32, 10) == 888_350_720
    assert data["total"]["flops"] == 2 * data["total"]["macs"]
    assert sum(r["macs"] for r in data["stages"]) == data["total"]["macs"]
    stages = {r["stage"]: r for r in data["stages"]}
    assert stages["stem"]["macs"] == 32 * 32 * 64 * 3 * 9 and stages["stem"]["params"] == 64 * 3 * 9
    assert stages["head"]["macs"] == 1024 * 10 and stages["head"]["params"] == 2 * 1024 + 1024 * 10 + 10
    # L(L+1)/2 per block: 21 + 78 + 300 + 136
    assert data["connections_per_block"] == [21, 78, 300, 136] and data["connections"] == 535
    assert data["depth"] == 121
    assert data["weight_size_mb"] == pytest.approx(6_956_298 * 4 / 1e6)
    assert "multiply-accumulates" in data["note"]


def test_densenet121_cifar_text(capsys):
    assert main(["analyze", "densenet121-cifar"]) == 0
    out = capsys.readouterr().out
    for stage, shape in CIFAR121_SHAPES.items():
        line = next(x for x in out.splitlines() if x.startswith(stage + " "))
        assert "x".join(map(str, shape)) in line.split()
    assert "6,956,298" in out and "888,350,720" in out and "0.888 G" in out
    assert "dense connections:  535 (21 + 78 + 300 + 136" in out
    assert "27.8 MB" in out and "FLOPs = 2 x MACs" in out


def test_paper_model_and_torchvision_figures(capsys):
    bc = analyze_json(capsys, "densenet-bc-100-12")
    assert bc["total"]["params"] == 769_162
    assert bc["total"]["macs"] == expected_macs(12, (16, 16, 16), 24, 32, 10) == 287_929_692
    assert bc["connections"] == 3 * 136 and bc["depth"] == 100
    # torchvision publishes 2.834 "GFLOPS" (multiply-accumulates) for densenet121 at 224x224
    tv = analyze_json(capsys, "densenet121")
    assert tv["input_shape"] == [3, 224, 224]
    assert round(tv["total"]["macs"] / 1e9, 3) == 2.834
    assert tv["stages"][0]["output_shape"] == [64, 56, 56] and tv["stages"][-1]["output_shape"] == [1000]
    basic = analyze_json(capsys, "densenet-40-12")
    assert basic["total"]["macs"] == expected_macs(12, (12, 12, 12), 16, 32, 10, bn_size=0, theta=1.0)
    assert basic["depth"] == 40


def test_options_change_the_analysis(capsys):
    data = analyze_json(capsys, "densenet-bc-mini", "--num-classes", "100", "--input-size", "64")
    assert data["input_shape"] == [3, 64, 64]
    assert data["stages"][0]["output_shape"] == [24, 32, 32] and data["stages"][-1]["output_shape"] == [100]
    assert data["total"]["macs"] == expected_macs(12, (6, 12, 8), 24, 64, 100, stem_stride=2)
    assert data["total"]["params"] == 303_658 + 90 * 193


def test_real_model_gives_the_same_numbers_and_keeps_its_mode():
    model = create_model("densenet-bc-mini").train()
    data = analyze_model(model)
    assert model.training
    assert data["total"]["macs"] == expected_macs(12, (6, 12, 8), 24, 32, 10, stem_stride=2)
    assert data["total"]["params"] == 303_658


def test_models_without_stages_are_analyzed_by_children():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))
    data = analyze_model(model, input_size=4)
    assert [r["stage"] for r in data["stages"]] == ["0", "1", "2", "3"]
    assert data["total"]["macs"] == 4 * 4 * 8 * 27 + 128 * 5
    assert data["connections"] == 0 and data["model"] == "Sequential"


def test_list_models(capsys):
    for argv in (["analyze", "--list"], ["analyze"]):
        assert main(argv) == 0
        out = capsys.readouterr().out
        assert "densenet121-cifar" in out and "6,956,298" in out and "densenet-bc-mini" in out
        assert "33,337,704" in out
    rows = analyze_json(capsys, "--list")
    assert {r["name"]: r["params"] for r in rows}["densenet-bc-100-12"] == 769_162


@pytest.mark.parametrize("argv,message", [
    (["densenet12-cifar"], "unknown model 'densenet12-cifar'; did you mean densenet121-cifar"),
    (["densenet121", "--input-size", "16"], "input size 16 does not work for densenet121"),
    (["densenet121", "--input-size", "0"], "--input-size must be positive"),
    (["densenet-bc-mini", "--num-classes", "0"], "--num-classes must be at least 1"),
    (["densenet-bc-99-12"], "depth must be 6n+4"),
])
def test_bad_input_is_one_line_exit_2(capsys, argv, message):
    assert main(["analyze", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("densenet analyze: error: ") and message in captured.err
    assert captured.err.count("\n") == 1


def test_analysis_does_not_touch_weights():
    torch.manual_seed(0)
    model = create_model("densenet-bc-mini")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    analyze_model(model)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
