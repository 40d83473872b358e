"""benchmarks/plain_net.py: the fast CIFAR trainers' plain network as a yardstick under `densenet train`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from densenet.registry import create_model
from helpers import coloured_image_folder

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import plain_net  # noqa: E402  (registers plain-cifar)


def macs(model: torch.nn.Module) -> float:
    with FlopCounterMode(display=False) as counter:
        model.eval()(torch.zeros(1, 3, 32, 32))
    return counter.get_total_flops() / 2


def test_shape_parameters_and_cost_match_the_dense_network_it_is_set_against():
    model = create_model("plain-cifar", num_classes=10)
    assert sum(p.numel() for p in model.parameters()) == 1_991_218
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert model(torch.randn(2, 3, 24, 24)).shape == (2, 10)  # progressive resizing's smaller batches
    dense = create_model("densenet-cpu-m4", num_classes=10, activation="gelu", transition_pool="max")
    assert macs(model) == 165_466_624
    assert 1.0 < macs(model) / macs(dense) < 1.05  # "about as many multiply-adds" (docstring)
    # the stem is the 54-channel 3x3 conv that --whiten fills; BN weights frozen, biases trained
    assert tuple(model.features.conv0.weight.shape) == (plain_net.STEM_CHANNELS, 3, 3, 3)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == 6 and all(not n.weight.requires_grad and n.bias.requires_grad for n in norms)
    # Dirac initialisation: the first in_channels filters of a convolution pass their input through
    conv = model.features.group2.conv2
    x = torch.randn(1, 256, 8, 8)
    assert torch.allclose(torch.nn.functional.conv2d(x, conv.weight, padding=1), x, atol=1e-6)


def test_the_command_line_trains_and_evaluates_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DENSENET_CACHE", str(tmp_path / "cache"))
    data = coloured_image_folder(tmp_path / "data", (32, 8))
    weights = tmp_path / "weights"
    assert plain_net.main(["train", "--model", "plain-cifar", "--data-dir", str(data), "--whiten",
                           "--optimizer", "muon", "--epochs", "3", "--batch-size", "16", "--lr", "0.05",
                           "--out-dir", str(tmp_path / "run"), "--weights-dir", str(weights),
                           "--device", "cpu", "--threads", "1", "--progress", "none", "--amp", "none"]) == 0
    config = json.loads((weights / "model.json").read_text())
    assert config["config"]["arch"] == "plain" and config["config"]["widths"] == [64, 256, 256]
    capsys.readouterr()
    assert plain_net.main(["evaluate", "--weights", str(weights), "--data-dir", str(data), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["num_samples"] == 24 and result["top1"] >= 0.9  # the colour classes are easy to learn


def test_densenet_recipe_keywords_are_ignored():
    model = create_model("plain-cifar", activation="gelu", transition_pool="max")
    assert isinstance(model, plain_net.PlainNet)
    with pytest.raises(TypeError):
        plain_net.PlainNet(activation="gelu")
