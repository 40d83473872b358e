"""ONNX export (densenet export) and running the graph with ONNX Runtime."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from densenet.cli import main
from densenet.errors import ConfigError, DenseNetError, WeightsError
from densenet.models import DenseNet

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from densenet.export import check_images, compare_outputs, export_onnx, normalise  # noqa: E402
from densenet.onnx_runtime import OnnxModel, load_onnx_model  # noqa: E402
from densenet.weights import load_model, save_model  # noqa: E402

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
MEAN = [0.4914, 0.4822, 0.4465]
STD = [0.2470, 0.2435, 0.2616]


def tiny_model(**overrides) -> DenseNet:
    kwargs = dict(growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=2, stem="cifar",
                  num_classes=10)
    return DenseNet(**{**kwargs, **overrides})


def images_batch(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def train_a_little(model: DenseNet, steps: int = 5) -> DenseNet:
    """A few real SGD steps, so that weights and batch-norm statistics are no longer the initial ones."""
    torch.manual_seed(0)
    images = normalise(images_batch(64, 1), {"mean": MEAN, "std": STD})
    labels = (images.mean(dim=(1, 2, 3)) > 0).long() * 3  # any learnable rule will do
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is faster, and immune to a busy machine
    try:
        for step in range(steps):
            batch = slice(16 * (step % 4), 16 * (step % 4) + 16)
            loss = torch.nn.functional.cross_entropy(model(images[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory) -> Path:
    model = train_a_little(tiny_model(memory_efficient=True))
    directory = tmp_path_factory.mktemp("weights")
    save_model(directory, model, {"classes": CLASSES, "mean": MEAN, "std": STD, "input_size": 32,
                                  "training": {"steps": 5}})
    return directory


@pytest.fixture(scope="module")
def exported(weights_dir, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("onnx") / "dynamic.onnx"
    report = export_onnx(weights_dir, out, dynamic_batch=True, data_dir=weights_dir / "no-data", check_count=32)
    return out, report


@pytest.fixture(scope="module")
def exported_static(weights_dir, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("onnx") / "static.onnx"
    report = export_onnx(weights_dir, out, dynamic_batch=False, data_dir=weights_dir / "no-data", check_count=8)
    return out, report


def test_trained_weights_differ_from_initial_ones(weights_dir):
    model, _ = load_model(weights_dir)
    assert not torch.equal(model.features.norm5.running_mean, torch.zeros_like(model.features.norm5.running_mean))
    assert int(model.features.norm5.num_batches_tracked) == 5


def test_export_passes_checker_and_agrees_with_pytorch(exported):
    out, report = exported
    proto = onnx.load(out)
    onnx.checker.check_model(proto, full_check=True)
    assert report["checker"] == "passed"
    assert report["images"] == 32 and report["top1_agree"] == 32
    assert 0 <= report["max_abs_diff"] <= 1e-4
    assert report["compared_on"].startswith("32 synthetic images (seed 0")
    assert report["exporter"] == "dynamo" and report["opset"] == 18
    assert {o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")} == {18}
    assert not list(out.parent.glob(".*.tmp"))


def test_metadata_holds_the_preprocessing_contract(exported, weights_dir):
    out, _ = exported
    props = {p.key: p.value for p in onnx.load(out).metadata_props}
    _, meta = load_model(weights_dir)
    assert props["format"] == "densenet-onnx" and json.loads(props["format_version"]) == 1
    assert json.loads(props["classes"]) == CLASSES
    assert json.loads(props["mean"]) == MEAN and json.loads(props["std"]) == STD
    assert json.loads(props["input_size"]) == 32
    config = json.loads(props["config"])
    assert config == {**meta["config"], "memory_efficient": False}
    assert json.loads(props["training"]) == {"steps": 5}
    assert props["input_name"] == "input" and props["output_name"] == "logits"
    assert "(x - mean[c]) / std[c]" in props["preprocessing"]
    assert props["source_sha256"] == meta["sha256"]
    # the exporter's per-node notes (with local source paths) are removed
    assert not any(node.metadata_props for node in onnx.load(out).graph.node)


def test_memory_efficient_mode_is_off_in_the_graph(exported):
    proto = onnx.load(exported[0])
    ops = {node.op_type for node in proto.graph.node}
    assert ops <= {"Conv", "BatchNormalization", "Relu", "Concat", "AveragePool", "ReduceMean",
                   "GlobalAveragePool", "Reshape", "Flatten", "Gemm"}
    assert sum(op == "Conv" for op in (n.op_type for n in proto.graph.node)) == 1 + 2 * 4 + 1


@pytest.mark.parametrize("batch", [1, 7])
def test_dynamic_batch_runs_batch_1_and_7(exported, weights_dir, batch):
    model, _ = load_model(weights_dir)
    runner, meta = load_onnx_model(exported[0])
    assert runner.batch_size is None and runner.input_shape[1:] == [3, 32, 32]
    x = normalise(images_batch(batch, 10 + batch), meta)
    result = compare_outputs(model, runner, x)
    assert result["max_abs_diff"] <= 1e-4 and result["top1_agree"] == batch
    # the session itself takes the batch as it is
    out = runner.session.run(None, {"input": x.numpy()})[0]
    assert out.shape == (batch, 10)


def test_static_graph_runs_any_batch_in_chunks(exported_static, weights_dir):
    out, report = exported_static
    runner, _ = load_onnx_model(out)
    assert runner.batch_size == 1 and runner.input_shape == [1, 3, 32, 32]
    model, meta = load_model(weights_dir)
    x = normalise(images_batch(5, 3), meta)
    with torch.inference_mode():
        expected = model(x)
    got = runner(x.contiguous(memory_format=torch.channels_last))
    assert got.shape == (5, 10) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert report["top1_agree"] == 8


def test_torchscript_exporter_for_old_opsets(weights_dir, tmp_path):
    report = export_onnx(weights_dir, tmp_path / "old.onnx", opset=13, dynamic_batch=True,
                         data_dir=tmp_path / "none", check_count=16)
    assert report["exporter"] == "torchscript" and report["max_abs_diff"] <= 1e-4
    proto = onnx.load(tmp_path / "old.onnx")
    assert {o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")} == {13}
    runner, meta = load_onnx_model(tmp_path / "old.onnx")
    assert meta["classes"] == CLASSES and runner.batch_size is None


def test_failed_agreement_check_writes_nothing(weights_dir, tmp_path):
    with pytest.raises(DenseNetError, match="disagrees with PyTorch.*not written"):
        export_onnx(weights_dir, tmp_path / "m.onnx", tolerance=-1.0, data_dir=tmp_path, check_count=4)
    assert list(tmp_path.iterdir()) == []


def test_bad_options(weights_dir, tmp_path):
    with pytest.raises(ConfigError, match="opset must be at least 9"):
        export_onnx(weights_dir, tmp_path / "m.onnx", opset=7)
    with pytest.raises(ConfigError, match=r"\.onnx file"):
        export_onnx(weights_dir, tmp_path / "m.bin")
    with pytest.raises(WeightsError, match="not found"):
        export_onnx(tmp_path / "missing", tmp_path / "m.onnx")


def test_cli_export_prints_the_checks(weights_dir, tmp_path, capsys):
    out = tmp_path / "cli.onnx"
    code = main(["export", "--weights", str(weights_dir), "--out", str(out), "--dynamic-batch",
                 "--data-dir", str(tmp_path / "none"), "--check-images", "8"])
    text = capsys.readouterr().out
    assert code == 0 and out.is_file()
    assert f"wrote {out}" in text and "opset 18, dynamic batch, dynamo exporter" in text
    assert "onnx.checker: passed" in text
    assert "on 8 synthetic images (seed 0; no test data" in text and "top-1 identical on 8/8" in text


def test_cli_export_is_dynamic_by_default_and_fixed_on_request(weights_dir, tmp_path, capsys):
    import onnxruntime as ort

    common = ["--weights", str(weights_dir), "--data-dir", str(tmp_path / "none"), "--check-images", "4"]
    assert main(["export", *common, "--out", str(tmp_path / "d.onnx")]) == 0
    assert "dynamic batch" in capsys.readouterr().out
    session = ort.InferenceSession(str(tmp_path / "d.onnx"), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    assert session.run(None, {name: np.zeros((8, 3, 32, 32), np.float32)})[0].shape == (8, 10)
    assert main(["export", *common, "--out", str(tmp_path / "f.onnx"), "--fixed-batch", "2"]) == 0
    assert "fixed batch 2: ONNX Runtime refuses any other batch size" in capsys.readouterr().out
    session = ort.InferenceSession(str(tmp_path / "f.onnx"), providers=["CPUExecutionProvider"])
    assert session.run(None, {name: np.zeros((2, 3, 32, 32), np.float32)})[0].shape == (2, 10)
    with pytest.raises(Exception, match="batch|dimension|Got invalid"):
        session.run(None, {name: np.zeros((8, 3, 32, 32), np.float32)})


def test_corrupt_onnx_gives_a_clear_error(exported, tmp_path, capsys):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"this is not a protobuf" * 20)
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(exported[0].read_bytes()[:5000])
    for bad in (garbage, truncated):
        with pytest.raises(WeightsError, match=f"{bad.name} is not a usable ONNX model"):
            load_onnx_model(bad)
    assert main(["export", "--weights", str(garbage)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"densenet export: error: {garbage} is already an ONNX graph; export from the PyTorch weights"


def test_onnx_without_densenet_metadata_is_refused(exported, tmp_path):
    proto = onnx.load(exported[0])
    del proto.metadata_props[:]
    plain = tmp_path / "plain.onnx"
    onnx.save(proto, plain)
    with pytest.raises(WeightsError, match="without densenet metadata"):
        load_onnx_model(plain)
    with pytest.raises(WeightsError, match="not found"):
        load_onnx_model(tmp_path / "absent.onnx")


def test_wrong_input_size_is_a_clear_error(exported):
    runner, _ = load_onnx_model(exported[0])
    with pytest.raises(ConfigError, match=r"takes inputs \[N, 3, 32, 32\], got \[2, 3, 24, 24\]"):
        runner(torch.zeros(2, 3, 24, 24))


@pytest.mark.parametrize("module", ["onnx", "onnxscript"])
def test_missing_extra_for_export(weights_dir, tmp_path, monkeypatch, capsys, module):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    code = main(["export", "--weights", str(weights_dir), "--out", str(tmp_path / "m.onnx")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert f"needs the '{module}' package" in err and "pip install 'densenet[onnx]'" in err
    assert not (tmp_path / "m.onnx").exists()


def test_missing_onnxruntime_for_loading(exported, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ConfigError, match=r"needs the 'onnxruntime' package.*densenet\[onnx\]"):
        load_onnx_model(exported[0])


def test_check_images_use_real_test_data_when_present():
    root = os.environ.get("DENSENET_DATA")
    if not root or not Path(root).is_dir():
        pytest.skip("no dataset in $DENSENET_DATA")
    images, described = check_images({"classes": CLASSES, "input_size": 32}, root, count=20)
    assert images.shape == (20, 3, 32, 32) and images.dtype == torch.uint8
    assert described.startswith("20 CIFAR-10 test images from")


def test_onnx_model_is_a_module_without_weights(exported):
    runner, _ = load_onnx_model(exported[0])
    assert isinstance(runner, OnnxModel) and not runner.training
    assert [p.numel() for p in runner.parameters()] == [0]
    assert next(runner.parameters()).device == torch.device("cpu")
    assert "batch=dynamic" in repr(runner)


# --- evaluate and predict through ONNX Runtime -------------------------------------------------


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """A tiny CIFAR-like image folder with the model's 10 classes (2 train and 3 test images each)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("folder")
    generator = torch.Generator().manual_seed(5)
    for split, n in (("train", 2), ("test", 3)):
        for name in CLASSES:
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                pixels = torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8, generator=generator)
                Image.fromarray(pixels.numpy()).save(root / split / name / f"{i:04d}.png")
    return root


def run_json(capsys, argv: list[str]):
    code = main(argv)
    captured = capsys.readouterr()
    return code, json.loads(captured.out), captured.err


def test_evaluate_api_onnx_equals_pytorch(exported, weights_dir, image_folder, monkeypatch, tmp_path):
    from densenet.data import load_dataset
    from densenet.inference import evaluate

    monkeypatch.setenv("DENSENET_CACHE", str(tmp_path / "cache"))
    dataset = load_dataset(image_folder, split="test")
    torch_model, _ = load_model(weights_dir)
    onnx_model, _ = load_model(exported[0])
    assert isinstance(onnx_model, OnnxModel)
    for tta in (False, True):
        a = evaluate(torch_model, dataset, batch_size=7, tta=tta)
        b = evaluate(onnx_model, dataset, batch_size=7, tta=tta)
        assert b["confusion"] == a["confusion"] and b["top1"] == a["top1"] and b["top5"] == a["top5"]
        assert b["per_class"] == a["per_class"]
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)


def test_cli_evaluate_and_predict_with_onnx_match_pytorch(exported, exported_static, weights_dir, image_folder,
                                                          monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("DENSENET_CACHE", str(tmp_path / "cache"))
    common = ["--data-dir", str(image_folder), "--device", "cpu", "--json"]
    code, ref, _ = run_json(capsys, ["evaluate", "--weights", str(weights_dir), *common, "--out", str(tmp_path / "a")])
    assert code == 0
    for onnx_file in (exported[0], exported_static[0]):
        code, got, _ = run_json(capsys, ["evaluate", "--weights", str(onnx_file), *common, "--out", str(tmp_path / "b")])
        assert code == 0 and got.keys() == ref.keys()
        for key in ref.keys() - {"weights", "files", "loss"}:
            assert got[key] == ref[key], key
        assert got["loss"] == pytest.approx(ref["loss"], abs=1e-5)
        assert got["weights"] == str(onnx_file)

    images = [str(image_folder / "test" / name / "0000.png") for name in CLASSES[:4]]
    code, ref, _ = run_json(capsys, ["predict", "--weights", str(weights_dir), *images, "--topk", "3", "--json"])
    assert code == 0 and len(ref) == 4
    for onnx_file in (exported[0], exported_static[0]):
        code, got, _ = run_json(capsys, ["predict", "--weights", str(onnx_file), *images, "--topk", "3", "--json"])
        assert code == 0 and len(got) == len(ref)
        for r, g in zip(ref, got):
            assert g["source"] == r["source"]
            assert [t["class"] for t in g["top"]] == [t["class"] for t in r["top"]]
            assert [t["index"] for t in g["top"]] == [t["index"] for t in r["top"]]
            for tr, tg in zip(r["top"], g["top"]):
                assert tg["probability"] == pytest.approx(tr["probability"], abs=1e-5)
    # the printed form is the same too
    assert main(["predict", "--weights", str(weights_dir), *images]) == 0
    text_ref = capsys.readouterr().out
    assert main(["predict", "--weights", str(exported[0]), *images]) == 0
    assert capsys.readouterr().out == text_ref


def test_cli_corrupt_onnx_weights_one_line_error(tmp_path, capsys):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"\x08\x07garbage" * 50)
    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (32, 32)).save(image)
    for argv in (["predict", "--weights", str(bad), str(image)], ["evaluate", "--weights", str(bad)]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"{bad} is not a usable ONNX model" in err


def test_cli_predict_picks_the_fast_path_for_each_format(exported, weights_dir, image_folder, monkeypatch, capsys):
    import densenet.inference as inference

    seen = []
    original = inference.optimize_for_inference

    def spy(model, **kwargs):
        result = original(model, **kwargs)
        seen.append((type(model).__name__, type(result).__name__))
        return result

    monkeypatch.setattr(inference, "optimize_for_inference", spy)
    image = str(image_folder / "test" / "cat" / "0000.png")
    assert main(["predict", "--weights", str(weights_dir), image]) == 0
    assert main(["predict", "--weights", str(exported[0]), image]) == 0
    capsys.readouterr()
    assert seen == [("DenseNet", "InferenceDenseNet"), ("OnnxModel", "OnnxModel")]
