"""benchmarks/jpeg_quality.py: a further-compressed copy of a JPEG image folder, and how far such copies lie from originals."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import jpeg_quality  # noqa: E402


def jpeg_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("test", 2)):
        for name in ("cat", "dog"):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                # smooth gradients plus noise: content JPEG keeps at 95 and loses at 20
                ramp = np.linspace(0, 200, 32)[None, :, None] + rng.integers(0, 50, (32, 32, 3))
                Image.fromarray(ramp.astype(np.uint8)).save(root / split / name / f"{i:04d}.jpg", quality=95)
    return root


def test_recompressed_copy_keeps_layout_and_reports_the_distortion_it_adds(tmp_path, capsys):
    source = jpeg_folder(tmp_path / "src")
    assert jpeg_quality.main(["recompress", str(source), str(tmp_path / "q20"), "--quality", "20"]) == 0
    before = sorted(p.relative_to(source) for p in source.rglob("*.jpg"))
    after = sorted(p.relative_to(tmp_path / "q20") for p in (tmp_path / "q20").rglob("*.jpg"))
    assert before == after and len(after) == 10
    squared = []
    for rel in after:
        with Image.open(tmp_path / "q20" / rel) as image:
            assert JpegImagePlugin.get_sampling(image) == 2  # 4:2:0, as the CIFAR-10 copy
            new = np.asarray(image.convert("RGB"), dtype=np.float64)
        with Image.open(source / rel) as image:
            old = np.asarray(image.convert("RGB"), dtype=np.float64)
        squared.append(np.square(new - old).mean())
    mse = float(np.mean(squared))  # every image has the same number of values
    assert mse > 10  # quality 20 visibly changes the images
    out = capsys.readouterr().out
    assert f"MSE {mse:.1f}" in out and f"PSNR {10 * np.log10(255 ** 2 / mse):.2f} dB" in out
    assert out.startswith("10 images at quality 20")


@pytest.mark.parametrize("args, message", [
    (["--quality", "0"], "JPEG qualities must be 1-95"),
    (["--quality", "50", "--exists"], "exists; choose a new directory"),
])
def test_bad_arguments_exit_with_one_line(tmp_path, capsys, args, message):
    source = jpeg_folder(tmp_path / "src")
    out = tmp_path / "out"
    if "--exists" in args:
        args = [a for a in args if a != "--exists"]
        out.mkdir()
    with pytest.raises(SystemExit) as exit_info:
        jpeg_quality.main(["recompress", str(source), str(out), *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_a_corrupt_jpeg_is_named(tmp_path, capsys):
    source = jpeg_folder(tmp_path / "src")
    (source / "test" / "dog" / "0001.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(SystemExit):
        jpeg_quality.main(["recompress", str(source), str(tmp_path / "out"), "--quality", "50"])
    err = capsys.readouterr().err
    assert "cannot read" in err and str(Path("dog") / "0001.jpg") in err


def test_a_folder_without_jpegs_is_refused(tmp_path, capsys):
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(SystemExit):
        jpeg_quality.main(["recompress", str(tmp_path / "empty"), str(tmp_path / "out"), "--quality", "50"])
    assert "no train/<class>/*.jpg" in capsys.readouterr().err


def photo(path: Path, seed: int) -> Path:
    """A 96 x 80 lossless 'photograph': colour gradients, a few edges and some noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:80, 0:96]
    pixels = np.stack([x * 2.5, y * 3.0, (x + y) * 1.4], axis=-1) + 60 * ((x // 12 + y // 10) % 2)[..., None]
    Image.fromarray(np.clip(pixels + rng.normal(0, 12, pixels.shape), 0, 255).astype(np.uint8)).save(path)
    return path


def chain_numbers(out: str) -> dict[int, tuple[float, float]]:
    """quality -> (copy-to-recompressed MSE, original-to-recompressed MSE) from chain's lines."""
    found = re.findall(r"quality (\d+): copy to recompressed MSE ([\d.]+), original to recompressed ([\d.]+)", out)
    return {int(q): (float(step), float(total)) for q, step, total in found}


def test_chain_measures_how_far_a_recompressed_copy_lies_from_the_original(tmp_path, capsys):
    photos = [str(photo(tmp_path / f"p{i}.png", i)) for i in range(2)]
    assert jpeg_quality.main(["chain", *photos, "--qualities", "75", "20", "--per-photo", "20"]) == 0
    out = capsys.readouterr().out
    copy = float(re.search(r"original to copy \(quality 75\) MSE ([\d.]+)", out).group(1))
    numbers = chain_numbers(out)
    assert out.startswith("40 of 40 images")
    # the copy's own quality again changes next to nothing; quality 20 moves far from both
    assert numbers[75][0] < 0.1 * copy and abs(numbers[75][1] - copy) < 0.1 * copy
    assert numbers[20][0] > copy and numbers[20][1] > copy
    # --copy-mse keeps a subset: the images whose own compression lies in the window
    assert jpeg_quality.main(["chain", *photos, "--qualities", "20", "--per-photo", "20",
                              "--copy-mse", "0", str(copy)]) == 0
    kept = int(re.match(r"(\d+) of 40", capsys.readouterr().out).group(1))
    assert 0 < kept < 40


def test_chain_refuses_photos_too_small_and_an_empty_window(tmp_path, capsys):
    small = tmp_path / "small.png"
    Image.new("RGB", (40, 40)).save(small)
    with pytest.raises(SystemExit):
        jpeg_quality.main(["chain", str(small)])
    assert "smaller than --smallest 64" in capsys.readouterr().err
    big = photo(tmp_path / "big.png", 0)
    with pytest.raises(SystemExit):
        jpeg_quality.main(["chain", str(big), "--per-photo", "5", "--copy-mse", "1e6", "2e6"])
    assert "no image has an original-to-copy MSE in" in capsys.readouterr().err
