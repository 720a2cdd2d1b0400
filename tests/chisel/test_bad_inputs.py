"""The catalogue of bad inputs (issue 13): one case per line, `input → expected outcome`.

Each case is a callable of a `Ctx` (a fresh copy of a small recorded run, a tmp folder, the
model and optimizer that recorded it) and the outcome it must have:
- an exception class and words its message must contain (a regex, case-insensitive),
- a warning class and words (the call must warn, and not raise),
- `CLI` and words: `chisel …` exits 2 with one line `chisel: error: …` on stderr, no traceback,
- `OK`: the callable returns normally (it asserts the correct result itself).

`python -m tests.chisel.test_bad_inputs` prints the counts by outcome (clear error, clear
warning, correct result, raw or misleading error, silently accepted); run it on an older tree
(PYTHONPATH) to compare.

The cases cover record, tag, load / Run, manifest, step and keyframe files, the CLI, probes'
fit_probe and FeatureSet files. Attribution inputs (attribute, metrics, families, …) are
catalogued with the attribution package.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import re
import shutil
import sys
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open
from torch import nn

import chisel
import probes
from chisel import errors as E
from chisel.cli import main as cli_main
from chisel.store import layout as layout_module
from probes.errors import FeatureFileError, ProbeFitError

OK = "ok"
CLI = "cli"
ManifestError = getattr(E, "ManifestError", chisel.NotARunError)
StepTypeError = getattr(E, "StepTypeError", TypeError)
MissingStepsWarning = getattr(E, "MissingStepsWarning", UserWarning)
UnverifiedRunWarning = getattr(E, "UnverifiedRunWarning", UserWarning)
FactorsSkippedWarning = getattr(E, "FactorsSkippedWarning", UserWarning)


# -- the context each case runs in ------------------------------------------------------------------
def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def _train(model: nn.Module, optimizer: Any, rec: Any, steps: int) -> None:
    for i in range(steps):
        model(torch.randn(4, 6)).pow(2).mean().backward()
        if rec is not None:
            rec.tag(advantage=torch.randn(4), episode=i)
        optimizer.step()
        optimizer.zero_grad()


def _record_pristine(root: Path) -> Path:
    model = _model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    with chisel.record(model, optimizer, root, factors=True, keyframe_every=3) as rec:
        _train(model, optimizer, rec, 5)
    return root


@dataclass
class Ctx:
    tmp: Path
    pristine: Path
    _run: Path | None = None

    @property
    def run(self) -> Path:
        """A fresh copy of a 5-step Adam run (keyframes 0, 3, 5; factors and tags)."""
        if self._run is None:
            self._run = Path(shutil.copytree(self.pristine, self.tmp / "run"))
        return self._run

    def load(self, **kw: Any) -> chisel.Run:
        return chisel.load(self.run, **kw)

    def step(self, t: int) -> Path:
        return self.run / "steps" / f"{t:09d}.safetensors"

    def keyframe(self, t: int) -> Path:
        return self.run / "keyframes" / f"{t:09d}.safetensors"

    def model_opt(self, cls: type = torch.optim.Adam) -> tuple[nn.Module, Any]:
        model = _model()
        return model, cls(model.parameters(), lr=1e-2)

    def record(self, *args: Any, **kw: Any) -> Any:
        model, opt = self.model_opt()
        args = args or (model, opt, self.tmp / "new")
        rec = chisel.record(*args, **kw)
        rec.close()
        return rec

    def manifest(self, edit: Callable[[dict], Any]) -> chisel.Run:
        """Load the run after `edit` changed its manifest (edit returns the new JSON value)."""
        path = self.run / "manifest.json"
        new = edit(json.loads(path.read_text()))
        path.write_text(new if isinstance(new, str) else json.dumps(new))
        return chisel.load(self.run)

    def cli(self, *args: str) -> tuple[int, str]:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = cli_main(list(args))
            except SystemExit as exit_:  # argparse
                rc = exit_.code if isinstance(exit_.code, int) else 1
        return rc, err.getvalue()


# -- damaging files -----------------------------------------------------------------------------
def _tensor_span(path: Path, key: str) -> tuple[int, int]:
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    begin, end = json.loads(data[8 : 8 + n])[key]["data_offsets"]
    return 8 + n + begin, 8 + n + end


def flip(path: Path, key: str, at: int = 3) -> None:
    """Flip bits of one byte inside the tensor `key` of a safetensors file."""
    begin, _ = _tensor_span(path, key)
    data = bytearray(path.read_bytes())
    data[begin + at] ^= 0x5A
    path.write_bytes(bytes(data))


def rewrite(path: Path, edit_tensors: Callable[[dict], Any] = lambda t: None,
            edit_meta: Callable[[dict], Any] = lambda m: None, checksums: bool = True) -> None:
    """Rewrite a step/keyframe file with edited tensors or record and (fresh) checksums: the
    file is then self-consistent, and only the reader's own checks can catch the edit."""
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        meta = json.loads(f.metadata()["record"])
    tensors = edit_tensors(tensors) or tensors
    new_meta = edit_meta(meta)
    meta = meta if new_meta is None else new_meta
    if checksums:
        layout_module.write_tensors(path, tensors, meta)
    else:
        from safetensors.torch import save_file

        save_file(tensors, str(path), metadata={"record": json.dumps(meta)})


def set_record(path: Path, raw: str) -> None:
    """Replace a step file's record by raw text (checksums dropped: tests the record checks)."""
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    save_file(tensors, str(path), metadata={"record": raw})


def _drop(d: dict, *keys: str) -> dict:
    for k in keys:
        d.pop(k, None)
    return d


def _set(d: dict, path: str, value: Any) -> dict:
    """Set a field by a dotted path with list indices: 'params.0.shape'."""
    parts = path.split(".")
    node: Any = d
    for p in parts[:-1]:
        node = node[int(p)] if isinstance(node, list) else node[p]
    last = parts[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return d


def _rename_param(m: dict, everywhere: bool) -> dict:
    m["params"][0]["name"] = "renamed.weight"
    if everywhere:
        m["layout"]["entries"][0][0] = "renamed.weight"
    return m


def _other_model_optimizer(ctx: Ctx) -> Any:
    other = _model()
    return chisel.record(_model(), torch.optim.SGD(other.parameters(), lr=0.1), ctx.tmp / "new")


def _mha_model() -> nn.Module:
    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 8)
            self.conv = nn.Conv1d(8, 8, 3, padding=1)
            self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
            self.lstm = nn.LSTM(8, 8, batch_first=True)
            self.head = nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.emb(x)
            h = self.conv(h.transpose(1, 2)).transpose(1, 2)
            h = self.mha(h, h, h)[0]
            return self.head(self.lstm(h)[0])

    return Mixed()


def _record_mixed(ctx: Ctx, factors: Any) -> None:
    model = _mha_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with chisel.record(model, opt, ctx.tmp / "mixed", factors=factors) as rec:
        model(torch.randint(0, 10, (2, 5))).sum().backward()
        opt.step()
        assert list(rec._capture.factors.modules) == ["emb", "head"]
    assert set(chisel.load(ctx.tmp / "mixed").factors(0)) == {"emb", "head"}


def _tag_after_with(ctx: Ctx) -> None:
    model, opt = ctx.model_opt()
    with chisel.record(model, opt, ctx.tmp / "new") as rec:
        _train(model, opt, rec, 1)
    rec.tag(reward=1.0)


def _tag_in_step(ctx: Ctx, **values: Any) -> None:
    model, opt = ctx.model_opt()
    with chisel.record(model, opt, ctx.tmp / "new") as rec:
        model(torch.randn(4, 6)).sum().backward()
        rec.tag(**values)
        opt.step()


def _resume(ctx: Ctx, model: nn.Module | None = None, opt_cls: type = torch.optim.Adam,
            run_dir: Path | None = None) -> None:
    model = model or _model()
    opt = opt_cls(model.parameters(), lr=1e-2)
    chisel.record(model, opt, run_dir or ctx.run, resume=True).close()


def _symlinked_overwrite(ctx: Ctx) -> None:
    link = ctx.tmp / "link"
    link.symlink_to(ctx.run)
    ctx.record(*ctx.model_opt(), link, overwrite=True)


def _resume_does_not_sweep_through_symlinks(ctx: Ctx) -> None:
    outside = ctx.tmp / "outside"
    outside.mkdir()
    (outside / ".tmp-precious").write_text("keep")
    shutil.move(str(ctx.run / "steps"), str(ctx.tmp / "real_steps"))
    (ctx.run / "steps").symlink_to(ctx.tmp / "real_steps")
    shutil.move(str(outside / ".tmp-precious"), str(ctx.tmp / "real_steps" / ".tmp-precious"))
    model = _model()
    model.load_state_dict({k: v.float() for k, v in ctx.load().params(5).items()})
    chisel.record(model, torch.optim.Adam(model.parameters(), lr=1e-2), ctx.run, resume=True).close()
    assert (ctx.tmp / "real_steps" / ".tmp-precious").read_text() == "keep"


def _killed_start_is_cleared(ctx: Ctx) -> None:
    root = ctx.tmp / "half"
    (root / "steps").mkdir(parents=True)
    (root / "keyframes").mkdir()
    (root / "keyframes" / "000000000.safetensors").write_bytes(b"x")
    (root / "steps" / ".tmp-000000000.safetensors").write_bytes(b"x")
    for _ in range(2):  # the retry and a retry with overwrite=True both work
        model, opt = ctx.model_opt()
        with chisel.record(model, opt, root, overwrite=_ > 0) as rec:
            _train(model, opt, rec, 1)
    assert len(chisel.load(root)) == 1


def _failed_start_leaves_nothing(ctx: Ctx, monkeypatch_write: bool) -> None:
    root = ctx.tmp / "fail"
    real = layout_module.write_tensors
    from chisel.store import writer as writer_module

    def full(path: Path, *a: Any, **k: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    writer_module.write_tensors = full
    try:
        model, opt = ctx.model_opt()
        chisel.record(model, opt, root)
    finally:
        writer_module.write_tensors = real
        assert not root.exists(), list(root.rglob("*"))


def _read_only_dir(ctx: Ctx) -> None:
    from chisel.store.layout import RunLayout

    real = RunLayout.make_dirs

    def denied(self: Any) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", str(self.root))

    RunLayout.make_dirs = denied
    try:
        ctx.record(*ctx.model_opt(), ctx.tmp / "ro")
    finally:
        RunLayout.make_dirs = real


def _gap(ctx: Ctx) -> None:
    ctx.step(2).unlink()
    assert len(ctx.load()) == 2


def _old_format(ctx: Ctx) -> None:
    for path in sorted((ctx.run / "steps").iterdir()):
        rewrite(path, checksums=False)
    m = json.loads((ctx.run / "manifest.json").read_text())
    (ctx.run / "manifest.json").write_text(json.dumps({**m, "format_version": 2}))
    ctx.load().update(1)


def _numpy_steps(ctx: Ctx) -> None:
    run = ctx.load()
    ref = run.update(1)
    for t in (np.int64(1), np.int32(1), np.uint8(1), torch.tensor(1), np.array(1)):
        assert all(torch.equal(run.update(t)[n], ref[n]) for n in ref)
    assert run.params(torch.tensor(5)).keys() == ref.keys()


def _constant_column_probe(ctx: Ctx) -> None:
    torch.manual_seed(0)
    x = torch.randn(200, 4)
    x[:, 2] = 3.0
    feat = probes.fit_probe(x, x[:, 0] > 0, name="f", site="s")
    assert feat.read[2] == 0 and feat.metadata["weight_norm"] < 100


def _acts() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(100, 4)
    return x, x[:, 0] > 0


def _fit(**kw: Any) -> Any:
    x, y = _acts()
    args = {"name": "f", "site": "s", **kw}
    return probes.fit_probe(args.pop("acts", x), args.pop("labels", y), **args)


def _features_dir(ctx: Ctx) -> Path:
    fs = probes.FeatureSet([
        _fit(),
        probes.Feature(name="g", site="s", read=torch.tensor([0.0, 1.0, 0.0, 0.0]), source="custom"),
    ])
    return fs.save(ctx.tmp / "features")


def _edit_features_json(ctx: Ctx, edit: Callable[[dict], Any]) -> Any:
    path = _features_dir(ctx)
    header = json.loads((path / "features.json").read_text())
    new = edit(header)
    (path / "features.json").write_text(new if isinstance(new, str) else json.dumps(new))
    return probes.FeatureSet.load(path)


def _edit_feature_tensors(ctx: Ctx, edit: Callable[[dict], None]) -> Any:
    """Change the vectors and re-hash them: the files agree, the reader must check the content."""
    import hashlib

    from safetensors.torch import load, save

    path = _features_dir(ctx)
    tensors = load((path / "features.safetensors").read_bytes())
    edit(tensors)
    blob = save(tensors, metadata={"format": "probes.FeatureSet"})
    (path / "features.safetensors").write_bytes(blob)
    header = json.loads((path / "features.json").read_text())
    header["tensors_sha256"] = hashlib.sha256(blob).hexdigest()
    (path / "features.json").write_text(json.dumps(header))
    return probes.FeatureSet.load(path)


def _flip_features(ctx: Ctx) -> Any:
    path = _features_dir(ctx)
    data = bytearray((path / "features.safetensors").read_bytes())
    data[-3] ^= 0x10
    (path / "features.safetensors").write_bytes(bytes(data))
    return probes.FeatureSet.load(path)


def _report_out(ctx: Ctx, out: str) -> tuple[int, str]:
    from tests.report.synthetic import make_run

    root = make_run(ctx.tmp / "demo")
    return ctx.cli("report", str(root), "--out", out)


# -- the catalogue ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    id: str
    call: Callable[[Ctx], Any]
    expect: Any  # exception class, warning class, CLI or OK
    words: str = ""


C = Case
M = ManifestError
CS = chisel.CorruptStepError
RC = chisel.RecordConfigError

CASES: list[Case] = [
    # record(): arguments
    C("record/model-dict", lambda c: c.record({"w": 1}, torch.optim.SGD(_model().parameters(), lr=0.1), c.tmp / "n"), RC, "model must be the torch nn.Module"),
    C("record/model-none", lambda c: c.record(None, c.model_opt()[1], c.tmp / "n"), RC, "not a NoneType"),
    C("record/run-dir-none", lambda c: c.record(*c.model_opt(), None), RC, "run_dir must be a directory path"),
    C("record/run-dir-int", lambda c: c.record(*c.model_opt(), 3), RC, "run_dir must be a directory path"),
    C("record/run-dir-empty", lambda c: c.record(*c.model_opt(), ""), RC, "run_dir must be a directory path"),
    C("record/optimizer-none", lambda c: c.record(_model(), None, c.tmp / "n"), RC, "no step hooks"),
    C("record/optimizer-of-another-model", _other_model_optimizer, RC, "None of the optimizer's 4 parameters belongs to the model"),
    C("record/optimizer-empty", lambda c: c.record(_model(), torch.optim.SGD([{"params": []}], lr=0.1), c.tmp / "n"), RC, "no parameters"),
    C("record/dtype-int8", lambda c: c.record(*c.model_opt(), c.tmp / "n", dtype="int8"), RC, "dtype='int8'"),
    C("record/factor-dtype-float8", lambda c: c.record(*c.model_opt(), c.tmp / "n", factor_dtype="float8"), RC, "factor_dtype='float8'"),
    C("record/optim-state-bogus", lambda c: c.record(*c.model_opt(), c.tmp / "n", optim_state="sometimes"), RC, "optim_state='sometimes'"),
    C("record/keyframe-every-negative", lambda c: c.record(*c.model_opt(), c.tmp / "n", keyframe_every=-1), RC, "keyframe_every=-1"),
    C("record/factors-every-zero", lambda c: c.record(*c.model_opt(), c.tmp / "n", factors_every=0), RC, "factors_every=0"),
    C("record/queue-size-zero", lambda c: c.record(*c.model_opt(), c.tmp / "n", queue_size=0), RC, "queue_size=0"),
    C("record/factors-ints", lambda c: c.record(*c.model_opt(), c.tmp / "n", factors=[1, 2]), RC, "list of module names"),
    C("record/factors-unknown-name", lambda c: c.record(*c.model_opt(), c.tmp / "n", factors=["nope"]), chisel.UnknownModuleError, "no module 'nope'.*'0', '2'"),
    C("record/factors-string-is-one-name", lambda c: c.record(*c.model_opt(), c.tmp / "n", factors="fc"), chisel.UnknownModuleError, "no module 'fc'"),
    C("record/factors-string-ok", lambda c: c.record(*c.model_opt(), c.tmp / "n", factors="2"), OK),
    C("record/factors-tanh", lambda c: c.record(*c.model_opt(), c.tmp / "n", factors=["1"]), chisel.UnknownModuleError, "is a Tanh"),
    C("record/factors-mha-out-proj", lambda c: _record_mixed(c, ["mha.out_proj"]), chisel.UnknownModuleError, "inside nn.MultiheadAttention"),
    C("record/factors-true-skips-named", lambda c: _record_mixed(c, True), FactorsSkippedWarning, r"for conv \(Conv1d\), mha \(MultiheadAttention\), lstm \(LSTM\) "),
    C("record/metadata-object", lambda c: c.record(*c.model_opt(), c.tmp / "n", metadata={"x": object()}), RC, "metadata must be JSON-able"),
    C("record/metadata-tensor", lambda c: c.record(*c.model_opt(), c.tmp / "n", metadata={"t": torch.ones(2)}), RC, r"\.tolist\(\)"),
    C("record/metadata-leaves-nothing", lambda c: _raises_and_leaves_nothing(c, RC, metadata={1j: 1}), OK),
    # record(): the run directory
    C("record/run-dir-is-a-file", lambda c: ((c.tmp / "f").write_text("x"), c.record(*c.model_opt(), c.tmp / "f")), chisel.RunExistsError, "is a file"),
    C("record/run-dir-under-a-file", lambda c: ((c.tmp / "f").write_text("x"), c.record(*c.model_opt(), c.tmp / "f" / "sub")), chisel.WriterError, "cannot set up the run directory"),
    C("record/read-only-dir", _read_only_dir, chisel.WriterError, "Permission denied.*writable run_dir"),
    C("record/existing-run", lambda c: c.record(*c.model_opt(), c.run), chisel.RunExistsError, "already holds a run.*overwrite=True"),
    C("record/overwrite-and-resume", lambda c: c.record(*c.model_opt(), c.run, overwrite=True, resume=True), chisel.RunExistsError, "either overwrite=True or resume=True"),
    C("record/overwrite-non-run", lambda c: ((c.tmp / "d").mkdir(), (c.tmp / "d" / "p.txt").write_text("x"), c.record(*c.model_opt(), c.tmp / "d", overwrite=True)), chisel.RunExistsError, "not a chisel run.*will not delete"),
    C("record/overwrite-through-symlink", _symlinked_overwrite, chisel.RunExistsError, "symbolic link.*will not delete"),
    C("record/resume-sweeps-no-symlink", _resume_does_not_sweep_through_symlinks, OK),
    C("record/killed-start-cleared", _killed_start_is_cleared, OK),
    C("record/full-disk-at-start", lambda c: _failed_start_leaves_nothing(c, True), chisel.WriterError, "No space left.*Nothing was left behind"),
    C("record/resume-missing-dir", lambda c: _resume(c, run_dir=c.tmp / "missing"), chisel.NotARunError, "resume=True, but .* holds no chisel run"),
    C("record/resume-empty-dir", lambda c: ((c.tmp / "e").mkdir(), _resume(c, run_dir=c.tmp / "e")), chisel.NotARunError, "holds no chisel run"),
    C("record/resume-other-architecture", lambda c: _resume(c, nn.Sequential(nn.Linear(6, 5))), chisel.ResumeMismatchError, "parameters differ"),
    C("record/resume-other-optimizer", lambda c: _resume(c, opt_cls=torch.optim.SGD), chisel.ResumeMismatchError, "SGD optimizer, but .* recorded with Adam"),
    C("record/resume-damaged-manifest", lambda c: ((c.run / "manifest.json").write_text("[]"), _resume(c)), M, "holds a JSON list"),
    # tag
    C("tag/after-with", _tag_after_with, chisel.TagError, r"rec.tag\(reward\) after the recorder .* was closed"),
    C("tag/wrong-length", lambda c: _tag_in_step(c, advantage=torch.ones(3)), chisel.TagError, "'advantage' has 3 values.*batch sizes \\[4\\]"),
    C("tag/two-dims", lambda c: _tag_in_step(c, mask=torch.ones(4, 2)), chisel.TagError, "one value per sample"),
    C("tag/object", lambda c: _tag_in_step(c, blob=object()), chisel.TagError, "not supported"),
    C("tag/dict", lambda c: _tag_in_step(c, d={"a": 1}), chisel.TagError, "not supported"),
    C("tag/complex", lambda c: _tag_in_step(c, z=torch.ones(4, dtype=torch.complex64)), chisel.TagError, "not supported"),
    C("tag/empty-list", lambda c: _tag_in_step(c, e=[]), chisel.TagError, "has 0 values"),
    C("tag/bad-name", lambda c: _tag_in_step(c, **{"a b": 1}), chisel.TagError, "must be an identifier"),
    C("tag/nan-scalar-ok", lambda c: _tag_in_step(c, reward=float("nan")), OK),
    # load / Run: the path
    C("load/none", lambda c: chisel.load(None), chisel.NotARunError, "must be a path"),
    C("load/int", lambda c: chisel.load(3), chisel.NotARunError, "must be a path"),
    C("load/missing", lambda c: chisel.load(c.tmp / "missing"), chisel.NotARunError, "manifest.json is missing"),
    C("load/a-file", lambda c: ((c.tmp / "f").write_text("x"), chisel.load(c.tmp / "f")), chisel.NotARunError, "manifest.json is missing"),
    C("load/empty-dir", lambda c: chisel.load(c.tmp), chisel.NotARunError, "manifest.json is missing"),
    # the manifest as a whole
    C("manifest/empty", lambda c: c.manifest(lambda m: ""), M, "is empty"),
    C("manifest/whitespace", lambda c: c.manifest(lambda m: "  \n"), M, "is empty"),
    C("manifest/invalid-json", lambda c: c.manifest(lambda m: '{"format_version": 3,'), M, "not valid JSON"),
    C("manifest/truncated", lambda c: c.manifest(lambda m: json.dumps(m)[:200]), M, "not valid JSON"),
    C("manifest/binary", lambda c: ((c.run / "manifest.json").write_bytes(b"\xff\xfe\x00"), c.load()), M, "not text"),
    C("manifest/list", lambda c: c.manifest(lambda m: [m]), M, "holds a JSON list, not an object"),
    C("manifest/string", lambda c: c.manifest(lambda m: '"run"'), M, "holds a JSON str"),
    C("manifest/null", lambda c: c.manifest(lambda m: "null"), M, "not an object"),
    C("manifest/number", lambda c: c.manifest(lambda m: "3"), M, "holds a JSON int"),
    # format_version
    C("manifest/version-99", lambda c: c.manifest(lambda m: {**m, "format_version": 99}), M, "format_version 99.*newer chisel.*pip install -U"),
    C("manifest/version-missing", lambda c: c.manifest(lambda m: _drop(m, "format_version")), M, "format_version: missing"),
    C("manifest/version-string", lambda c: c.manifest(lambda m: {**m, "format_version": "3"}), M, "format_version: '3' is a str"),
    C("manifest/version-bool", lambda c: c.manifest(lambda m: {**m, "format_version": True}), M, "format_version: True is a bool"),
    C("manifest/version-float", lambda c: c.manifest(lambda m: {**m, "format_version": 3.0}), M, "is a float"),
    C("manifest/version-1", lambda c: c.manifest(lambda m: {**m, "format_version": 1}), M, "older than this chisel reads.*re-record"),
    C("manifest/version-0", lambda c: c.manifest(lambda m: {**m, "format_version": 0}), M, "older than"),
    C("manifest/version-negative", lambda c: c.manifest(lambda m: {**m, "format_version": -3}), M, "older than"),
    C("manifest/version-2-unverified", _old_format, UnverifiedRunWarning, "format_version 2.*without verification"),
    # required sections
    C("manifest/params-missing", lambda c: c.manifest(lambda m: _drop(m, "params")), M, "params: missing"),
    C("manifest/config-missing", lambda c: c.manifest(lambda m: _drop(m, "config")), M, "config: missing"),
    C("manifest/layout-missing", lambda c: c.manifest(lambda m: _drop(m, "layout")), M, "layout: missing"),
    C("manifest/model-missing", lambda c: c.manifest(lambda m: _drop(m, "model")), M, "model: missing"),
    C("manifest/optimizer-missing", lambda c: c.manifest(lambda m: _drop(m, "optimizer")), M, "optimizer: missing"),
    C("manifest/params-and-config-missing", lambda c: c.manifest(lambda m: _drop(m, "params", "config")), M, "params: missing.*and 1 more"),
    C("manifest/empty-object", lambda c: c.manifest(lambda m: {}), M, "format_version: missing"),
    # params
    C("manifest/params-object", lambda c: c.manifest(lambda m: _set(m, "params", {})), M, "params: a dict, not a list"),
    C("manifest/params-null", lambda c: c.manifest(lambda m: _set(m, "params", None)), M, "params: a null"),
    C("manifest/param-not-object", lambda c: c.manifest(lambda m: _set(m, "params.1", 7)), M, r"params\[1\]: a int, not an object"),
    C("manifest/param-name-missing", lambda c: c.manifest(lambda m: (_drop(m["params"][0], "name"), m)[1]), M, r"params\[0\]\.name: None"),
    C("manifest/param-name-empty", lambda c: c.manifest(lambda m: _set(m, "params.0.name", "")), M, r"params\[0\]\.name: ''"),
    C("manifest/param-name-number", lambda c: c.manifest(lambda m: _set(m, "params.0.name", 5)), M, r"params\[0\]\.name: 5"),
    C("manifest/param-name-duplicate", lambda c: c.manifest(lambda m: _set(m, "params.1.name", "0.weight")), M, "'0.weight' is listed twice"),
    C("manifest/param-renamed", lambda c: c.manifest(lambda m: _rename_param(m, False)), M, r"layout\.entries\[0\].*name, shape or dtype in 'params' was edited"),
    C("manifest/param-renamed-everywhere", lambda c: c.manifest(lambda m: _rename_param(m, True)), M, "'renamed.weight' has shape.*keyframe.*no such tensor"),
    C("manifest/shape-string", lambda c: c.manifest(lambda m: _set(m, "params.0.shape", "16x6")), M, r"params\[0\] \('0.weight'\)\.shape: '16x6'"),
    C("manifest/shape-negative", lambda c: c.manifest(lambda m: _set(m, "params.0.shape", [-16, 6])), M, r"\.shape: \[-16, 6\] is not a list of sizes"),
    C("manifest/shape-float", lambda c: c.manifest(lambda m: _set(m, "params.0.shape", [16.0, 6])), M, r"\.shape: \[16.0, 6\]"),
    C("manifest/shape-bool", lambda c: c.manifest(lambda m: _set(m, "params.0.shape", [True, 6])), M, r"\.shape: \[True, 6\]"),
    C("manifest/shape-wrong-size-first", lambda c: c.manifest(lambda m: _set(m, "params.0.shape", [16, 5])), M, r"layout\.entries\[1\].*edited"),
    C("manifest/shape-wrong-size-last", lambda c: c.manifest(lambda m: _set(m, "params.3.shape", [4])), M, r"layout\.groups.*a shape in 'params' was edited"),
    C("manifest/shape-transposed", lambda c: c.manifest(lambda m: _set(m, "params.0.shape", [6, 16])), M, r"params\[0\] says '0.weight' has shape \[6, 16\].*\[16, 6\]"),
    C("manifest/shape-flattened", lambda c: c.manifest(lambda m: _set(m, "params.0.shape", [96])), M, r"shape \[96\].*\[16, 6\]"),
    C("manifest/dtype-unknown", lambda c: c.manifest(lambda m: _set(m, "params.0.dtype", "float8")), M, r"\.dtype: 'float8' is not one of"),
    C("manifest/dtype-missing", lambda c: c.manifest(lambda m: (_drop(m["params"][0], "dtype"), m)[1]), M, r"\.dtype: None"),
    C("manifest/dtype-int64", lambda c: c.manifest(lambda m: _set(m, "params.0.dtype", "int64")), M, r"\.dtype: 'int64'"),
    C("manifest/dtype-other-float", lambda c: c.manifest(lambda m: _set(m, "params.0.dtype", "float64")), M, r"layout\.entries\[0\]"),
    C("manifest/encoding-unknown", lambda c: c.manifest(lambda m: _set(m, "params.0.encoding", "zip")), M, r"\.encoding: 'zip'"),
    # layout, config and the rest
    C("manifest/layout-list", lambda c: c.manifest(lambda m: _set(m, "layout", [])), M, "layout: a list"),
    C("manifest/layout-entries-short", lambda c: c.manifest(lambda m: _set(m, "layout.entries", m["layout"]["entries"][:2])), M, "layout.entries: 2 entries for 4 params"),
    C("manifest/layout-offset-edited", lambda c: c.manifest(lambda m: _set(m, "layout.entries.1.2", 7)), M, r"layout\.entries\[1\]"),
    C("manifest/layout-groups-edited", lambda c: c.manifest(lambda m: _set(m, "layout.groups.float32", 1)), M, "layout.groups"),
    C("manifest/config-list", lambda c: c.manifest(lambda m: _set(m, "config", [])), M, "config: a list, not the RecordConfig"),
    C("manifest/config-dtype", lambda c: c.manifest(lambda m: _set(m, "config.dtype", "int8")), M, "config.dtype: 'int8'"),
    C("manifest/config-dtype-missing", lambda c: c.manifest(lambda m: (_drop(m["config"], "dtype"), m)[1]), M, "config.dtype: None"),
    C("manifest/config-factor-dtype", lambda c: c.manifest(lambda m: _set(m, "config.factor_dtype", "q4")), M, "config.factor_dtype: 'q4'"),
    C("manifest/config-grads-string", lambda c: c.manifest(lambda m: _set(m, "config.grads", "yes")), M, "config.grads: 'yes' is not true/false"),
    C("manifest/config-optim-state", lambda c: c.manifest(lambda m: _set(m, "config.optim_state", "x")), M, "config.optim_state: 'x'"),
    C("manifest/config-keyframe-every", lambda c: c.manifest(lambda m: _set(m, "config.keyframe_every", -1)), M, "config.keyframe_every: -1"),
    C("manifest/model-string", lambda c: c.manifest(lambda m: _set(m, "model", "MLP")), M, "model: str, not an object with a 'class'"),
    C("manifest/model-class-missing", lambda c: c.manifest(lambda m: _set(m, "model", {})), M, "model: dict, not an object with a 'class'"),
    C("manifest/optimizer-class-number", lambda c: c.manifest(lambda m: _set(m, "optimizer.class", 1)), M, "optimizer: dict"),
    C("manifest/chisel-version-number", lambda c: c.manifest(lambda m: _set(m, "chisel_version", 1)), M, "chisel_version: 1 is not a version string"),
    C("manifest/frozen-string", lambda c: c.manifest(lambda m: _set(m, "frozen", "x")), M, "frozen: not a list"),
    C("manifest/factor-modules-list", lambda c: c.manifest(lambda m: _set(m, "factor_modules", [])), M, "factor_modules: not an object"),
    C("manifest/starts-object", lambda c: c.manifest(lambda m: _set(m, "starts", {})), M, "starts: a dict"),
    C("manifest/extra-field-ok", lambda c: c.manifest(lambda m: {**m, "note": "hand-added"}), OK),
    C("manifest/metadata-anything-ok", lambda c: c.manifest(lambda m: _set(m, "metadata", [1, 2])), OK),
    # step indices
    C("step/bool-true", lambda c: c.load().update(True), StepTypeError, "step True is a bool, not an integer"),
    C("step/bool-false", lambda c: c.load().params(False), StepTypeError, "bool"),
    C("step/numpy-bool", lambda c: c.load().update(np.bool_(True)), StepTypeError, "bool"),
    C("step/tensor-bool", lambda c: c.load().update(torch.tensor(True)), StepTypeError, "torch.bool"),
    C("step/string", lambda c: c.load().update("1"), StepTypeError, r"str.*int\('1'\)"),
    C("step/float", lambda c: c.load().update(1.0), StepTypeError, "float, not an integer"),
    C("step/float-tensor", lambda c: c.load().update(torch.tensor(1.0)), StepTypeError, "torch.float32"),
    C("step/many-values", lambda c: c.load().update(torch.tensor([1, 2])), StepTypeError, "Tensor"),
    C("step/none", lambda c: c.load().tags(None), StepTypeError, "NoneType"),
    C("step/numpy-and-0d-tensors-ok", _numpy_steps, OK),
    C("step/negative", lambda c: c.load().update(-1), chisel.StepOutOfRangeError, r"step -1 is outside.*0\.\.4"),
    C("step/past-end", lambda c: c.load().update(5), chisel.StepOutOfRangeError, r"step 5 is outside.*0\.\.4"),
    C("step/params-past-end", lambda c: c.load().params(6), chisel.StepOutOfRangeError, r"θ index 6.*0\.\.5"),
    C("step/numpy-past-end", lambda c: c.load().update(np.int64(9)), chisel.StepOutOfRangeError, "step 9 is outside"),
    # step files: damage caught by checksums
    C("file/flip-after", lambda c: (flip(c.step(2), "after/float32"), c.load().update(2)), CS, r"Step 2: tensor 'after/float32'.*000000002.*checksum.*re-record.*chisel verify"),
    C("file/flip-after-params", lambda c: (flip(c.step(3), "after/float32"), c.load().params(4)), CS, "Step 3: tensor 'after/float32'"),
    C("file/flip-grad", lambda c: (flip(c.step(1), "grad/float32"), c.load().grads(1)), CS, "Step 1: tensor 'grad/float32'.*checksum"),
    C("file/flip-factors", lambda c: (flip(c.step(1), "factors/float32", 40), c.load().factors(1)), CS, "Step 1: tensor 'factors/float32'"),
    C("file/flip-tag", lambda c: (flip(c.step(4), "tag/advantage"), c.load().tags(4)), CS, "Step 4: tensor 'tag/advantage'"),
    C("file/flip-keyframe", lambda c: (flip(c.keyframe(3), "param/2.weight"), c.load().params(3)), CS, "Step 3: tensor 'param/2.weight' of the keyframe"),
    C("file/flip-keyframe-state", lambda c: (flip(c.keyframe(3), "state/exp_avg/0.bias"), c.load().optimizer_state(3)), CS, "state/exp_avg/0.bias"),
    C("file/flip-ignored-without-verify", lambda c: (flip(c.step(2), "after/float32"), c.load(verify=False).update(2)), OK),
    C("file/no-checksums-in-v3", lambda c: (rewrite(c.step(2), checksums=False), c.load().update(2)), CS, "no checksums, though its run's format has them"),
    C("file/checksums-not-json", lambda c: (set_record(c.step(2), json.dumps({"step": 2})), _add_meta(c.step(2), "{"), c.load().update(2)), CS, "checksums are not JSON"),
    # step files: unreadable
    C("file/truncated", lambda c: (c.step(2).write_bytes(c.step(2).read_bytes()[:300]), c.load().update(2)), CS, r"step 2 cannot be read.*000000002"),
    C("file/garbage", lambda c: (c.step(2).write_bytes(b"\x13" * 64), c.load().update(2)), CS, "step 2 cannot be read"),
    C("file/empty", lambda c: (c.step(2).write_bytes(b""), c.load().update(2)), CS, "step 2 cannot be read"),
    C("file/a-directory", lambda c: (c.step(2).unlink(), c.step(2).mkdir(), c.load().update(2)), CS, "step 2 cannot be read"),
    C("file/garbage-steps-table", lambda c: (c.step(2).write_bytes(b"x"), c.load().steps), UserWarning, "step 2"),
    C("file/keyframe-garbage", lambda c: (c.keyframe(3).write_bytes(b"x" * 9), c.load().params(3)), CS, "keyframe file of step 3 cannot be read"),
    C("file/gap", _gap, MissingStepsWarning, r"step 2 is missing while 2 later step files \(3\.\.4\)"),
    C("file/gap-out-of-range", lambda c: (c.step(1).unlink(), c.load().update(3)), chisel.StepOutOfRangeError, "step 3 is outside.*step 1 is missing"),
    C("file/permission-denied", lambda c: _denied(c, lambda: c.load().update(2)), CS, "step 2 cannot be read.*permission denied.*chmod"),
    C("load/dir-permission-denied", lambda c: _denied(c, c.load, directory=True), M, "cannot be read: permission denied"),
    C("file/keyframe-0-missing", lambda c: (c.keyframe(0).unlink(), c.load().params(0)), chisel.ChiselError, "no keyframe at or before step 0"),
    # step files: self-consistent but wrong content (fresh checksums)
    C("step-record/not-json", lambda c: (set_record(c.step(2), "{"), c.load().update(2)), CS, "record is not JSON"),
    C("step-record/a-list", lambda c: (set_record(c.step(2), "[]"), c.load().update(2)), CS, "record is a JSON list"),
    C("step-record/other-step", lambda c: (rewrite(c.step(2), edit_meta=lambda m: {**m, "step": 3}), c.load().update(2)), CS, "step: 3, but the file is step 2"),
    C("step-record/skipped-string", lambda c: (rewrite(c.step(2), edit_meta=lambda m: {**m, "skipped": "no"}), c.load().update(2)), CS, "skipped: 'no'"),
    C("step-record/lr-string", lambda c: (rewrite(c.step(2), edit_meta=lambda m: {**m, "lr": "fast"}), c.load().record(2)), CS, "lr: 'fast' is not a number"),
    C("step-record/tags-list", lambda c: (rewrite(c.step(2), edit_meta=lambda m: {**m, "tags": []}), c.load().tags(2)), CS, "tags: not an object"),
    C("step-record/factor-calls-bad", lambda c: (rewrite(c.step(2), edit_meta=lambda m: {**m, "factor_calls": {"0": "x"}}), c.load().factors(2)), CS, "factor_calls"),
    C("step-record/factor-layout-missing", lambda c: (rewrite(c.step(2), edit_meta=lambda m: {**m, "factor_calls": {"0": 2}}), c.load().factors(2)), CS, "'X/0/1' is missing"),
    C("step-record/factor-out-of-range", lambda c: (rewrite(c.step(2), edit_meta=_factor_far), c.load().factors(2)), CS, "lies outside its stored vector"),
    C("step-record/tag-tensor-missing", lambda c: (rewrite(c.step(2), edit_tensors=lambda t: _drop(t, "tag/advantage")), c.load().tags(2)), CS, r"per-sample tags \['advantage'\]"),
    C("tensor/after-wrong-size", lambda c: (rewrite(c.step(2), edit_tensors=lambda t: {**t, "after/float32": t["after/float32"][:-1]}), c.load().update(2)), CS, "after/float32.*holds 162 values.*layout says 163"),
    C("tensor/after-missing", lambda c: (rewrite(c.step(2), edit_tensors=lambda t: _drop(t, "after/float32")), c.load().update(2)), CS, "has no after/"),
    C("tensor/grad-missing", lambda c: (rewrite(c.step(2), edit_tensors=lambda t: _drop(t, "grad/float32")), c.load().grads(2)), CS, "has no grad/"),
    C("tensor/after-2d", lambda c: (rewrite(c.step(2), edit_tensors=lambda t: {**t, "after/float32": t["after/float32"][None]}), c.load().update(2)), CS, "holds 163 values"),
    C("keyframe/param-missing", lambda c: (rewrite(c.keyframe(3), edit_tensors=lambda t: _drop(t, "param/0.bias")), c.load().params(3)), CS, "no such tensor for parameter '0.bias'"),
    C("keyframe/param-reshaped", lambda c: (rewrite(c.keyframe(3), edit_tensors=lambda t: {**t, "param/0.weight": t["param/0.weight"].T.contiguous()}), c.load().params(3)), CS, r"shape \[6, 16\] for parameter '0.weight'"),
    C("keyframe/first-reshaped", lambda c: (rewrite(c.keyframe(0), edit_tensors=lambda t: {**t, "param/0.weight": t["param/0.weight"].T.contiguous()}), c.load()), M, r"keyframe 000000000.safetensors has shape \[6, 16\]"),
    C("run/grads-off", lambda c: (c.manifest(lambda m: _set(m, "config.grads", False)).grads(1)), chisel.ChiselError, "grads=False"),
    C("run/no-optimizer-state", lambda c: c.load().optimizer_state(1), chisel.ChiselError, "No optimizer state is stored before step 1"),
    # chisel verify, chisel info, chisel report (one line, exit 2)
    C("cli/info-missing", lambda c: c.cli("info", str(c.tmp / "missing")), CLI, "manifest.json is missing"),
    C("cli/info-list-manifest", lambda c: ((c.run / "manifest.json").write_text("[]"), c.cli("info", str(c.run)))[1], CLI, "holds a JSON list"),
    C("cli/info-invalid-json", lambda c: ((c.run / "manifest.json").write_text("{"), c.cli("info", str(c.run)))[1], CLI, "not valid JSON"),
    C("cli/info-params-missing", lambda c: (_write_manifest(c, lambda m: _drop(m, "params")), c.cli("info", str(c.run)))[1], CLI, "params: missing"),
    C("cli/info-version-99", lambda c: ((c.run / "manifest.json").write_text('{"format_version": 99}'), c.cli("info", str(c.run)))[1], CLI, "format_version 99"),
    C("cli/info-a-file", lambda c: ((c.tmp / "f").write_text("x"), c.cli("info", str(c.tmp / "f")))[1], CLI, "is missing"),
    C("cli/verify-missing", lambda c: c.cli("verify", str(c.tmp / "missing")), CLI, "manifest.json is missing"),
    C("cli/verify-binary-manifest", lambda c: ((c.run / "manifest.json").write_bytes(b"\xff"), c.cli("verify", str(c.run)))[1], CLI, "not text"),
    C("cli/verify-damaged", lambda c: (flip(c.step(1), "grad/float32"), _verify_exit(c, "grad/float32", 2))[1], OK),
    C("cli/verify-clean", lambda c: _verify_exit(c, "OK", 0, stream="out"), OK),
    C("cli/report-missing", lambda c: c.cli("report", str(c.tmp / "missing")), CLI, "manifest.json is missing"),
    C("cli/report-out-unwritable", lambda c: _report_out(c, "/proc/x.html"), CLI, r"/proc"),
    C("cli/report-out-under-a-file", lambda c: ((c.tmp / "f").write_text("x"), _report_out(c, str(c.tmp / "f" / "r.html")))[1], CLI, "cannot|not a directory"),
    C("cli/unknown-command", lambda c: _argparse_exit(c, "bogus"), OK),
    C("cli/info-no-argument", lambda c: _argparse_exit(c, "info"), OK),
    # probes.fit_probe
    C("probe/l2-negative", lambda c: _fit(l2=-1), ProbeFitError, "l2 must be a finite number >= 0.*-1"),
    C("probe/l2-nan", lambda c: _fit(l2=float("nan")), ProbeFitError, "l2 must be"),
    C("probe/l2-inf", lambda c: _fit(l2=float("inf")), ProbeFitError, "l2 must be"),
    C("probe/l2-string", lambda c: _fit(l2="0.1"), ProbeFitError, "l2 must be"),
    C("probe/max-iter-zero", lambda c: _fit(max_iter=0), ProbeFitError, "max_iter must be"),
    C("probe/constant-acts", lambda c: _fit(acts=torch.full((100, 4), 0.37)), ProbeFitError, "constant across all 100 samples"),
    C("probe/constant-acts-noise", lambda c: _fit(acts=torch.full((100, 4), 0.37) + torch.randn(100, 1) * 1e-9), ProbeFitError, "constant"),
    C("probe/zero-acts", lambda c: _fit(acts=torch.zeros(100, 4)), ProbeFitError, "constant"),
    C("probe/constant-column-ok", _constant_column_probe, OK),
    C("probe/acts-1d", lambda c: _fit(acts=torch.randn(100)), ProbeFitError, r"acts must be a float tensor \[n, d\]"),
    C("probe/acts-int", lambda c: _fit(acts=torch.ones(100, 4, dtype=torch.long)), ProbeFitError, "torch.int64"),
    C("probe/labels-length", lambda c: _fit(labels=torch.ones(7)), ProbeFitError, r"labels must be \[n\] = \[100\]"),
    C("probe/acts-nan", lambda c: _fit(acts=torch.full((100, 4), float("nan"))), ProbeFitError, "NaN or inf"),
    C("probe/one-class", lambda c: _fit(labels=torch.ones(100, dtype=torch.long)), ProbeFitError, "single class"),
    C("probe/test-fraction-1", lambda c: _fit(test_fraction=1.0), ProbeFitError, "test_fraction must be in"),
    C("probe/kind-unknown", lambda c: _fit(kind="svm"), ProbeFitError, "kind must be"),
    C("probe/logistic-float-labels", lambda c: _fit(kind="logistic", labels=torch.rand(100)), ProbeFitError, "non-integer floats"),
    # FeatureSet files
    C("features/missing-dir", lambda c: probes.FeatureSet.load(c.tmp / "missing"), FeatureFileError, "not found.*a saved FeatureSet is a directory"),
    C("features/a-file", lambda c: ((c.tmp / "f").write_text("x"), probes.FeatureSet.load(c.tmp / "f"))[1], FeatureFileError, "not found"),
    C("features/json-is-a-dir", lambda c: (shutil.rmtree(_features_dir(c)), (c.tmp / "features" / "features.json").mkdir(parents=True), probes.FeatureSet.load(c.tmp / "features"))[2], FeatureFileError, "cannot be read"),
    C("features/invalid-json", lambda c: _edit_features_json(c, lambda h: "{"), FeatureFileError, "not valid JSON"),
    C("features/list", lambda c: _edit_features_json(c, lambda h: [h]), FeatureFileError, "not a probes.FeatureSet file"),
    C("features/version-99", lambda c: _edit_features_json(c, lambda h: {**h, "version": 99}), FeatureFileError, "format version 99"),
    C("features/features-missing", lambda c: _edit_features_json(c, lambda h: _drop(h, "features")), FeatureFileError, "'features' list or checksum missing"),
    C("features/entry-extra-key", lambda c: _edit_features_json(c, lambda h: (h["features"][0].update(x=1), h)[1]), FeatureFileError, "expected keys"),
    C("features/entry-not-object", lambda c: _edit_features_json(c, lambda h: _set(h, "features.0", 3)), FeatureFileError, "expected keys"),
    C("features/source-unknown", lambda c: _edit_features_json(c, lambda h: _set(h, "features.0.source", "magic")), FeatureFileError, "source 'magic'"),
    C("features/dim-wrong", lambda c: _edit_features_json(c, lambda h: _set(h, "features.0.dim", 5)), FeatureFileError, "json says dim 5"),
    C("features/dtype-wrong", lambda c: _edit_features_json(c, lambda h: _set(h, "features.0.dtype", "float64")), FeatureFileError, "json says dim 4 float64"),
    C("features/name-empty", lambda c: _edit_features_json(c, lambda h: _set(h, "features.0.name", "")), FeatureFileError, "name must be a non-empty"),
    C("features/names-duplicate", lambda c: _edit_features_json(c, lambda h: _set(h, "features.1.name", h["features"][0]["name"])), FeatureFileError, "'f'"),
    C("features/bias-string", lambda c: _edit_features_json(c, lambda h: _set(h, "features.0.bias", "x")), FeatureFileError, "bias 'x' is not a number"),
    C("features/has-write-without-tensor", lambda c: _edit_features_json(c, lambda h: _set(h, "features.0.has_write", True)), FeatureFileError, "vectors are missing"),
    C("features/tensors-flipped", _flip_features, FeatureFileError, "does not match the checksum"),
    C("features/tensors-missing", lambda c: ((_features_dir(c) / "features.safetensors").unlink(), probes.FeatureSet.load(c.tmp / "features"))[1], FeatureFileError, "features.safetensors not found"),
    C("features/zero-read", lambda c: _edit_feature_tensors(c, lambda t: t["read.1"].zero_()), FeatureFileError, "read vector is all zeros"),
    C("features/nan-read", lambda c: _edit_feature_tensors(c, lambda t: t["read.0"].fill_(float("nan"))), FeatureFileError, "NaN or inf"),
    C("features/extra-tensor", lambda c: _edit_feature_tensors(c, lambda t: t.update({"read.9": torch.ones(4)})), FeatureFileError, r"not listed in json: \['read.9'\]"),
    C("features/read-2d", lambda c: _edit_feature_tensors(c, lambda t: t.update({"read.0": torch.ones(2, 2)})), FeatureFileError, "the tensor file has shape"),
]


def _denied(ctx: Ctx, call: Callable[[], Any], directory: bool = False) -> Any:
    """As if a file (or the run directory) could not be read: the tests run as root, which
    permissions do not stop, so the refusal is simulated where chisel meets it."""
    import os

    real_open, real_access = layout_module.safe_open, layout_module.os.access
    target = ctx.run if directory else ctx.step(2)

    def refuse_open(path: str, *a: Any, **k: Any) -> Any:
        if Path(path) == target:
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return real_open(path, *a, **k)

    def refuse_access(path: Any, mode: int) -> bool:
        return Path(path) != target and real_access(path, mode)

    layout_module.safe_open = refuse_open
    os.access = refuse_access
    try:
        return call()
    finally:
        layout_module.safe_open = real_open
        os.access = real_access


def _write_manifest(ctx: Ctx, edit: Callable[[dict], Any]) -> None:
    path = ctx.run / "manifest.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))


def _raises_and_leaves_nothing(ctx: Ctx, error: type, **options: Any) -> None:
    with pytest.raises(error):
        ctx.record(*ctx.model_opt(), ctx.tmp / "n", **options)
    assert not (ctx.tmp / "n").exists()


def _add_meta(path: Path, checksums: str) -> None:
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        meta = dict(f.metadata())
    save_file(tensors, str(path), metadata={**meta, "checksums": checksums})


def _factor_far(record: dict) -> dict:
    key = next(iter(record["factor_layout"]))
    record["factor_layout"][key][1] = 10**6
    return record


def _verify_exit(ctx: Ctx, words: str, rc: int, stream: str = "err") -> None:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        got = cli_main(["verify", str(ctx.run)])
    assert got == rc, (got, out.getvalue(), err.getvalue())
    assert words in out.getvalue() + err.getvalue()


def _argparse_exit(ctx: Ctx, *args: str) -> None:
    rc, err = ctx.cli(*args)
    assert rc == 2 and "Traceback" not in err and "usage: chisel" in err


# -- running a case -----------------------------------------------------------------------------
CLEAR_ERROR, CLEAR_WARNING, RESULT = "clear error", "clear warning", "correct result"
RAW, SILENT = "raw or misleading error", "accepted silently"


def _is_warning(expect: Any) -> bool:
    return isinstance(expect, type) and issubclass(expect, Warning)


def outcome(case: Case, ctx: Ctx) -> tuple[str, str]:
    """(category, detail) of running one case."""
    words = re.compile(case.words, re.IGNORECASE | re.DOTALL)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            value = case.call(ctx)
        except (Exception, SystemExit) as err:  # the catalogue classifies every exception
            if (
                isinstance(case.expect, type)
                and not _is_warning(case.expect)
                and isinstance(err, case.expect)
                and words.search(str(err).replace(str(ctx.tmp), "<tmp>"))
            ):
                return CLEAR_ERROR, ""
            return RAW, f"{type(err).__name__}: {err}"[:600]
    if case.expect == CLI:
        rc, err = value
        lines = err.strip().splitlines()
        good = (
            rc == 2 and len(lines) == 1 and lines[0].startswith("chisel: error: ")
            and words.search(lines[0].replace(str(ctx.tmp), "<tmp>"))
        )
        if good:
            return CLEAR_ERROR, ""
        return (SILENT if rc == 0 else RAW), f"exit {rc}: {err[-600:]}"
    if _is_warning(case.expect):
        for w in caught:
            if issubclass(w.category, case.expect) and words.search(
                str(w.message).replace(str(ctx.tmp), "<tmp>")
            ):
                return CLEAR_WARNING, ""
        return SILENT, f"no {case.expect.__name__} matching {case.words!r}: {[str(w.message)[:200] for w in caught]}"
    if case.expect == OK:
        return RESULT, ""
    return SILENT, "no error"


def _expected(case: Case) -> str:
    if case.expect == OK:
        return RESULT
    return CLEAR_WARNING if _is_warning(case.expect) else CLEAR_ERROR


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return _record_pristine(tmp_path_factory.mktemp("catalogue") / "run")


def test_catalogue_ids_are_unique():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)), [i for i, n in Counter(ids).items() if n > 1]
    assert len(CASES) >= 150


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, pristine: Path, tmp_path: Path) -> None:
    got, detail = outcome(case, Ctx(tmp_path, pristine))
    assert got == _expected(case), f"{case.id}: {got}: {detail}"


def counts() -> Counter:
    """Run every case in a temporary folder; count the outcomes (for the issue's note)."""
    result: Counter = Counter()
    with tempfile.TemporaryDirectory() as tmp:
        pristine = _record_pristine(Path(tmp) / "pristine")
        for i, case in enumerate(CASES):
            case_tmp = Path(tmp) / f"case{i}"
            case_tmp.mkdir()
            got, detail = outcome(case, Ctx(case_tmp, pristine))
            result[got] += 1
            if got != _expected(case):
                print(f"  {case.id}: {got}: {detail[:160]}", file=sys.stderr)
    return result


if __name__ == "__main__":
    torch.set_num_threads(1)
    tally = counts()
    print(f"{len(CASES)} cases: " + ", ".join(f"{k}: {v}" for k, v in tally.most_common()))
