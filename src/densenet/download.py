"""``densenet download``: fetch the official CIFAR archive, verify it and extract it safely.

The archive (python version) is streamed with ``urllib`` into a temporary file next to its final
place, with a progress bar, and its md5 compared with the published one. Extraction refuses
members with absolute paths, ``..`` components, links or device files, goes into a temporary
directory beside the target and is moved into place only when complete, so a failed or
interrupted download leaves nothing behind. An archive already present with the right md5 is not
fetched again.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from pathlib import Path, PurePosixPath

from densenet.data import LAYOUTS, OFFICIAL_MD5, PRETTY, file_md5, resolve_data_dir
from densenet.errors import DataError, ResourceError

BASE_URL = "https://www.cs.toronto.edu/~kriz/"

# The official archives of the python versions and their md5 as published on the CIFAR page.
ARCHIVES = {
    "cifar10": {"filename": "cifar-10-python.tar.gz", "md5": "c58f30108f718f92721af3b95e74349a"},
    "cifar100": {"filename": "cifar-100-python.tar.gz", "md5": "eb9058c3a382ffc7106e4002c42a8d85"},
}


def archive_url(name: str, url: str | None = None) -> str:
    """The archive's URL: the official one, or ``url`` (a mirror's base URL or the archive's own URL)."""
    filename = ARCHIVES[name]["filename"]
    if not url:
        return BASE_URL + filename
    if url.rstrip("/").endswith((".tar.gz", ".tgz", ".tar")):
        return url
    return url.rstrip("/") + "/" + filename


def _folder(name: str) -> str:
    return LAYOUTS[(name, "python")]["subdir"]


def _expected_files(name: str) -> list[str]:
    layout = LAYOUTS[(name, "python")]
    return layout["train"] + layout["test"] + layout["meta"]


def is_complete(name: str, target: Path, check_md5: bool = False) -> bool:
    """Whether ``target`` holds every file of the python version (with the official md5s, if asked)."""
    files = _expected_files(name)
    if not all((target / f).is_file() for f in files):
        return False
    if not check_md5:
        return True
    official = OFFICIAL_MD5[_folder(name)]
    return all(file_md5(target / f) == official[f] for f in files)


def _fetch(url: str, dest: Path, timeout: float, progress: bool | None) -> str:
    """Stream ``url`` into ``dest``; return the md5 of what was received."""
    from tqdm import tqdm

    h = hashlib.md5()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, open(dest, "wb") as out:
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            received = 0
            with tqdm(
                total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=Path(dest.name).stem,
                disable=None if progress is None else not progress, leave=False,
            ) as bar:
                while chunk := resp.read(1 << 20):
                    out.write(chunk)
                    h.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as exc:
        raise DataError(f"cannot download {url}: HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise DataError(f"cannot download {url}: {exc.reason}; check the network or pass --url MIRROR") from None
    except (TimeoutError, OSError, ValueError) as exc:
        # connection reset, timeout, http.client.IncompleteRead, a malformed URL, a full disk
        raise DataError(f"cannot download {url}: {exc or type(exc).__name__}") from None
    if total is not None and received != total:
        raise DataError(f"download of {url} is incomplete: received {received} of {total} bytes; try again")
    return h.hexdigest()


def _unsafe_reason(member: tarfile.TarInfo) -> str | None:
    name = member.name
    if name.startswith(("/", "\\")) or os.path.isabs(name) or (len(name) > 1 and name[1] == ":"):
        return "has an absolute path"
    if ".." in PurePosixPath(name.replace("\\", "/")).parts:
        return "points outside the archive ('..')"
    if not (member.isfile() or member.isdir()):
        return "is a link or a device file"
    return None


def extract(archive: Path, name: str, target: Path, label: str | None = None) -> Path:
    """Extract the python version of ``name`` from ``archive`` into ``target``, safely and atomically.

    Every member is checked before anything is written; the files land in a temporary directory
    beside ``target`` and replace ``target`` only once all of them are there. ``label`` names the
    archive in messages (default: its path).
    """
    label = label or str(archive)
    folder = _folder(name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder}.extract-", dir=target.parent))
    try:
        corrupt = (tarfile.TarError, EOFError, zlib.error)
        try:
            tar = tarfile.open(archive, "r:*")
            members = tar.getmembers()  # reads (and decompresses) the whole archive: truncation shows here
        except (*corrupt, OSError) as exc:  # gzip.BadGzipFile is an OSError
            raise DataError(f"{label} is truncated or corrupt ({exc or type(exc).__name__})") from None
        with tar:
            for m in members:
                reason = _unsafe_reason(m)
                if reason:
                    raise DataError(f"{label} is refused: member {m.name!r} {reason}")
            try:
                if hasattr(tarfile, "data_filter"):
                    tar.extractall(tmp, members=members, filter="data")
                else:  # pragma: no cover - Python without extraction filters
                    tar.extractall(tmp, members=members)
            except corrupt as exc:  # OSError here is a write error: the caller reports it
                raise DataError(f"{label} is truncated or corrupt ({exc or type(exc).__name__})") from None
        extracted = tmp / folder
        missing = [f for f in _expected_files(name) if not (extracted / f).is_file()]
        if missing:
            raise DataError(f"{label} is not the {PRETTY[name]} python version: {folder}/{missing[0]} is missing")
        if target.exists():
            target.rename(tmp / "previous")
        extracted.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def download(
    name: str = "cifar10",
    data_dir: str | os.PathLike | None = None,
    *,
    url: str | None = None,
    expected_md5: str | None = None,
    timeout: float = 60.0,
    progress: bool | None = None,
) -> Path:
    """Make sure the python version of ``name`` is in ``data_dir``; return its directory.

    ``data_dir`` defaults to ``$DENSENET_DATA``, else ``./data``. ``url`` names a mirror (base URL
    or archive URL); ``expected_md5`` replaces the official md5 (for a mirror serving another
    archive). The archive is kept beside the extracted folder, so a later call finds it verified
    and downloads nothing.
    """
    if name not in ARCHIVES:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(ARCHIVES)}")
    root = resolve_data_dir(data_dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ResourceError(f"cannot create the data directory {root}: {exc.strerror or exc}") from None
    expected = (expected_md5 or ARCHIVES[name]["md5"]).lower()
    archive = root / ARCHIVES[name]["filename"]
    target = root / _folder(name)

    if archive.is_file() and file_md5(archive) == expected:
        if is_complete(name, target):
            return target
        try:
            return extract(archive, name, target)
        except OSError as exc:
            raise ResourceError(f"cannot write to {root}: {exc.strerror or exc}") from None
    if not archive.exists() and expected_md5 is None and is_complete(name, target, check_md5=True):
        return target

    source = archive_url(name, url)
    part = None
    try:
        fd, part_name = tempfile.mkstemp(prefix=f".{archive.name}.", suffix=".part", dir=root)
        os.close(fd)
        part = Path(part_name)
        print(f"downloading {source}", file=sys.stderr)
        actual = _fetch(source, part, timeout, progress)
        if actual != expected:
            raise DataError(
                f"md5 of {source} is {actual}, expected {expected}: the file is corrupt or not the "
                f"official {PRETTY[name]} archive; nothing was kept"
            )
        extract(part, name, target, label=source)
        os.replace(part, archive)
    except OSError as exc:  # creating the temporary file or directory, moving into place
        raise ResourceError(f"cannot write to {root}: {exc.strerror or exc}") from None
    finally:
        if part is not None:
            part.unlink(missing_ok=True)
    return target


def add_arguments(parser) -> None:
    parser.add_argument("--dataset", choices=sorted(ARCHIVES), default="cifar10", help="which dataset (default cifar10)")
    parser.add_argument(
        "--data-dir", default=None, help="where to put it (default: $DENSENET_DATA, else ./data)"
    )
    parser.add_argument(
        "--url", default=None, help=f"mirror: a base URL or the archive's own URL (default {BASE_URL})"
    )


def run(args) -> int:
    target = download(args.dataset, args.data_dir, url=args.url)
    print(f"{PRETTY[args.dataset]} (python version) is ready in {target}")
    return 0
