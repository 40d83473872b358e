"""Weights on disk: round trips, the layouts load_model reads, and clear errors for bad files."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from densenet.errors import WeightsError
from densenet.files import atomic_write_bytes
from densenet.registry import create_model
from densenet.weights import (
    load_checkpoint,
    load_model,
    make_meta,
    save_checkpoint,
    save_model,
)

META = {"classes": [f"c{i}" for i in range(10)], "mean": [0.5, 0.4, 0.3], "std": [0.25, 0.24, 0.26],
        "input_size": 32, "training": {"note": "test"}}


def trained_like(name="densenet-bc-10-4", seed=0, channels_last=False):
    """A model with non-trivial parameters and BN statistics."""
    torch.manual_seed(seed)
    model = create_model(name, num_classes=10)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        model.train()
        model(torch.randn(8, 3, 32, 32))  # moves the BN running statistics
    return model.eval()


def same_outputs(a, b) -> bool:
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return torch.equal(a(x), b(x))


def test_round_trip_gives_identical_outputs(tmp_path):
    model = trained_like()
    save_model(tmp_path / "w", model, META)
    loaded, meta = load_model(tmp_path / "w")
    assert not loaded.training and loaded.meta is meta
    assert same_outputs(model, loaded)
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    stored = json.loads((tmp_path / "w" / "model.json").read_text())
    assert stored["format"] == "densenet-weights" and stored["format_version"] == 1
    assert stored["config"] == model.config and stored["classes"] == META["classes"]
    assert stored["mean"] == META["mean"] and stored["input_size"] == 32 and stored["training"] == {"note": "test"}
    assert len(stored["sha256"]) == 64


def test_channels_last_model_round_trip(tmp_path):
    model = trained_like(channels_last=True)
    save_model(tmp_path / "w", model, META)  # saved as contiguous NCHW tensors
    loaded, _ = load_model(tmp_path / "w")
    assert loaded.features.conv0.weight.is_contiguous()
    assert same_outputs(model, loaded.to(memory_format=torch.channels_last))


def test_lone_safetensors_file_and_json_path(tmp_path):
    model = trained_like()
    save_model(tmp_path / "w", model, META)
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(tmp_path / "w" / "model.safetensors", lone / "renamed.safetensors")
    loaded, meta = load_model(lone / "renamed.safetensors")  # description embedded in the header
    assert same_outputs(model, loaded) and meta["classes"] == META["classes"]
    loaded, _ = load_model(tmp_path / "w" / "model.json")
    assert same_outputs(model, loaded)


def test_weights_of_another_architecture(tmp_path):
    save_model(tmp_path / "w", trained_like("densenet-bc-10-4"), META)
    other = tmp_path / "other"
    save_model(other, trained_like("densenet-bc-16-4"), META)
    shutil.copy(tmp_path / "w" / "model.safetensors", other / "model.safetensors")
    meta = json.loads((other / "model.json").read_text())
    meta.pop("sha256")
    (other / "model.json").write_text(json.dumps(meta))
    with pytest.raises(WeightsError, match=r"weights do not fit the model: (missing key|shape mismatch)"):
        load_model(other)


def test_mismatched_pair_is_detected(tmp_path):
    save_model(tmp_path / "a", trained_like(seed=0), META)
    save_model(tmp_path / "b", trained_like(seed=1), META)
    shutil.copy(tmp_path / "b" / "model.safetensors", tmp_path / "a" / "model.safetensors")
    with pytest.raises(WeightsError, match="SHA-256 differs"):
        load_model(tmp_path / "a")


def test_corrupt_and_missing_files(tmp_path):
    save_model(tmp_path / "w", trained_like(), META)
    data = (tmp_path / "w" / "model.safetensors").read_bytes()
    (tmp_path / "w" / "model.json").unlink()
    (tmp_path / "w" / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="not a valid safetensors file"):
        load_model(tmp_path / "w")
    (tmp_path / "w" / "model.safetensors").write_bytes(b"\x00" * 3)
    with pytest.raises(WeightsError, match="not a valid safetensors file"):
        load_model(tmp_path / "w" / "model.safetensors")
    with pytest.raises(WeightsError, match="weights not found"):
        load_model(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="holds no model.safetensors"):
        load_model(tmp_path / "empty")
    save_model(tmp_path / "v", trained_like(), META)
    (tmp_path / "v" / "model.json").write_text("{not json")
    with pytest.raises(WeightsError, match="not valid JSON"):
        load_model(tmp_path / "v")
    (tmp_path / "v" / "model.json").write_text(json.dumps({"format": "densenet-weights", "format_version": 9}))
    with pytest.raises(WeightsError, match="newer than this package reads"):
        load_model(tmp_path / "v")


def checkpoint_for(model, ema=None) -> dict:
    return {"format": "densenet-checkpoint", "format_version": 1, "meta": make_meta(model, **META),
            "model": model.state_dict(), "ema": ema or {}, "epoch": 1}


def test_checkpoint_loads_and_prefers_ema_weights(tmp_path):
    model, averaged = trained_like(seed=0), trained_like(seed=1)
    save_checkpoint(tmp_path / "plain.pt", checkpoint_for(model))
    loaded, _ = load_model(tmp_path / "plain.pt")
    assert same_outputs(model, loaded)
    ema = {f"module.{k}": v for k, v in averaged.state_dict().items()}
    ema["n_averaged"] = torch.tensor(5)
    run = tmp_path / "run"
    save_checkpoint(run / "checkpoint-last.pt", checkpoint_for(model, ema))
    loaded, _ = load_model(run)  # a run directory without final weights: its checkpoint
    assert same_outputs(averaged, loaded)
    assert torch.load(run / "checkpoint-last.pt", weights_only=True)["epoch"] == 1


def test_plain_state_dicts_and_pickles_are_refused(tmp_path):
    torch.save(trained_like().state_dict(), tmp_path / "sd.pth")
    with pytest.raises(WeightsError, match="not a densenet training checkpoint"):
        load_model(tmp_path / "sd.pth")
    (tmp_path / "junk.pt").write_bytes(b"definitely not a checkpoint")
    with pytest.raises(WeightsError, match="not a readable checkpoint"):
        load_model(tmp_path / "junk.pt")


class _Payload:
    def __reduce__(self):
        return (os.mkdir, (str(Path(os.environ["DENSENET_TEST_PWNED"])),))


def test_malicious_pickle_is_never_executed(tmp_path, monkeypatch):
    target = tmp_path / "pwned"
    monkeypatch.setenv("DENSENET_TEST_PWNED", str(target))
    torch.save({"format": "densenet-checkpoint", "model": _Payload()}, tmp_path / "evil.pt")
    assert not target.exists()
    with pytest.raises(WeightsError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not target.exists()


def test_atomic_write_keeps_the_old_file_when_replacing_fails(tmp_path, monkeypatch):
    path = tmp_path / "file.bin"
    atomic_write_bytes(path, b"old")

    def broken_replace(src, dst):
        raise OSError(5, "I/O error")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]


def test_save_needs_classes_and_stats(tmp_path):
    with pytest.raises(WeightsError, match="meta lacks classes"):
        save_model(tmp_path / "w", trained_like(), {"mean": [0, 0, 0], "std": [1, 1, 1]})
