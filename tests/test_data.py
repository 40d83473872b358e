"""Datasets: official python and binary readers, image folders, cache, hold-out, statistics."""

from __future__ import annotations

import os
import pickle
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from densenet import data
from densenet.data import channel_stats, holdout_indices, load_dataset, load_splits, resolve_data_dir
from densenet.errors import ConfigError, DataError

C10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# our tiny files are not the official ones, so every load warns about the md5: expected here
pytestmark = pytest.mark.filterwarnings("ignore:.*differs from the official")


# ---------------------------------------------------------------------------------------------
# tiny datasets in the official layouts


def _pickle(path: Path, obj: dict) -> None:
    # protocol 2 and bytes keys, as in the official files (written by Python 2's cPickle)
    path.write_bytes(pickle.dumps(obj, protocol=2))


def tiny_cifar10(n_train=(3, 2, 4, 1, 2), n_test=5, seed=0):
    rng = np.random.default_rng(seed)
    train = [(rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, n)) for n in n_train]
    test = (rng.integers(0, 256, (n_test, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, n_test))
    return train, test


def write_cifar10_python(root: Path, train, test) -> Path:
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    for i, (x, y) in enumerate(train, 1):
        _pickle(
            d / f"data_batch_{i}",
            {
                b"batch_label": f"training batch {i} of 5".encode(),
                b"labels": [int(v) for v in y],
                b"data": x.reshape(len(x), 3072),
                b"filenames": [f"img_{i}_{k}.png".encode() for k in range(len(x))],
            },
        )
    x, y = test
    _pickle(d / "test_batch", {b"batch_label": b"testing batch 1 of 1", b"labels": [int(v) for v in y],
                               b"data": x.reshape(len(x), 3072), b"filenames": [b"t.png"] * len(x)})
    _pickle(d / "batches.meta", {b"num_cases_per_batch": 10000, b"label_names": [c.encode() for c in C10],
                                 b"num_vis": 3072})
    return d


def write_cifar10_binary(root: Path, train, test) -> Path:
    d = root / "cifar-10-batches-bin"
    d.mkdir(parents=True)

    def records(x, y):
        return np.concatenate([np.asarray(y, np.uint8)[:, None], x.reshape(len(x), 3072)], axis=1).tobytes()

    for i, (x, y) in enumerate(train, 1):
        (d / f"data_batch_{i}.bin").write_bytes(records(x, y))
    (d / "test_batch.bin").write_bytes(records(*test))
    (d / "batches.meta.txt").write_text("\n".join(C10) + "\n\n")
    return d


def tiny_cifar100(root: Path, n_train=7, n_test=4, seed=1):
    rng = np.random.default_rng(seed)
    fine_names = [f"fine{i:02d}" for i in range(100)]
    coarse_names = [f"coarse{i:02d}" for i in range(20)]
    splits = {}
    py = root / "cifar-100-python"
    bn = root / "cifar-100-binary"
    py.mkdir(parents=True)
    bn.mkdir(parents=True)
    for split, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
        fine = rng.integers(0, 100, n)
        coarse = fine // 5
        splits[split] = (x, fine, coarse)
        _pickle(py / split, {b"filenames": [b"f.png"] * n, b"batch_label": split.encode(),
                             b"fine_labels": [int(v) for v in fine], b"coarse_labels": [int(v) for v in coarse],
                             b"data": x.reshape(n, 3072)})
        rec = np.concatenate([coarse.astype(np.uint8)[:, None], fine.astype(np.uint8)[:, None], x.reshape(n, 3072)], 1)
        (bn / f"{split}.bin").write_bytes(rec.tobytes())
    _pickle(py / "meta", {b"fine_label_names": [n.encode() for n in fine_names],
                          b"coarse_label_names": [n.encode() for n in coarse_names]})
    (bn / "fine_label_names.txt").write_text("\n".join(fine_names) + "\n")
    (bn / "coarse_label_names.txt").write_text("\n".join(coarse_names) + "\n")
    return splits, fine_names, coarse_names


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch, request):
    """Each test gets its own cache directory and no $DENSENET_DATA, except the real-data tests."""
    if request.node.name.startswith("test_real_"):
        return
    monkeypatch.setenv("DENSENET_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("DENSENET_DATA", raising=False)


# ---------------------------------------------------------------------------------------------
# official formats


def test_python_and_binary_readers_agree_with_the_source_arrays(tmp_path):
    train, test = tiny_cifar10()
    write_cifar10_python(tmp_path / "py", train, test)
    write_cifar10_binary(tmp_path / "bin", train, test)
    want_x = np.concatenate([x for x, _ in train])
    want_y = np.concatenate([y for _, y in train])
    got = {fmt: load_splits(tmp_path / fmt) for fmt in ("py", "bin")}
    for fmt, splits in got.items():
        tr, te = splits["train"], splits["test"]
        assert tr.format == {"py": "python", "bin": "binary"}[fmt]
        assert tr.images.dtype == torch.uint8 and tr.labels.dtype == torch.int64
        assert tr.images.shape == (12, 3, 32, 32) and te.images.shape == (5, 3, 32, 32)
        assert np.array_equal(tr.images.numpy(), want_x) and np.array_equal(tr.labels.numpy(), want_y)
        assert np.array_equal(te.images.numpy(), test[0]) and np.array_equal(te.labels.numpy(), test[1])
        assert tr.classes == C10 and te.classes == C10
        assert tr.mean == te.mean and tr.std == te.std
    assert torch.equal(got["py"]["train"].images, got["bin"]["train"].images)
    assert got["py"]["train"].mean == got["bin"]["train"].mean


def test_md5_differing_from_the_official_file_warns_but_loads(tmp_path):
    train, test = tiny_cifar10()
    write_cifar10_python(tmp_path, train, test)
    with pytest.warns(UserWarning, match="data_batch_1: md5 .* differs from the official c99cafc1"):
        ds = load_dataset(tmp_path, split="train")
    assert len(ds) == 12


def test_cifar100_fine_and_coarse_labels_in_both_formats(tmp_path):
    splits, fine_names, coarse_names = tiny_cifar100(tmp_path / "root")
    for sub in ("cifar-100-python", "cifar-100-binary"):
        root = tmp_path / "root" if sub == "cifar-100-python" else tmp_path / "root" / sub
        for label_type, column, names in (("fine", 1, fine_names), ("coarse", 2, coarse_names)):
            ds = load_dataset(root, "cifar100", "test", label_type=label_type)
            assert ds.classes == names and ds.name == "cifar100"
            assert np.array_equal(ds.images.numpy(), splits["test"][0])
            assert np.array_equal(ds.labels.numpy(), splits["test"][column])


def test_numpy1_pickles_are_accepted(tmp_path):
    train, test = tiny_cifar10()
    d = write_cifar10_python(tmp_path, train, test)
    raw = (d / "test_batch").read_bytes()
    assert b"numpy._core.multiarray" in raw
    (d / "test_batch").write_bytes(raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    ds = load_dataset(tmp_path, split="test")
    assert np.array_equal(ds.images.numpy(), test[0])


def test_pickle_with_a_disallowed_global_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    train, test = tiny_cifar10()
    d = write_cifar10_python(tmp_path, train, test)
    (d / "data_batch_3").write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}, protocol=2))
    with pytest.raises(DataError, match=r"data_batch_3 is not a valid CIFAR file .*'posix.system' is not allowed"):
        load_dataset(tmp_path)
    assert not marker.exists()
    # the same through builtins.eval, which a plain pickle.load would call
    code = f"open({str(marker)!r}, 'w')"
    (d / "data_batch_3").write_bytes(b"cbuiltins\neval\n(V" + code.encode() + b"\ntR.")
    with pytest.raises(DataError, match="builtins.eval"):
        load_dataset(tmp_path)
    assert not marker.exists()


def test_codec_trick_is_refused(tmp_path):
    bad = tmp_path / "x"
    bad.write_bytes(b"c_codecs\nencode\n(Vabc\nVrot13\ntR.")
    with pytest.raises(DataError, match="codec 'rot13' is not allowed"):
        data.safe_unpickle(bad)


def test_truncated_python_batch_names_the_file_and_the_fix(tmp_path):
    train, test = tiny_cifar10()
    d = write_cifar10_python(tmp_path, train, test)
    raw = (d / "data_batch_2").read_bytes()
    (d / "data_batch_2").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError) as err:
        load_dataset(tmp_path)
    msg = str(err.value)
    assert "data_batch_2 is truncated or corrupt" in msg
    assert f"densenet download --data-dir {tmp_path}" in msg
    assert "\n" not in msg


def test_truncated_binary_batch_is_refused(tmp_path):
    train, test = tiny_cifar10()
    d = write_cifar10_binary(tmp_path, train, test)
    raw = (d / "test_batch.bin").read_bytes()
    (d / "test_batch.bin").write_bytes(raw[:-100])
    with pytest.raises(DataError, match=r"test_batch.bin is truncated or corrupt \(15265 bytes .* 3073-byte"):
        load_dataset(tmp_path, split="test")


def test_missing_file_and_missing_directory(tmp_path):
    train, test = tiny_cifar10()
    d = write_cifar10_python(tmp_path, train, test)
    (d / "data_batch_4").unlink()
    with pytest.raises(DataError, match=r"data_batch_4 is missing from .*cifar-10-batches-py .*incomplete.*"
                                        r"densenet download --data-dir"):
        load_dataset(tmp_path)
    # the test split needs the training statistics, so it is refused too
    with pytest.raises(DataError, match="data_batch_4 is missing"):
        load_dataset(tmp_path, split="test")
    with pytest.raises(DataError, match=r"data directory .*nowhere does not exist; run `densenet download"):
        load_dataset(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"no CIFAR-100 data in .*empty: expected cifar-100-python/.*"
                                        r"densenet download --dataset cifar100 --data-dir"):
        load_dataset(empty, "cifar100")


def test_format_detection_accepts_the_directory_itself(tmp_path):
    train, test = tiny_cifar10()
    d = write_cifar10_binary(tmp_path, train, test)
    ds = load_dataset(d, split="test")
    assert ds.format == "binary" and ds.root == str(d)
    assert np.array_equal(ds.images.numpy(), test[0])


def test_data_dir_resolution(tmp_path, monkeypatch):
    assert resolve_data_dir(tmp_path / "x") == tmp_path / "x"
    monkeypatch.setenv("DENSENET_DATA", str(tmp_path / "env"))
    assert resolve_data_dir(None) == tmp_path / "env"
    monkeypatch.delenv("DENSENET_DATA")
    assert resolve_data_dir(None) == Path("data")
    train, test = tiny_cifar10()
    write_cifar10_python(tmp_path / "env", train, test)
    monkeypatch.setenv("DENSENET_DATA", str(tmp_path / "env"))
    assert len(load_dataset(split="test")) == 5


def test_bad_arguments(tmp_path):
    with pytest.raises(ConfigError, match="needs val_split"):
        load_dataset(tmp_path, split="val")
    with pytest.raises(ConfigError, match="only for CIFAR-100"):
        load_dataset(tmp_path, label_type="coarse")
    with pytest.raises(ConfigError, match="unknown split"):
        load_dataset(tmp_path, split="validation")
    with pytest.raises(ConfigError, match="unknown dataset"):
        load_dataset(tmp_path, name="mnist")
    train, test = tiny_cifar10()
    write_cifar10_python(tmp_path, train, test)
    with pytest.raises(ConfigError, match="val_split must be between 0 and 11"):
        load_dataset(tmp_path, val_split=12)


def test_validation_holdout_and_statistics(tmp_path):
    train, test = tiny_cifar10()
    write_cifar10_python(tmp_path, train, test)
    all_x = np.concatenate([x for x, _ in train])
    s = load_splits(tmp_path, splits=("train", "val", "test"), val_split=4, seed=7)
    tr, va, te = s["train"], s["val"], s["test"]
    assert (len(tr), len(va), len(te)) == (8, 4, 5)
    tr_idx, va_idx = holdout_indices(12, 4, 7)
    assert sorted(np.concatenate([tr_idx, va_idx]).tolist()) == list(range(12))
    assert np.array_equal(va.images.numpy(), all_x[va_idx]) and np.array_equal(tr.images.numpy(), all_x[tr_idx])
    # statistics of the training images without the hold-out, as a plain float64 reference
    ref = all_x[tr_idx].astype(np.float64) / 255
    assert np.allclose(tr.mean, ref.mean(axis=(0, 2, 3)), rtol=0, atol=1e-12)
    assert np.allclose(tr.std, ref.std(axis=(0, 2, 3)), rtol=0, atol=1e-12)
    assert va.mean == tr.mean == te.mean and va.std == tr.std == te.std
    # same seed, same hold-out through load_dataset; another seed, another one
    again = load_dataset(tmp_path, split="val", val_split=4, seed=7)
    assert torch.equal(again.images, va.images)
    other = load_dataset(tmp_path, split="val", val_split=4, seed=8)
    assert not torch.equal(other.images, va.images)


def test_channel_stats_is_exact():
    x = np.random.default_rng(3).integers(0, 256, (20, 3, 9, 7), dtype=np.uint8)
    mean, std = channel_stats(x)
    ref = x.astype(np.float64) / 255
    assert np.allclose(mean, ref.mean(axis=(0, 2, 3)), rtol=0, atol=1e-14)
    assert np.allclose(std, ref.std(axis=(0, 2, 3)), rtol=0, atol=1e-14)


def test_official_format_resized_to_another_image_size(tmp_path):
    train, test = tiny_cifar10()
    write_cifar10_python(tmp_path, train, test)
    ds = load_dataset(tmp_path, split="test", image_size=16)
    assert ds.images.shape == (5, 3, 16, 16) and ds.images.dtype == torch.uint8
    flat = np.full((1, 3, 32, 32), 77, np.uint8)
    assert (data._resize_batch(flat, 20) == 77).all()


# ---------------------------------------------------------------------------------------------
# image folders


def _save(img: Image.Image, path: Path, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)


def _folder_with_modes(root: Path):
    """One image per mode; returns {relative path: expected RGB (3, 32, 32)}."""
    rng = np.random.default_rng(5)
    expected = {}
    rgb = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    _save(Image.fromarray(rgb), root / "train/cat/rgb.png")
    expected["train/cat/rgb.png"] = rgb.transpose(2, 0, 1)

    gray = rng.integers(0, 256, (32, 32), dtype=np.uint8)
    _save(Image.fromarray(gray, "L"), root / "train/cat/gray.png")
    expected["train/cat/gray.png"] = np.stack([gray] * 3)

    rgba = rng.integers(0, 256, (32, 32, 4), dtype=np.uint8)
    _save(Image.fromarray(rgba, "RGBA"), root / "train/dog/rgba.png")
    expected["train/dog/rgba.png"] = rgba[..., :3].transpose(2, 0, 1)

    palette = [10, 20, 30, 200, 100, 50] + [0] * (256 * 3 - 6)
    idx = rng.integers(0, 2, (32, 32), dtype=np.uint8)
    pimg = Image.fromarray(idx, "P")
    pimg.putpalette(palette)
    _save(pimg, root / "train/dog/palette.gif")
    expected["train/dog/palette.gif"] = np.where(idx[None] == 0, np.array([10, 20, 30])[:, None, None],
                                                 np.array([200, 100, 50])[:, None, None]).astype(np.uint8)

    deep = rng.integers(0, 65536, (32, 32), dtype=np.uint16)
    _save(Image.fromarray(deep), root / "test/cat/deep16.png")
    expected["test/cat/deep16.png"] = np.stack([(deep >> 8).astype(np.uint8)] * 3)

    wide = np.zeros((48, 80, 3), np.uint8)
    wide[..., 0], wide[..., 1], wide[..., 2] = 40, 140, 240
    _save(Image.fromarray(wide), root / "test/dog/wide.bmp")
    expected["test/dog/wide.bmp"] = np.stack([np.full((32, 32), v, np.uint8) for v in (40, 140, 240)])
    return expected


def test_image_folder_modes_and_sizes(tmp_path):
    root = tmp_path / "imgs"
    expected = _folder_with_modes(root)
    (root / "train/cat/notes.txt").write_text("not an image, ignored: wrong extension")
    s = load_splits(root)
    tr, te = s["train"], s["test"]
    assert tr.classes == ["cat", "dog"] and tr.format == "folder"
    # order: classes sorted, then file names sorted
    assert tr.labels.tolist() == [0, 0, 1, 1] and te.labels.tolist() == [0, 1]
    order = ["train/cat/gray.png", "train/cat/rgb.png", "train/dog/palette.gif", "train/dog/rgba.png"]
    for i, rel in enumerate(order):
        assert np.array_equal(tr.images[i].numpy(), expected[rel]), rel
    for i, rel in enumerate(["test/cat/deep16.png", "test/dog/wide.bmp"]):
        assert np.array_equal(te.images[i].numpy(), expected[rel]), rel
    mean, std = channel_stats(np.stack([expected[r] for r in order]))
    assert tr.mean == pytest.approx(mean, abs=1e-15) and te.std == pytest.approx(std, abs=1e-15)


def test_image_folder_resize_matches_pil_bicubic(tmp_path):
    rng = np.random.default_rng(2)
    big = Image.fromarray(rng.integers(0, 256, (90, 70, 3), dtype=np.uint8))
    _save(big, tmp_path / "train/a/x.png")
    _save(big, tmp_path / "test/a/x.png")
    ds = load_dataset(tmp_path, split="test", image_size=24)
    ref = np.asarray(big.resize((24, 24), Image.Resampling.BICUBIC, reducing_gap=3.0)).transpose(2, 0, 1)
    assert ds.images.shape == (1, 3, 24, 24)
    assert np.array_equal(ds.images[0].numpy(), ref)


def test_image_folder_cache_is_used_and_invalidated(tmp_path, monkeypatch):
    root = tmp_path / "imgs"
    _folder_with_modes(root)
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    first = load_splits(root)
    cached = sorted((tmp_path / "cache").glob("folder-*.npy"))
    assert len(cached) == 2
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before  # nothing written into the data

    calls = []
    real_decode = data.decode_image

    def counting_decode(path, size):
        calls.append(Path(path).name)
        return real_decode(path, size)

    monkeypatch.setattr(data, "decode_image", counting_decode)
    second = load_splits(root)
    assert calls == []
    assert torch.equal(first["train"].images, second["train"].images)
    assert torch.equal(first["test"].images, second["test"].images)

    # a changed file is noticed (size and mtime are part of the key)
    Image.fromarray(np.zeros((32, 32), np.uint8), "L").save(root / "train/cat/gray.png")
    third = load_dataset(root, split="train")
    assert len(calls) == 4 and sorted(calls) == ["gray.png", "palette.gif", "rgb.png", "rgba.png"]
    assert third.images[0].sum() == 0
    # a damaged cache file is decoded again rather than trusted
    for p in (tmp_path / "cache").glob("folder-test-*.npy"):
        p.write_bytes(b"garbage")
    calls.clear()
    load_dataset(root, split="test")
    assert sorted(calls) == ["deep16.png", "wide.bmp"]


def test_unwritable_cache_still_loads(tmp_path, monkeypatch):
    root = tmp_path / "imgs"
    _folder_with_modes(root)
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache directory should be")
    monkeypatch.setenv("DENSENET_CACHE", str(blocker / "cache"))
    with pytest.warns(UserWarning, match="cannot write the image cache"):
        ds = load_dataset(root, split="test")
    assert len(ds) == 2


def test_non_image_and_truncated_jpeg_are_named(tmp_path):
    root = tmp_path / "imgs"
    _folder_with_modes(root)
    bad = root / "train/cat/bad.png"
    bad.write_text("this is text, not a png")
    with pytest.raises(DataError, match=re.escape(f"{bad} is not an image file")):
        load_dataset(root)
    bad.unlink()
    rgb = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    jpg = root / "test/dog/cut.jpg"
    Image.fromarray(rgb).save(jpg, quality=90)
    raw = jpg.read_bytes()
    jpg.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match=re.escape(f"{jpg} is truncated or corrupt")):
        load_dataset(root, split="test")


def test_parallel_decoding_gives_the_same_images_and_errors(tmp_path, monkeypatch):
    root = tmp_path / "imgs"
    expected = _folder_with_modes(root)
    for i in range(6):
        _save(Image.fromarray(np.full((40, 30, 3), i * 40, np.uint8)), root / f"train/dog/extra{i}.png")
    serial = load_dataset(root)
    monkeypatch.setattr(data, "PARALLEL_MIN", 0)
    monkeypatch.setenv("DENSENET_CACHE", str(tmp_path / "cache2"))
    parallel = load_dataset(root)
    assert len(parallel) == 10 and torch.equal(parallel.images, serial.images)
    assert np.array_equal(parallel.images[0].numpy(), expected["train/cat/gray.png"])
    bad = root / "train/dog/extra3.png"
    bad.write_bytes(b"GIF89a broken")
    with pytest.raises(DataError, match=re.escape(f"{bad} is not an image file")):
        load_dataset(root)


def test_folder_test_class_unknown_to_train(tmp_path):
    _save(Image.new("RGB", (32, 32)), tmp_path / "train/a/x.png")
    _save(Image.new("RGB", (32, 32)), tmp_path / "test/b/x.png")
    with pytest.raises(DataError, match=r"test/b is a class that .*train does not have"):
        load_dataset(tmp_path, split="test")


# ---------------------------------------------------------------------------------------------
# the real data (CI sets DENSENET_DATA to the JPEG copy of CIFAR-10)

REAL = os.environ.get("DENSENET_DATA")


@pytest.mark.skipif(not REAL or not Path(REAL).is_dir(), reason="DENSENET_DATA is not set to a CIFAR-10 directory")
def test_real_cifar10(monkeypatch):
    # shares the user's cache (not tmp_path) so that a CI run decodes the 60,000 images only once
    s = load_splits(REAL)
    tr, te = s["train"], s["test"]
    assert tr.images.shape == (50000, 3, 32, 32) and te.images.shape == (10000, 3, 32, 32)
    assert tr.images.dtype == torch.uint8 and tr.labels.dtype == torch.int64
    assert tr.classes == C10 == te.classes
    assert torch.bincount(tr.labels).tolist() == [5000] * 10
    assert torch.bincount(te.labels).tolist() == [1000] * 10
    # the official statistics, up to what JPEG recompression changes
    assert tr.mean == pytest.approx((0.4914, 0.4822, 0.4465), abs=0.002)
    assert tr.std == pytest.approx((0.2470, 0.2435, 0.2616), abs=0.004)

    def no_decoding(path, size):
        raise AssertionError(f"decoded {path} although the cache should have been used")

    monkeypatch.setattr(data, "decode_image", no_decoding)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = load_dataset(REAL, split="test")
    assert torch.equal(again.images, te.images)
    val = load_dataset(REAL, split="val", val_split=5000, seed=0)
    assert len(val) == 5000 and val.mean != tr.mean
