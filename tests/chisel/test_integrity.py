"""Every byte verified: checksums of step files and keyframes, `chisel verify`, the manifest
schema, step indices, and a gap in the step files."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import chisel
from chisel import _names as N
from chisel.cli import main
from chisel.errors import ManifestError, MissingStepsWarning, StepTypeError, UnverifiedRunWarning
from chisel.store.verify import verify_run
from tests.chisel.helpers import mlp


def _record(path: Path, steps: int = 5, **options) -> list[dict[str, torch.Tensor]]:
    model = mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    observed = []
    with chisel.record(model, optimizer, path, keyframe_every=3, factors=True, **options) as rec:
        for i in range(steps):
            model(torch.randn(4, 6)).pow(2).mean().backward()
            rec.tag(advantage=torch.randn(4), episode=i)
            before = {n: p.detach().double().clone() for n, p in model.named_parameters()}
            optimizer.step()
            optimizer.zero_grad()
            observed.append({n: p.detach().double() - before[n] for n, p in model.named_parameters()})
    return observed


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> tuple[Path, list]:
    root = tmp_path_factory.mktemp("pristine") / "run"
    return root, _record(root)


@pytest.fixture
def run_dir(pristine, tmp_path) -> Path:
    import shutil

    return Path(shutil.copytree(pristine[0], tmp_path / "run"))


def _tensor_offset(path: Path, key: str) -> int:
    """Byte offset of a tensor's data inside a safetensors file."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    return 8 + n + header[key]["data_offsets"][0]


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def test_every_file_carries_checksums_of_its_tensors_and_record(run_dir):
    for folder in (N.STEPS_DIR, N.KEYFRAMES_DIR):
        for path in sorted((run_dir / folder).iterdir()):
            with safe_open(str(path), framework="pt") as f:
                sums = json.loads(f.metadata()[N.CHECKSUM_KEY])
                assert sums["algorithm"] == "crc32"
                assert set(sums["tensors"]) == set(f.keys())
    assert json.loads((run_dir / N.MANIFEST).read_text())["format_version"] == N.FORMAT_VERSION == 3


def test_a_flipped_byte_in_a_tensor_is_a_corrupt_step_error_naming_step_file_and_fix(run_dir, pristine):
    path = run_dir / "steps" / "000000002.safetensors"
    _flip(path, _tensor_offset(path, "after/float32") + 17)
    run = chisel.load(run_dir)
    with pytest.raises(chisel.CorruptStepError, match=r"Step 2: tensor 'after/float32'.*000000002\.safetensors"
                       r".*does not match its checksum.*re-record.*chisel verify.*verify=False"):
        run.update(2)
    for t in (0, 1, 3, 4):  # the other steps stay exact
        assert all(torch.equal(run.update(t)[n], pristine[1][t][n]) for n in run.param_names)
    unchecked = chisel.load(run_dir, verify=False).update(2)  # read anyway, and it differs
    assert any(not torch.equal(unchecked[n], pristine[1][2][n]) for n in unchecked)


def test_a_flipped_byte_in_a_keyframe_and_in_a_record(run_dir):
    kf = run_dir / "keyframes" / "000000003.safetensors"
    _flip(kf, _tensor_offset(kf, "param/0.weight") + 5)
    run = chisel.load(run_dir)
    with pytest.raises(chisel.CorruptStepError, match=r"Step 3: tensor 'param/0.weight'.*keyframe"):
        run.params(3)
    step = run_dir / "steps" / "000000001.safetensors"
    data = step.read_bytes()
    at = data.index(b'\\"lr\\": ') + len(b'\\"lr\\": ')  # a digit of the learning rate
    step.write_bytes(data[:at] + (b"1" if data[at : at + 1] != b"1" else b"2") + data[at + 1 :])
    with pytest.raises(chisel.CorruptStepError, match=r"Step 1: the record .*does not match its checksum"):
        chisel.load(run_dir).record(1)


def test_a_version_2_run_without_checksums_loads_unverified_with_a_warning(run_dir, pristine):
    for path in (run_dir / "steps").iterdir():  # strip the checksums as chisel 2 wrote them
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
            meta = {N.RECORD_KEY: f.metadata()[N.RECORD_KEY]}
        save_file(tensors, str(path), metadata=meta)
    manifest = json.loads((run_dir / N.MANIFEST).read_text())
    manifest["format_version"] = 2
    (run_dir / N.MANIFEST).write_text(json.dumps(manifest))
    with pytest.warns(UnverifiedRunWarning, match="format_version 2.*without verification"):
        run = chisel.load(run_dir)
    assert all(torch.equal(run.update(1)[n], pristine[1][1][n]) for n in run.param_names)
    # the same files under format 3 lack the checksums the format promises
    manifest["format_version"] = 3
    (run_dir / N.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(chisel.CorruptStepError, match="no checksums"):
        chisel.load(run_dir).update(1)
    assert chisel.load(run_dir, verify=False).update(1).keys() == pristine[1][1].keys()


def test_verify_a_clean_run(run_dir, capsys):
    result = verify_run(run_dir)
    assert result.ok and result.steps == 5 and result.keyframes == 3
    assert main(["verify", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "OK" in out and "5 step files, 3 keyframes" in out


def test_verify_lists_every_damaged_file_and_exits_2(run_dir, capsys):
    step = run_dir / "steps" / "000000001.safetensors"
    _flip(step, _tensor_offset(step, "grad/float32"))
    kf = run_dir / "keyframes" / "000000003.safetensors"
    _flip(kf, _tensor_offset(kf, "param/2.bias"))
    (run_dir / "steps" / "000000004.safetensors").write_bytes(b"garbage")
    assert main(["verify", str(run_dir)]) == 2
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert len(lines) == 3, lines
    assert "000000001.safetensors" in lines[1] and "grad/float32" in lines[1]
    assert "keyframes/000000003.safetensors" in lines[0] and "param/2.bias" in lines[0]
    assert "000000004.safetensors" in lines[2]
    assert "3 problems" in captured.err


def test_verify_finds_a_gap_a_missing_keyframe_and_a_manifest_problem(run_dir, capsys):
    (run_dir / "steps" / "000000002.safetensors").unlink()
    (run_dir / "keyframes" / "000000000.safetensors").unlink()
    result = verify_run(run_dir)
    assert any("step 2 is missing" in p for p in result.problems)
    assert any("000000000.safetensors: missing" in p for p in result.problems)
    manifest = json.loads((run_dir / N.MANIFEST).read_text())
    manifest["params"][1]["dtype"] = "float8"
    (run_dir / N.MANIFEST).write_text(json.dumps(manifest))
    assert main(["verify", str(run_dir)]) == 2
    out = capsys.readouterr().out
    assert "params[1] ('0.bias').dtype: 'float8'" in out


def test_a_gap_in_the_step_files_is_named(run_dir):
    (run_dir / "steps" / "000000002.safetensors").unlink()
    run = chisel.load(run_dir)
    with pytest.warns(MissingStepsWarning, match=r"step 2 is missing while 2 later step files \(3\.\.4\)"):
        assert len(run) == 2
    with pytest.raises(chisel.StepOutOfRangeError, match="step 3 is outside.*step 2 is missing"):
        run.update(3)


@pytest.mark.parametrize("step", [np.int64(1), np.int32(1), torch.tensor(1), np.array(1), 1])
def test_steps_as_numpy_ints_and_0d_tensors(pristine, step):
    run = chisel.load(pristine[0])
    assert all(torch.equal(run.update(step)[n], pristine[1][1][n]) for n in run.param_names)
    assert set(run.params(step)) == set(run.param_names) and run.tags(step)["episode"] == 1


@pytest.mark.parametrize(
    "step, words",
    [
        (True, "step True is a bool"),
        (np.bool_(True), "bool"),
        (torch.tensor(True), "torch.bool"),
        ("1", r"str.*int\('1'\)"),
        (1.0, "float"),
        (torch.tensor([1, 2]), "Tensor"),
        (None, "NoneType"),
    ],
)
def test_steps_that_are_not_integers_are_refused(pristine, step, words):
    run = chisel.load(pristine[0])
    with pytest.raises(StepTypeError, match=words):
        run.update(step)
    with pytest.raises(StepTypeError):
        run.params(step)


def _edit_manifest(run_dir: Path, edit) -> None:
    manifest = json.loads((run_dir / N.MANIFEST).read_text())
    manifest = edit(manifest)
    (run_dir / N.MANIFEST).write_text(manifest if isinstance(manifest, str) else json.dumps(manifest))


def test_a_shape_edited_to_the_same_size_is_caught_at_load(run_dir):
    def transpose(m):
        m["params"][0]["shape"] = m["params"][0]["shape"][::-1]
        return m

    _edit_manifest(run_dir, transpose)
    with pytest.raises(ManifestError, match=r"params\[0\] says '0.weight' has shape \[6, 16\].*\[16, 6\]"):
        chisel.load(run_dir)


def test_a_manifest_from_a_newer_chisel_says_upgrade(run_dir):
    _edit_manifest(run_dir, lambda m: {**m, "format_version": 99})
    with pytest.raises(ManifestError, match="format_version 99.*newer chisel.*Upgrade chisel"):
        chisel.load(run_dir)
    assert isinstance(ManifestError("x"), chisel.NotARunError)


def test_resume_continues_a_verified_run(run_dir):
    model = mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.load_state_dict({k: v.float() for k, v in chisel.load(run_dir).params(5).items()})
    with chisel.record(model, optimizer, run_dir, resume=True, factors=True) as rec:
        model(torch.randn(4, 6)).sum().backward()
        rec.tag(advantage=torch.randn(4))
        optimizer.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert verify_run(run_dir).ok and len(chisel.load(run_dir)) == 6


def test_cli_warnings_are_one_line_and_errors_never_a_traceback(run_dir, tmp_path, capsys):
    (run_dir / "steps" / "000000002.safetensors").unlink()
    assert main(["info", str(run_dir)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("chisel: warning: ") and "step 2 is missing" in err[0]
    (run_dir / N.MANIFEST).write_text("[1, 2]")
    assert main(["info", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("chisel: error: ") and "JSON list" in err
    (tmp_path / "file").write_text("x")
    assert main(["verify", str(tmp_path / "file" / "run")]) == 2
    assert capsys.readouterr().err.startswith("chisel: error: ")
