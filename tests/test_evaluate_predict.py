"""evaluate and predict, end to end on a small model trained for two epochs on a synthetic folder."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from densenet import cli
from densenet.data import load_dataset
from densenet.errors import DataError, ImageError
from densenet.inference import align_classes, evaluate
from densenet.predict import predict
from densenet.trainer import train
from densenet.weights import load_model
from helpers import coloured_image_folder

CLASSES = ("blue", "green", "red")


def make_image_folder(root: Path, per_class=(32, 10), seed=0) -> Path:
    return coloured_image_folder(root, per_class, seed)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(data dir, weights dir, run dir) of a densenet-bc-10-4 trained for 2 epochs."""
    import os

    base = tmp_path_factory.mktemp("evalpred")
    old = os.environ.get("DENSENET_CACHE")
    os.environ["DENSENET_CACHE"] = str(base / "cache")
    try:
        data = make_image_folder(base / "data")
        train(model="densenet-bc-10-4", data_dir=str(data), epochs=2, batch_size=16, lr=0.05,
              schedule="cosine", out_dir=str(base / "run"), weights_dir=str(base / "w"), device="cpu",
              progress="none", threads=1)
        yield data, base / "w", base / "run"
    finally:
        if old is None:
            os.environ.pop("DENSENET_CACHE", None)
        else:
            os.environ["DENSENET_CACHE"] = old


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DENSENET_CACHE", str(tmp_path / "cache"))


def reference_logits(model, dataset, meta, flip=False):
    mean = torch.tensor(meta["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(meta["std"]).view(1, 3, 1, 1)
    x = (dataset.images.float() / 255 - mean) / std
    with torch.no_grad():
        logits = model(x)
        if flip:
            logits = 0.5 * (logits + model(x.flip(3)))
    return logits


@pytest.mark.parametrize("tta", [False, True])
def test_evaluate_matches_a_direct_computation(trained, tta):
    data, weights, _ = trained
    model, meta = load_model(weights)
    test = load_dataset(data, split="test")
    result = evaluate(model, test, batch_size=7, tta=tta)
    logits = reference_logits(model, test, meta, flip=tta)
    assert result["num_samples"] == 30 and result["tta"] is tta
    assert result["loss"] == pytest.approx(F.cross_entropy(logits, test.labels).item(), rel=1e-4)
    predicted = logits.argmax(1)
    assert result["top1"] == pytest.approx((predicted == test.labels).float().mean().item())
    assert result["top5"] == 1.0  # 3 classes
    # the image alone, also under TTA (its first view): exactly what a plain evaluation reports
    assert result["single_view_top1"] == (evaluate(model, test, batch_size=7)["top1"] if tta else result["top1"])
    assert result["single_view_top1"] == pytest.approx((reference_logits(model, test, meta, flip=False).argmax(1)
                                                        == test.labels).float().mean().item())
    matrix = torch.tensor(result["confusion"])
    expected = torch.bincount(test.labels * 3 + predicted, minlength=9).view(3, 3)
    assert torch.equal(matrix, expected)
    assert [row["total"] for row in result["per_class"]] == [10, 10, 10]
    assert sum(row["correct"] for row in result["per_class"]) == round(result["top1"] * 30)
    assert result["top1"] > 0.5  # two epochs on coloured noise learn something (chance: 1/3)


def test_translation_tta_averages_six_views(trained):
    """--tta-translate: half the mirror pair, half the mirror pairs of the image moved one pixel each
    way along the diagonal (edges reflected), against a reference built with numpy's padding."""
    data, weights, _ = trained
    model, meta = load_model(weights)
    test = load_dataset(data, split="test")
    mean = np.array(meta["mean"], dtype=np.float32).reshape(1, 3, 1, 1)
    std = np.array(meta["std"], dtype=np.float32).reshape(1, 3, 1, 1)
    x = (test.images.numpy().astype(np.float32) / 255 - mean) / std
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="reflect")
    down_right, up_left = padded[:, :, :-2, :-2], padded[:, :, 2:, 2:]
    assert np.array_equal(down_right[:, :, 1:, 1:], x[:, :, :-1, :-1])  # the content moved by one pixel
    with torch.no_grad():
        pair = [0.5 * (model(v) + model(v.flip(3))) for v in map(torch.from_numpy, (x, down_right.copy(), up_left.copy()))]
    logits = 0.5 * pair[0] + 0.25 * (pair[1] + pair[2])
    result = evaluate(model, test, batch_size=7, tta_translate=True)
    assert result["tta"] is True and result["tta_translate"] is True
    assert result["loss"] == pytest.approx(F.cross_entropy(logits, test.labels).item(), rel=1e-4)
    predicted = logits.argmax(1)
    expected = torch.bincount(test.labels * 3 + predicted, minlength=9).view(3, 3)
    assert torch.equal(torch.tensor(result["confusion"]), expected)
    # the mirror pair alone differs from it (the moved views count)
    assert result["loss"] != pytest.approx(evaluate(model, test, batch_size=7, tta=True)["loss"], rel=1e-6)


def test_evaluate_cli_json_and_files(trained, tmp_path, capsys):
    data, weights, run = trained
    out = tmp_path / "out"
    assert cli.main(["evaluate", "--weights-dir", str(run), "--data-dir", str(data), "--json", "--out", str(out)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) >= {"num_samples", "loss", "top1", "top5", "per_class", "confusion", "classes", "split"}
    assert sum(row["total"] for row in result["per_class"]) == result["num_samples"] == 30
    assert sum(map(sum, result["confusion"])) == 30
    assert json.loads((out / "confusion.json").read_text())["top1"] == result["top1"]
    assert (out / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the human-readable report, written beside the weights by default
    assert cli.main(["evaluate", "--weights", str(weights / "model.safetensors"), "--data-dir", str(data)]) == 0
    report = capsys.readouterr().out
    assert "top-1" in report and "green" in report and (weights / "confusion.png").is_file()


def test_evaluate_cli_errors(trained, tmp_path, capsys):
    data, weights, _ = trained
    assert cli.main(["evaluate", "--weights", str(weights), "--data-dir", str(data), "--split", "val"]) == 2
    assert "without a validation hold-out" in capsys.readouterr().err
    assert cli.main(["evaluate", "--weights", str(tmp_path / "missing"), "--data-dir", str(data)]) == 2
    assert "weights not found" in capsys.readouterr().err


def test_align_classes(trained):
    data, _, _ = trained
    test = load_dataset(data, split="test")
    order = ["red", "blue", "green"]
    aligned = align_classes(test, order)
    assert aligned.classes == order
    assert [order[i] for i in aligned.labels] == [test.classes[i] for i in test.labels]
    with pytest.raises(DataError, match="classes do not match"):
        align_classes(dataclasses.replace(test, classes=["a", "b", "c"]), order)


def write_images(folder: Path, colour=(200, 30, 30)) -> dict[str, Path]:
    """One red picture in many formats, modes and sizes, plus a corrupt file."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    big = np.clip(rng.integers(0, 60, (90, 140, 3)) + np.array(colour), 0, 255).astype(np.uint8)
    rgb = Image.fromarray(big)
    files = {
        "png": folder / "a.png",
        "jpeg": folder / "b.jpg",
        "gray": folder / "c.png",
        "rgba": folder / "d.png",
        "palette": folder / "e.gif",
        "bmp": folder / "f.bmp",
    }
    rgb.save(files["png"])
    rgb.save(files["jpeg"], quality=90)
    rgb.convert("L").save(files["gray"])
    rgba = rgb.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(files["rgba"])
    rgb.convert("P").save(files["palette"])
    rgb.save(files["bmp"])
    files["corrupt"] = folder / "z.jpg"
    files["corrupt"].write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    return files


def test_predict_any_format_and_mode(trained, tmp_path):
    _, weights, _ = trained
    model, meta = load_model(weights)
    files = write_images(tmp_path / "img")
    names = ["png", "jpeg", "gray", "rgba", "palette", "bmp"]
    results = predict(model, [files[n] for n in names], topk=2)
    assert [r["source"] for r in results] == [str(files[n]) for n in names]
    for r in results:
        probs = [t["probability"] for t in r["top"]]
        assert len(probs) == 2 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
        assert [t["class"] for t in r["top"]] == [meta["classes"][t["index"]] for t in r["top"]]
    for name in ("png", "jpeg", "rgba", "palette", "bmp"):
        assert results[names.index(name)]["top"][0]["class"] == "red", name
    with pytest.raises(ImageError, match="z.jpg"):
        predict(model, [files["png"], files["corrupt"]])


def test_predict_paths_pil_and_tensors_agree_with_evaluate(trained):
    from PIL import Image

    data, weights, _ = trained
    model, meta = load_model(weights)
    test = load_dataset(data, split="test")
    paths = sorted((data / "test").rglob("*.png"))  # the dataset's own order: class folders, then names
    by_path = predict(model, paths, topk=3)
    by_tensor = predict(model, test.images, topk=3)
    with Image.open(paths[0]) as img:
        by_pil = predict(model, img.copy(), topk=3)
    expected = reference_logits(model, test, meta).softmax(1)
    for i, (a, b) in enumerate(zip(by_path, by_tensor, strict=True)):
        assert [t["index"] for t in a["top"]] == [t["index"] for t in b["top"]]
        assert a["top"][0]["probability"] == pytest.approx(expected[i].max().item(), abs=1e-5)
    assert [t["index"] for t in by_pil[0]["top"]] == [t["index"] for t in by_path[0]["top"]]
    assert by_pil[0]["top"][0]["probability"] == pytest.approx(by_path[0]["top"][0]["probability"], abs=1e-6)
    # tensors of another size are resized with antialiasing
    small = predict(model, torch.full((3, 8, 8), 200, dtype=torch.uint8), topk=1)
    assert small[0]["top"][0]["class"] in CLASSES


def test_predict_cli_keeps_going_past_a_bad_file(trained, tmp_path, capsys):
    _, weights, _ = trained
    files = write_images(tmp_path / "img")
    argv = ["predict", "--weights", str(weights), str(files["png"]), str(files["corrupt"]), str(files["gray"]),
            str(tmp_path / "missing.png"), "--topk", "3", "--json"]
    assert cli.main(argv) == 2  # unreadable images are bad input: exit 2, after the readable ones
    captured = capsys.readouterr()
    rows = json.loads(captured.out)
    assert [Path(r["source"]).name for r in rows] == ["a.png", "z.jpg", "c.png", "missing.png"]
    assert "error" in rows[1] and "error" in rows[3]
    assert len(rows[0]["top"]) == 3 and len(rows[2]["top"]) == 3
    assert "z.jpg" in captured.err and "missing.png: no such file" in captured.err
    # a directory is expanded to its images; text output, exit 2 because of the corrupt file
    assert cli.main(["predict", "--weights", str(weights), str(tmp_path / "img")]) == 2
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 7 and lines[-1].endswith("z.jpg: ERROR " + rows[1]["error"])
    assert cli.main(["predict", "--weights", str(weights), str(files["png"]), "--topk", "0"]) == 2
