"""``densenet report``: a self-contained HTML page whose numbers are the runs' own, rendered in Chromium."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from densenet.cli import main
from helpers import channel_image_folder

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def make_image_folder(root: Path, per_class=(16, 4)) -> Path:
    return channel_image_folder(root, per_class, ("cat", "dog", "ship"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, module_cache):
    """Two one-epoch runs: A (DenseNet-BC) with confusion.json from densenet evaluate, B (basic) without."""
    tmp = tmp_path_factory.mktemp("report")
    data = make_image_folder(tmp / "data")
    for name, model in (("A", "densenet-bc-10-4"), ("B", "densenet-10-4")):
        assert main(["train", "--model", model, "--data-dir", str(data), "--epochs", "1", "--batch-size", "16",
                     "--lr", "0.05", "--device", "cpu", "--out-dir", str(tmp / name), "--weights-dir", "",
                     "--progress", "none"]) == 0
    assert main(["evaluate", "--weights", str(tmp / "A"), "--data-dir", str(data), "--json"]) == 0
    assert main(["evaluate", "--weights", str(tmp / "B"), "--data-dir", str(data), "--out", str(tmp / "evalB"),
                 "--json"]) == 0
    return tmp


class Tables(HTMLParser):
    """Every table of a page as a list of rows of cell texts; also every src/href attribute."""

    def __init__(self, page: str):
        super().__init__()
        self.tables, self.links, self._row, self._cell = [], [], None, None
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        self.links += [(tag, k, v) for k, v in attrs if k in ("src", "href")]
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self._row.append(self._cell)
            self._cell = None
        elif tag == "tr":
            self.tables[-1].append(self._row)

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def per_class_rows(result: dict) -> list[list[str]]:
    rows = [[r["class"], str(r["correct"]), str(r["total"]), f"{100 * r['accuracy']:.2f}%"] for r in result["per_class"]]
    total = sum(r["correct"] for r in result["per_class"])
    return rows + [["all", str(total), str(result["num_samples"]), f"{100 * result['top1']:.2f}%"]]


@pytest.fixture(scope="module")
def report(runs):
    out = runs / "report.html"
    assert main(["report", str(runs / "A"), str(runs / "B"), "--out", str(out), "--data-dir", str(runs / "data")]) == 0
    return out


def test_page_is_self_contained(report):
    page = report.read_text(encoding="utf-8")
    parsed = Tables(page)
    assert "<script" not in page and "<link" not in page and "@import" not in page and "url(" not in page
    assert all(tag == "img" and attr == "src" for tag, attr, _ in parsed.links)
    sizes = []
    for _, _, uri in parsed.links:
        assert uri.startswith("data:image/png;base64,")
        sizes.append(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).size)
    assert len(sizes) == 6  # per run: curves, confusion matrix, feature-reuse map
    assert all(w > 400 and h > 300 for w, h in sizes)


def test_numbers_are_the_runs_own(runs, report):
    parsed = Tables(report.read_text(encoding="utf-8"))
    comparison = parsed.tables[0]
    assert comparison[0][:2] == ["run", "model"]
    for row, name in zip(comparison[1:], ("A", "B")):
        meta = json.loads((runs / name / "model.json").read_text())
        config = json.loads((runs / name / "config.json").read_text())
        assert row[:2] == [name, meta["config"]["name"]]
        assert row[2] == f"{config['resolved']['parameters']:,}"
        assert row[5] == str(config["resolved"]["test_images"]) == "12"
        assert row[7] == f"{100 * meta['training']['final_test_acc']:.2f}%"
    # each run's own table names what its final accuracy was measured on: one plain view of each image
    finals = [row for table in parsed.tables for row in table if row[:1] == ["final test accuracy"]]
    for row, name in zip(finals, ("A", "B"), strict=True):
        training = json.loads((runs / name / "model.json").read_text())["training"]
        assert training["final_test_views"] == 1
        assert row[1] == f"{100 * training['final_test_acc']:.2f}% (on 12 test images, 1 view of each)"
    # per-class tables: A from its confusion.json, B evaluated by the report (equal to densenet evaluate)
    class_tables = [t for t in parsed.tables if t[0] == ["class", "correct", "total", "accuracy"]]
    assert len(class_tables) == 2
    assert class_tables[0][1:] == per_class_rows(json.loads((runs / "A" / "confusion.json").read_text()))
    assert class_tables[1][1:] == per_class_rows(json.loads((runs / "evalB" / "confusion.json").read_text()))
    settings = [t for t in parsed.tables if t[0][:2] == ["setting", "value"]]
    pairs = {row[i]: row[i + 1] for row in settings[0][1:] for i in range(0, len(row), 2)}
    assert pairs["lr"] == "0.05" and pairs["batch_size"] == "16" and pairs["model"] == "densenet-bc-10-4"


def test_without_evaluation_and_bad_input(runs, tmp_path, capsys):
    out = tmp_path / "r.html"
    assert main(["report", str(runs / "B"), "--no-evaluate", "--out", str(out)]) == 0
    page = out.read_text(encoding="utf-8")
    assert "no confusion.json (run densenet evaluate --weights RUN)" in page
    assert page.count("<img ") == 2 and "<h2>comparison</h2>" not in page
    capsys.readouterr()
    (tmp_path / "empty").mkdir()
    for argv, message in (([str(tmp_path / "nowhere")], "run directory not found"),
                          ([str(tmp_path / "empty")], "is not a densenet train run directory")):
        assert main(["report", *argv, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("densenet report: error: ") and message in err and err.count("\n") == 1


# --- rendering in a real browser ---------------------------------------------------------------

PROBE = """<script>
window.addEventListener('load', () => {
  const images = [...document.images].map(i => { const r = i.getBoundingClientRect();
    return {natural: i.naturalWidth, x: r.left + scrollX, y: r.top + scrollY, w: r.width, h: r.height}; });
  const pre = document.createElement('pre'); pre.id = 'probe';
  pre.textContent = JSON.stringify({images, height: document.documentElement.scrollHeight});
  document.body.appendChild(pre);
});
</script>"""
WIDTH = 1400


def chromium(tmp: Path, page: Path, *extra: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp / 'profile'}", "--hide-scrollbars", "--force-device-scale-factor=1"]
    return subprocess.run([CHROMIUM, *flags, *extra, page.resolve().as_uri()], capture_output=True, text=True,
                          timeout=120, check=False)


def rendered_images(tmp: Path, page: Path) -> list[tuple[dict, np.ndarray]]:
    """Each <img> of ``page`` as Chromium lays it out, with the screenshot pixels of its box."""
    probe = tmp / "probe.html"
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
    dom = chromium(tmp, probe, f"--window-size={WIDTH},1000", "--dump-dom").stdout
    info = json.loads(re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S).group(1).replace("&quot;", '"'))
    shot = tmp / "shot.png"
    chromium(tmp, probe, f"--window-size={WIDTH},{int(info['height'])}", f"--screenshot={shot}")
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(np.int16)
    boxes = []
    for box in info["images"]:
        x0, y0 = int(box["x"]) + 2, int(box["y"]) + 2
        x1, y1 = int(box["x"] + box["w"]) - 2, int(box["y"] + box["h"]) - 2
        boxes.append((box, pixels[y0:y1, x0:x1]))
    return boxes


def looks_like_a_chart(box: dict, region: np.ndarray) -> bool:
    """Decoded, laid out at chart size, and drawn: varied pixels, some of them coloured (the page
    itself is black, grey and white; a one-epoch curve is only a few coloured markers)."""
    if box["natural"] == 0 or box["w"] < 300 or box["h"] < 200 or region.size == 0:
        return False
    non_white = (region < 235).any(axis=2).mean()
    coloured = (region.max(axis=2) - region.min(axis=2) > 60).mean()
    return region.std() > 20 and non_white > 0.03 and coloured > 0.0003


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install chromium)")
def test_chromium_renders_every_chart(report, tmp_path):
    boxes = rendered_images(tmp_path, report)
    assert len(boxes) == 6
    assert all(looks_like_a_chart(box, region) for box, region in boxes)
    # the check fails for an image the browser cannot decode
    page = report.read_text(encoding="utf-8")
    start = page.index("data:image/png;base64,") + len("data:image/png;base64,")
    broken = tmp_path / "broken.html"
    broken.write_text(page[:start] + "AAAA" + page[start + 4000:], encoding="utf-8")
    checks = [looks_like_a_chart(box, region) for box, region in rendered_images(tmp_path, broken)]
    assert checks[0] is False and all(checks[1:])
    # no console messages (errors, blocked resources) while loading the report itself
    log = chromium(tmp_path, report, f"--window-size={WIDTH},1000", "--enable-logging=stderr", "--v=0",
                   f"--screenshot={tmp_path / 'plain.png'}").stderr
    assert [line for line in log.splitlines() if ":CONSOLE" in line] == []
