"""``densenet download``: archives served from 127.0.0.1, md5, truncation, unsafe members, no refetch."""

from __future__ import annotations

import hashlib
import io
import pickle
import socket
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from densenet import download as dl
from densenet.cli import main
from densenet.data import load_dataset

pytestmark = pytest.mark.filterwarnings("ignore:.*differs from the official")
C10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def cifar10_archive(extra=None, n=3, seed=0) -> tuple[bytes, np.ndarray]:
    """A tiny cifar-10-python.tar.gz laid out like the official one; also returns the test images."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        d = tarfile.TarInfo("cifar-10-batches-py")
        d.type = tarfile.DIRTYPE
        d.mode = 0o755
        tar.addfile(d)
        test_x = None
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
            test_x = x
            batch = {b"batch_label": name.encode(), b"labels": [int(v) for v in rng.integers(0, 10, n)],
                     b"data": x, b"filenames": [b"f.png"] * n}
            _member(tar, f"cifar-10-batches-py/{name}", pickle.dumps(batch, protocol=2))
        meta = {b"num_cases_per_batch": n, b"label_names": [c.encode() for c in C10], b"num_vis": 3072}
        _member(tar, "cifar-10-batches-py/batches.meta", pickle.dumps(meta, protocol=2))
        _member(tar, "cifar-10-batches-py/readme.html", b"<html></html>")
        for add in extra or []:
            add(tar)
    return buf.getvalue(), test_x.reshape(n, 3, 32, 32)


class Server:
    """Serves ``files`` (URL path -> bytes) on 127.0.0.1; counts requests; can lie about lengths."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.requests: list[str] = []
        self.claimed_length: int | None = None
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append(self.path)
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(server.claimed_length or len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


def _md5(b: bytes) -> str:
    return hashlib.md5(b).hexdigest()


def _serve(server, archive: bytes, monkeypatch, md5: str | None = None) -> str:
    server.files["/mirror/cifar-10-python.tar.gz"] = archive
    monkeypatch.setitem(dl.ARCHIVES, "cifar10", {**dl.ARCHIVES["cifar10"], "md5": md5 or _md5(archive)})
    return server.base + "/mirror/"


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_good_archive_downloads_extracts_and_is_not_fetched_again(server, tmp_path, monkeypatch, capsys):
    archive, test_x = cifar10_archive()
    url = _serve(server, archive, monkeypatch)
    root = tmp_path / "data"
    assert main(["download", "--data-dir", str(root), "--url", url]) == 0
    assert "is ready in" in capsys.readouterr().out
    assert server.requests == ["/mirror/cifar-10-python.tar.gz"]
    assert (root / "cifar-10-python.tar.gz").read_bytes() == archive
    files = {"data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch",
             "batches.meta", "readme.html"}
    assert _listing(root) == sorted(["cifar-10-python.tar.gz", "cifar-10-batches-py"]
                                    + [f"cifar-10-batches-py/{f}" for f in files])  # no temporary left
    ds = load_dataset(root, split="test")
    assert np.array_equal(ds.images.numpy(), test_x)

    assert main(["download", "--data-dir", str(root), "--url", url]) == 0
    assert len(server.requests) == 1  # verified copy: nothing fetched
    # the extracted folder lost a file: extracted again from the verified archive, still no fetch
    (root / "cifar-10-batches-py" / "data_batch_3").unlink()
    assert main(["download", "--data-dir", str(root), "--url", url]) == 0
    assert len(server.requests) == 1
    assert (root / "cifar-10-batches-py" / "data_batch_3").is_file()


def test_python_api_with_expected_md5_and_archive_url(server, tmp_path, monkeypatch):
    archive, _ = cifar10_archive()
    server.files["/x/cifar-10-python.tar.gz"] = archive
    target = dl.download("cifar10", tmp_path, url=server.base + "/x/cifar-10-python.tar.gz",
                         expected_md5=_md5(archive).upper(), progress=False)
    assert target == tmp_path / "cifar-10-batches-py" and (target / "test_batch").is_file()
    monkeypatch.setenv("DENSENET_DATA", str(tmp_path))
    assert dl.download("cifar10", expected_md5=_md5(archive)) == target  # found through $DENSENET_DATA
    assert len(server.requests) == 1


def test_archive_url():
    assert dl.archive_url("cifar10") == "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
    assert dl.archive_url("cifar100", "http://m/base") == "http://m/base/cifar-100-python.tar.gz"
    assert dl.archive_url("cifar100", "http://m/base/") == "http://m/base/cifar-100-python.tar.gz"
    assert dl.archive_url("cifar10", "http://m/other.tar.gz") == "http://m/other.tar.gz"


def test_md5_mismatch_is_refused_and_leaves_nothing(server, tmp_path, monkeypatch, capsys):
    archive, _ = cifar10_archive()
    url = _serve(server, archive, monkeypatch, md5="0" * 32)
    root = tmp_path / "data"
    assert main(["download", "--data-dir", str(root), "--url", url]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("densenet download: error: md5 of ") and f"is {_md5(archive)}, expected {'0' * 32}" in err
    assert _listing(root) == []


def test_truncated_archive_is_refused_and_leaves_nothing(server, tmp_path, monkeypatch, capsys):
    archive, _ = cifar10_archive()
    cut = archive[: len(archive) * 2 // 3]
    url = _serve(server, cut, monkeypatch)  # md5 of the cut file: only extraction can notice
    root = tmp_path / "data"
    assert main(["download", "--data-dir", str(root), "--url", url]) == 2
    assert "cifar-10-python.tar.gz is truncated or corrupt" in capsys.readouterr().err
    assert _listing(root) == []


def test_connection_closed_early_is_an_incomplete_download(server, tmp_path, monkeypatch, capsys):
    archive, _ = cifar10_archive()
    url = _serve(server, archive, monkeypatch)
    server.claimed_length = len(archive) + 1000
    root = tmp_path / "data"
    assert main(["download", "--data-dir", str(root), "--url", url]) == 2
    err = capsys.readouterr().err
    assert f"is incomplete: received {len(archive)} of {len(archive) + 1000} bytes" in err
    assert _listing(root) == []


def _evil(name, kind=tarfile.REGTYPE, linkname=""):
    def add(tar):
        info = tarfile.TarInfo(name)
        info.type = kind
        info.linkname = linkname
        payload = b"" if kind != tarfile.REGTYPE else b"gotcha"
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))

    return add


@pytest.mark.parametrize(
    "member, why",
    [
        (_evil("../evil"), "'../evil' points outside the archive"),
        (_evil("cifar-10-batches-py/../../evil"), "points outside the archive"),
        (_evil("/tmp/evil_absolute_densenet"), "has an absolute path"),
        (_evil("cifar-10-batches-py/link", tarfile.SYMTYPE, "/etc/passwd"), "is a link or a device file"),
        (_evil("cifar-10-batches-py/hard", tarfile.LNKTYPE, "cifar-10-batches-py/test_batch"), "is a link"),
        (_evil("cifar-10-batches-py/dev", tarfile.CHRTYPE), "is a link or a device file"),
    ],
    ids=["dotdot", "nested-dotdot", "absolute", "symlink", "hardlink", "device"],
)
def test_unsafe_members_are_refused_and_leave_nothing(server, tmp_path, monkeypatch, capsys, member, why):
    archive, _ = cifar10_archive(extra=[member])
    url = _serve(server, archive, monkeypatch)
    root = tmp_path / "a" / "data"
    assert main(["download", "--data-dir", str(root), "--url", url]) == 2
    err = capsys.readouterr().err
    assert "is refused: member" in err and why in err
    assert _listing(tmp_path) == ["a", "a/data"]
    assert not Path("/tmp/evil_absolute_densenet").exists()


def test_archive_without_the_dataset_is_refused(server, tmp_path, monkeypatch, capsys):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        _member(tar, "something/else.txt", b"hello")
    url = _serve(server, buf.getvalue(), monkeypatch)
    assert main(["download", "--data-dir", str(tmp_path), "--url", url]) == 2
    assert "cifar-10-batches-py/data_batch_1 is missing" in capsys.readouterr().err
    assert _listing(tmp_path) == []


def test_network_failures_are_one_line_errors(server, tmp_path, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    assert main(["download", "--data-dir", str(tmp_path), "--url", f"http://127.0.0.1:{port}/"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("downloading http://127.0.0.1:")  # progress note, then the one-line error
    assert len(err) == 2 and err[1].startswith("densenet download: error: cannot download http://127.0.0.1:")
    assert main(["download", "--data-dir", str(tmp_path), "--url", server.base + "/nothing/"]) == 2
    assert "HTTP 404" in capsys.readouterr().err
    assert _listing(tmp_path) == []


def test_existing_archive_with_a_wrong_md5_is_replaced(server, tmp_path, monkeypatch):
    archive, _ = cifar10_archive()
    url = _serve(server, archive, monkeypatch)
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"stale partial download")
    dl.download("cifar10", tmp_path, url=url, progress=False)
    assert (tmp_path / "cifar-10-python.tar.gz").read_bytes() == archive
    assert len(server.requests) == 1



def test_unwritable_data_dir_is_a_one_line_error(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a directory")
    assert main(["download", "--data-dir", str(blocker / "data"), "--url", "http://127.0.0.1:9/"]) == 1  # the machine refused (errors.py)
    assert "error: cannot create the data directory" in capsys.readouterr().err
