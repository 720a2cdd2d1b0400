"""The run format's CRC32 comes from zlib-ng (hardware-accelerated) where installed: the same
polynomial and value as the standard library's zlib.crc32, so runs written with either verify
with the other (old runs keep loading; the format's "crc32" is unchanged)."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch

import chisel
from chisel.store import stfile
from chisel.store.verify import verify_run
from tests.chisel.helpers import mlp


def test_the_fast_crc32_is_zlibs_crc32_at_every_length_and_alignment():
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, size=300_001, dtype=np.uint8)
    lengths = [0, 1, 7, 15, 16, 63, 64, 255, 4096, 5121, 65_537, 300_000]
    for start in (0, 1, 3, 8, 13):
        for n in lengths:
            piece = data[start : start + n]
            assert stfile.crc32(piece) == zlib.crc32(piece), (start, n)
    assert stfile.crc32(b"hello") == zlib.crc32(b"hello") == 907060870  # the published value


def test_zlib_ng_is_the_crc32_in_use():
    zlib_ng = pytest.importorskip("zlib_ng.zlib_ng")  # a core dependency (pyproject.toml)
    assert stfile._crc32 is zlib_ng.crc32


def _record(path, steps: int = 4) -> None:
    model = mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    with chisel.record(model, optimizer, path, keyframe_every=2, factors=True) as rec:
        for _ in range(steps):
            model(torch.randn(4, 6)).pow(2).mean().backward()
            rec.tag(advantage=torch.randn(4))
            optimizer.step()
            optimizer.zero_grad()


@pytest.mark.parametrize(("write_with", "read_with"), [("zlib", "fast"), ("fast", "zlib")])
def test_runs_checksummed_by_either_crc32_verify_with_the_other(tmp_path, monkeypatch, write_with, read_with):
    impl = {"zlib": zlib.crc32, "fast": stfile._crc32}
    monkeypatch.setattr(stfile, "_crc32", impl[write_with])
    _record(tmp_path / "run")
    monkeypatch.setattr(stfile, "_crc32", impl[read_with])
    report = verify_run(tmp_path / "run")
    assert report.ok, report.problems
    run = chisel.load(tmp_path / "run")
    for t in range(len(run)):
        assert set(run.update(t)) == set(run.param_names)
