"""Pack a JPEG image-folder dataset into one small .npz, and unpack it byte for byte.

    .venv/bin/python scripts/pack_folder.py pack ../shared/data/cifar10-jpeg .devdata/cifar10-jpeg.npz
    python3 scripts/pack_folder.py unpack .devdata/cifar10-jpeg.npz /tmp/cifar10-jpeg

For moving the CIFAR-10 JPEG copy (60,000 files, 53 MiB) to a machine that cannot see it, such as
the lent GPU machine, whose working tree may carry 64 MiB in all. Small JPEGs written by one encoder
share everything before their scan data (the quantisation and Huffman tables: 609 of the 911 bytes
of an average CIFAR-10 image here), so each distinct header is stored once and each file as a header
number and its scan bytes: 18 MiB. Unpacking writes every file back exactly (a sha256 over all
paths and bytes, stored in the pack, is checked), so a model trained on the unpacked folder sees the
same pixels as one trained on the original.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import zipfile
from pathlib import Path

import numpy as np

_SCAN = b"\xff\xda"  # JPEG start-of-scan marker: the header is everything before it


def _digest(items) -> str:
    h = hashlib.sha256()
    for rel, data in items:
        h.update(rel.encode() + b"\0" + len(data).to_bytes(8, "little") + data)
    return h.hexdigest()


def pack(src: Path, out: Path) -> None:
    files = sorted(p for p in src.rglob("*") if p.is_file())
    if not files:
        sys.exit(f"error: no files under {src}")
    headers: dict[bytes, int] = {}
    originals, rels, header_ids, bodies = [], [], [], []
    for path in files:
        data = path.read_bytes()
        cut = data.find(_SCAN)
        cut = 0 if cut < 0 else cut  # not a JPEG: stored whole, behind the empty header
        rels.append(path.relative_to(src).as_posix())
        originals.append((rels[-1], data))
        header_ids.append(headers.setdefault(data[:cut], len(headers)))
        bodies.append(data[cut:])
    table = list(headers)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, paths=np.array(rels), header_ids=np.array(header_ids, dtype=np.int32),
             body_sizes=np.array([len(b) for b in bodies], dtype=np.int64),
             bodies=np.frombuffer(b"".join(bodies), dtype=np.uint8),
             header_sizes=np.array([len(h) for h in table], dtype=np.int64),
             headers=np.frombuffer(b"".join(table), dtype=np.uint8),
             sha256=np.array(_digest(originals)))
    print(f"{len(files)} files, {len(table)} distinct headers: {out} ({out.stat().st_size / 2**20:.1f} MiB)")


def _split(buffer: np.ndarray, sizes: np.ndarray) -> list[bytes]:
    ends = np.cumsum(sizes)
    raw = buffer.tobytes()
    return [raw[e - s:e] for s, e in zip(sizes.tolist(), ends.tolist())]


def unpack(pack_file: Path, dest: Path) -> None:
    try:
        with np.load(pack_file, allow_pickle=False) as z:
            table = _split(z["headers"], z["header_sizes"])
            bodies = _split(z["bodies"], z["body_sizes"])
            rels = [str(r) for r in z["paths"]]
            items = [(rel, table[i] + body) for rel, i, body in zip(rels, z["header_ids"].tolist(), bodies)]
            expected = str(z["sha256"])
    except (OSError, ValueError, KeyError, IndexError, zipfile.BadZipFile) as exc:
        sys.exit(f"error: cannot read {pack_file} as a pack made by this script ({exc})")
    if _digest(items) != expected:
        sys.exit(f"error: {pack_file} does not unpack to the files it was made from (sha256 mismatch)")
    for rel, data in items:
        path = dest / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    print(f"{len(items)} files unpacked into {dest}, sha256 {expected[:16]}... verified")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="a folder into one .npz")
    p.add_argument("src", type=Path)
    p.add_argument("out", type=Path)
    u = sub.add_parser("unpack", help="a .npz back into the folder")
    u.add_argument("pack_file", type=Path)
    u.add_argument("dest", type=Path)
    args = parser.parse_args()
    if args.command == "pack":
        pack(args.src, args.out)
    else:
        unpack(args.pack_file, args.dest)


if __name__ == "__main__":
    main()
