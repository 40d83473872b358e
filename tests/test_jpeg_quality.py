"""benchmarks/jpeg_quality.py: a further-compressed copy of a JPEG image folder, and the distortion it adds."""

from __future__ import annotations

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
    assert jpeg_quality.main([str(source), str(tmp_path / "q20"), "--quality", "20"]) == 0
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
    (["--quality", "0"], "--quality must be 1-95"),
    (["--quality", "50", "--exists"], "exists; choose a new directory"),
])
def test_bad_arguments_exit_with_one_line(tmp_path, capsys, args, message):
    source = jpeg_folder(tmp_path / "src")
    out = tmp_path / "out"
    if "--exists" in args:
        args = [a for a in args if a != "--exists"]
        out.mkdir()
    with pytest.raises(SystemExit) as exit_info:
        jpeg_quality.main([str(source), str(out), *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_a_folder_without_jpegs_is_refused(tmp_path, capsys):
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(SystemExit):
        jpeg_quality.main([str(tmp_path / "empty"), str(tmp_path / "out"), "--quality", "50"])
    assert "no train/<class>/*.jpg" in capsys.readouterr().err
