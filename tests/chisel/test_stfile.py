"""chisel's own safetensors writer: byte-exact files that `safetensors.safe_open` reads, by every
write path (page cache, O_DIRECT staged, O_DIRECT in place), with a fallback where O_DIRECT is
refused."""

from __future__ import annotations

import errno
import json
import os

import numpy as np
import pytest
import torch
from safetensors import safe_open

import chisel
from chisel.capture.buffers import FlatLayout, _region_flats
from chisel.store import stfile
from chisel.store.layout import write_tensors
from chisel.store.verify import verify_run

TENSORS = {
    "a/f64": torch.randn(3, 5, dtype=torch.float64),
    "b/f32": torch.randn(7),
    "c/bf16": torch.randn(5).to(torch.bfloat16),
    "d/f16": torch.randn(2, 3).to(torch.float16),
    "e/i64": torch.arange(9),
    "f/bool": torch.tensor([True, False, True]),
    "g/empty": torch.zeros(0, 4),
    "h/u8": torch.arange(5, dtype=torch.uint8),
}


def _read(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118


def _same(got, want):
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape
        assert torch.equal(got[k].view(torch.uint8), v.view(torch.uint8))  # bits, NaN-proof


@pytest.mark.parametrize("how", ["page cache", "staged"])
def test_every_dtype_reads_back_bit_for_bit(tmp_path, how):
    files = None if how == "page cache" else stfile.DirectFiles()
    path = tmp_path / "x.safetensors"
    write_tensors(path, TENSORS, {"step": 3, "note": "é"}, files=files)
    got, meta = _read(path)
    _same(got, TENSORS)
    assert json.loads(meta["record"]) == {"step": 3, "note": "é"}
    assert set(json.loads(meta["checksums"])["tensors"]) == set(TENSORS)
    if files is not None:  # staged, or the page cache where this file system refuses O_DIRECT
        assert files.counts["staged"] + files.counts["page cache"] == 1
        assert files.counts["staged"] == int(files.direct)


def test_a_file_larger_than_the_staging_buffer_is_staged_piece_by_piece(tmp_path, monkeypatch):
    monkeypatch.setattr(stfile, "STAGING", 2 * 4096)
    big = {"x": torch.randn(5000), "y": torch.arange(777), **TENSORS}  # ~26 KB: several pieces
    files = stfile.DirectFiles()
    write_tensors(tmp_path / "big.safetensors", big, {"step": 1}, files=files)
    _same(_read(tmp_path / "big.safetensors")[0], big)
    assert files.staging_bytes <= 2 * 4096


def test_in_place_write_from_a_region_matches_a_staged_one(tmp_path):
    layout = FlatLayout.build(["w", "b", "v"], [(300, 7), (7,), (5,)], ["float32", "float32", "float64"])
    region, after, grads = _region_flats(layout, grads=True)
    assert region.data.ctypes.data % 4096 == 0
    for flat in (*after.values(), *grads.values()):
        flat.copy_(torch.randn(flat.shape, dtype=flat.dtype))
    # the region's file order: widest dtype first, θ before grads
    head = {"after/float64": after["float64"], "grad/float64": grads["float64"],
            "after/float32": after["float32"], "grad/float32": grads["float32"]}
    files = stfile.DirectFiles()
    write_tensors(tmp_path / "in_place.safetensors", head, {"step": 0}, files=files, block=region.data)
    write_tensors(tmp_path / "staged.safetensors", {k: v.clone() for k, v in head.items()}, {"step": 0})
    a, _ = _read(tmp_path / "in_place.safetensors")
    b, _ = _read(tmp_path / "staged.safetensors")
    _same(a, b)
    if files.direct:
        assert files.counts == {"in place": 1, "staged": 0, "page cache": 0}
        assert (tmp_path / "in_place.safetensors").stat().st_size % 4096 != 0  # truncated exactly


def test_o_direct_refused_falls_back_to_the_page_cache(tmp_path, monkeypatch):
    real_open = os.open

    def no_direct(path, flags, *args):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", no_direct)
    files = stfile.DirectFiles()
    for i in range(2):
        write_tensors(tmp_path / f"{i}.safetensors", TENSORS, {"step": i}, files=files)
        _same(_read(tmp_path / f"{i}.safetensors")[0], TENSORS)
    assert files.direct is False and files.counts["page cache"] == 2


@pytest.mark.parametrize(
    "dtype, expect",
    [("float32", {"in place": 4, "staged": 2}), ("bfloat16", {"in place": 0, "staged": 6})],
)
def test_a_cpu_recording_writes_steps_in_place(tmp_path, dtype, expect):
    """θ, grads and tags of a float32 run go out from the capture's own page-aligned buffers;
    a lossy storage dtype (deltas are not in those buffers) is staged, as are keyframes; all
    read back exactly."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    seen = []
    with chisel.record(model, opt, tmp_path / "run", dtype=dtype) as rec:
        for t in range(4):
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            opt.zero_grad()
            model(torch.randn(3, 6)).pow(2).sum().backward()
            rec.tag(adv=torch.randn(3), idx=torch.arange(3) + t)
            opt.step()
            seen.append({n: p.detach().double() - before[n].double() for n, p in model.named_parameters()})
    counts = rec._writer._files.counts  # after close(): every step is written
    run = chisel.load(tmp_path / "run")
    assert len(run) == 4
    assert torch.equal(run.tags(2)["idx"], torch.arange(3) + 2)
    if dtype == "float32":
        for t in range(4):
            assert all(torch.equal(run.update(t)[n], seen[t][n]) for n in seen[t])
    if rec._writer._files.direct:  # 4 steps; the keyframes at start and end are staged
        assert {k: counts[k] for k in expect} == expect
    report = verify_run(tmp_path / "run")  # every file's checksums and records hold
    assert report.ok, report.problems
    assert np.isfinite(run.record(3).update_norm)
