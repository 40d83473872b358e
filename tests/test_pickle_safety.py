"""Files that would run code when unpickled are refused without running it.

Every payload here really is live: a control loads it with a plain ``pickle.loads`` or
``torch.load(weights_only=False)`` and sees its side effect (a file or directory appearing). The
same bytes are then handed to every entry point of the package that reads pickles -- the CIFAR
python-format reader, checkpoint loading, ``load_model`` and the subcommands -- which must refuse
them with the package's own error and leave no trace of the side effect.
"""

from __future__ import annotations

import json
import os
import pickle
import shlex
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from densenet import cli
from densenet.data import load_dataset
from densenet.errors import DataError, WeightsError
from densenet.weights import load_checkpoint, load_model
from helpers import add_to_reliability_summary

pytestmark = pytest.mark.filterwarnings("ignore:.*differs from the official")

# refusals per entry point, added to $DENSENET_RELIABILITY_JSON (when set) at the end of the module
STATS: Counter = Counter()


@pytest.fixture(scope="module", autouse=True)
def _summary():
    yield
    add_to_reliability_summary("pickle safety", dict(STATS))

C10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


class Call:
    """Pickles as the call ``func(*args)``: what a malicious file hides among its data."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args

    def __call__(self, *args):  # pickle wants a callable first item, even one that is itself a call
        raise AssertionError("only ever unpickled")


def _runstring():
    from numpy.testing._private.utils import runstring  # runs a string of code: a gadget inside numpy

    return runstring


def payloads(marker: Path) -> dict[str, Call]:
    """Payloads that create ``marker`` when unpickled, each through a different route."""
    m = str(marker)
    create = f"open({m!r}, 'w').close()"
    return {
        "os.mkdir": Call(os.mkdir, m),
        "os.system": Call(os.system, f"touch {shlex.quote(m)}"),
        "builtins.exec": Call(exec, create),
        "subprocess.call": Call(subprocess.call, ["touch", m]),
        "getattr(__import__('os'), 'mkdir')": Call(Call(getattr, Call(__import__, "os"), "mkdir"), m),
        "numpy runstring": Call(_runstring(), create, {}),
    }


PAYLOADS = list(payloads(Path("x")))


def _marker(tmp_path: Path) -> Path:
    marker = tmp_path / "pwned"
    assert not marker.exists()
    return marker


# --- the payloads are live ---------------------------------------------------------------------


@pytest.mark.parametrize("name", PAYLOADS)
def test_controls_payloads_do_run_under_plain_pickle_and_torch_load(tmp_path, name):
    marker = tmp_path / "control"
    raw = pickle.dumps({b"data": payloads(marker)[name]}, protocol=2)
    pickle.loads(raw)
    assert marker.exists(), "the payload is not live, so the tests below would prove nothing"
    marker.unlink() if marker.is_file() else marker.rmdir()
    torch.save({"model": payloads(marker)[name]}, tmp_path / "evil.pt")
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()
    STATS["payload routes shown live (plain pickle and torch.load)"] += 1


# --- CIFAR python-format pickles -----------------------------------------------------------------


def write_cifar10_python(root: Path) -> Path:
    """A tiny, valid CIFAR-10 python-format directory (2 images per batch)."""
    rng = np.random.default_rng(0)
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        entry = {b"batch_label": name.encode(), b"labels": [1, 7],
                 b"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8), b"filenames": [b"a.png", b"b.png"]}
        (d / name).write_bytes(pickle.dumps(entry, protocol=2))
    meta = {b"num_cases_per_batch": 2, b"label_names": [c.encode() for c in C10], b"num_vis": 3072}
    (d / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return d


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
@pytest.mark.parametrize("name", PAYLOADS)
def test_cifar_pickle_payloads_are_refused_unexecuted(tmp_path, name, protocol):
    marker = _marker(tmp_path)
    d = write_cifar10_python(tmp_path / "data")
    assert len(load_dataset(tmp_path / "data")) == 10  # the clean copy loads
    evil = payloads(marker)[name]
    placements = {
        "data_batch_3": {b"data": evil, b"labels": [0]},
        "test_batch": {b"labels": [0, evil], b"data": np.zeros((2, 3072), np.uint8)},  # hidden in a list
        "batches.meta": {b"label_names": [b"cat", evil]},
    }
    for file, entry in placements.items():
        clean = (d / file).read_bytes()
        (d / file).write_bytes(pickle.dumps(entry, protocol=protocol))
        split = "test" if file == "test_batch" else "train"
        with pytest.raises(DataError, match=rf"{file} is not a valid CIFAR file \(global '.*' is not allowed"):
            load_dataset(tmp_path / "data", split=split)
        assert not marker.exists(), (file, name, protocol)
        (d / file).write_bytes(clean)
        STATS["CIFAR pickles refused unexecuted"] += 1


def test_cifar_pickle_refusal_through_the_command_line(tmp_path, capsys):
    marker = _marker(tmp_path)
    d = write_cifar10_python(tmp_path / "data")
    (d / "data_batch_1").write_bytes(pickle.dumps({b"data": payloads(marker)["os.system"], b"labels": [0]}))
    argv = ["train", "--data-dir", str(tmp_path / "data"), "--model", "densenet-bc-10-4", "--epochs", "1",
            "--batch-size", "2", "--out-dir", str(tmp_path / "run"), "--weights-dir", str(tmp_path / "w"),
            "--device", "cpu", "--progress", "none"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "data_batch_1 is not a valid CIFAR file (global 'posix.system' is not allowed" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not marker.exists()


def test_persistent_ids_and_other_namespaces_are_refused(tmp_path):
    marker = _marker(tmp_path)
    d = write_cifar10_python(tmp_path / "data")

    class PersistentPickler(pickle.Pickler):
        def persistent_id(self, obj):
            return "ref" if isinstance(obj, str) and obj == "x" else None

    import io

    buffer = io.BytesIO()
    PersistentPickler(buffer, protocol=2).dump({b"data": "x", b"labels": [0]})
    (d / "data_batch_2").write_bytes(buffer.getvalue())
    with pytest.raises(DataError, match="persistent references are not allowed"):
        load_dataset(tmp_path / "data")
    # a global from an allowed package that is not one of the admitted functions
    (d / "data_batch_2").write_bytes(pickle.dumps({b"data": Call(np.save, str(marker), np.zeros(1))}))
    with pytest.raises(DataError, match="global 'numpy.*save' is not allowed"):
        load_dataset(tmp_path / "data")
    assert not marker.exists() and not Path(str(marker) + ".npy").exists()


# --- checkpoints ---------------------------------------------------------------------------------


def _evil_checkpoint(path: Path, payload, legacy: bool = False) -> Path:
    """A file that looks like a densenet checkpoint with a payload among the weights."""
    obj = {"format": "densenet-checkpoint", "format_version": 1, "epoch": 1,
           "model": {"features.conv0.weight": torch.zeros(2), "evil": payload}}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return path


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("name", PAYLOADS)
def test_checkpoint_payloads_are_refused_unexecuted(tmp_path, name, legacy):
    marker = _marker(tmp_path)
    evil = _evil_checkpoint(tmp_path / "run" / "checkpoint-last.pt", payloads(marker)[name], legacy)
    with pytest.raises(WeightsError, match=r"checkpoint-last.pt is not a readable checkpoint \(.*"):
        load_checkpoint(evil)
    with pytest.raises(WeightsError, match="checkpoint-last.pt is not a readable checkpoint"):
        load_model(evil)
    with pytest.raises(WeightsError, match="checkpoint-last.pt is not a readable checkpoint"):
        load_model(evil.parent)  # a run directory: its checkpoint is what gets loaded
    assert not marker.exists()
    STATS["checkpoints refused unexecuted (3 entry points each)"] += 1


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_plain_pickle_named_like_a_checkpoint_is_refused(tmp_path):
    marker = _marker(tmp_path)
    path = tmp_path / "model.pt"
    path.write_bytes(pickle.dumps({"format": "densenet-checkpoint", "model": payloads(marker)["os.mkdir"]}))
    with pytest.raises(WeightsError, match="model.pt is not a readable checkpoint"):
        load_model(path)
    assert not marker.exists()


def _commands(evil: Path, tmp_path: Path) -> dict[str, list[str]]:
    image = tmp_path / "img.png"
    if not image.exists():
        from PIL import Image

        Image.new("RGB", (32, 32), (10, 20, 30)).save(image)
    train = ["train", "--model", "densenet-bc-10-4", "--device", "cpu", "--progress", "none",
             "--data-dir", str(tmp_path / "nodata"), "--weights-dir", str(tmp_path / "w")]
    commands = {
        "evaluate": ["evaluate", "--weights", str(evil), "--data-dir", str(tmp_path / "nodata"), "--device", "cpu"],
        "predict": ["predict", "--weights", str(evil), str(image), "--device", "cpu"],
        "analyze": ["analyze", "--weights", str(evil)],
        "export": ["export", "--weights", str(evil), "--out", str(tmp_path / "m.onnx")],
        "train --resume PATH": train + ["--resume", str(evil)],
        "train --resume RUN_DIR": train + ["--resume", str(evil.parent)],
        "train --resume auto --out-dir": train + ["--resume", "auto", "--out-dir", str(evil.parent)],
        "report": ["report", str(evil.parent), "--out", str(tmp_path / "r.html")],
    }
    return commands


@pytest.mark.parametrize("command", ["evaluate", "predict", "analyze", "export", "train --resume PATH",
                                     "train --resume RUN_DIR", "train --resume auto --out-dir", "report"])
def test_every_command_refuses_a_malicious_checkpoint(tmp_path, capsys, command):
    marker = _marker(tmp_path)
    evil = _evil_checkpoint(tmp_path / "run" / "checkpoint-last.pt", payloads(marker)["builtins.exec"])
    commands = _commands(evil, tmp_path)
    if command == "report":  # a report notes the unreadable weights in the page and goes on
        info = {"config": {"model": "densenet-bc-10-4"}, "resolved": {"model_config": {"arch": "densenet"}}}
        (evil.parent / "config.json").write_text(json.dumps(info))
        assert cli.main(commands[command]) == 0
        assert "checkpoint-last.pt is not a readable checkpoint" in (tmp_path / "r.html").read_text()
        assert "Traceback" not in capsys.readouterr().err
    else:
        code = cli.main(commands[command])
        err = capsys.readouterr().err
        assert code == 2, err
        assert "checkpoint-last.pt is not a readable checkpoint" in err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not marker.exists()
    STATS["commands refusing a malicious checkpoint"] += 1


def test_resume_auto_skips_malicious_runs_without_executing_them(tmp_path, monkeypatch, capsys):
    """Without --out-dir, --resume auto scans runs/<model>-*; an unreadable checkpoint is skipped."""
    marker = _marker(tmp_path)
    monkeypatch.chdir(tmp_path)
    _evil_checkpoint(tmp_path / "runs" / "densenet-bc-10-4-20240101-000000" / "checkpoint-last.pt",
                     payloads(marker)["os.mkdir"])
    argv = ["train", "--model", "densenet-bc-10-4", "--resume", "auto", "--device", "cpu", "--progress", "none",
            "--data-dir", str(tmp_path / "nodata"), "--weights-dir", str(tmp_path / "w")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "nodata does not exist" in err and "Traceback" not in err  # it started afresh, then found no data
    assert "warning: --resume auto skips runs/densenet-bc-10-4-20240101-000000: " in err  # and said why
    assert not marker.exists()


# --- the decoded-image cache ---------------------------------------------------------------------


def test_a_pickled_object_array_in_the_image_cache_is_not_loaded(tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.setenv("DENSENET_CACHE", str(tmp_path / "cache"))
    for split in ("train", "test"):
        for cls in ("a", "b"):
            folder = tmp_path / "data" / split / cls
            folder.mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (32, 32), (40 * i, 100 if cls == "a" else 200, 7)).save(folder / f"{i}.png")
    clean = load_dataset(tmp_path / "data", split="test")
    (cached,) = (tmp_path / "cache").glob("folder-test-*.npy")
    marker = _marker(tmp_path)
    evil = np.empty(4, dtype=object)
    evil[:] = [payloads(marker)["os.mkdir"]] * 4
    np.save(cached, evil, allow_pickle=True)
    again = load_dataset(tmp_path / "data", split="test")  # the cache is not trusted; images decoded again
    assert torch.equal(again.images, clean.images)
    assert not marker.exists()
    assert np.load(cached, allow_pickle=False).shape == (4, 3, 32, 32)  # and the cache was rewritten
