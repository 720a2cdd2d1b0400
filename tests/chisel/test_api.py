"""The public API, the CLI and reading a run while it is written."""

from __future__ import annotations

import subprocess
import sys

import torch

import chisel
from chisel.cli import main
from tests.chisel.helpers import mlp

PUBLIC = {
    "ChiselError",
    "Compact",
    "CorruptStepError",
    "NotARunError",
    "RecordConfig",
    "RecordConfigError",
    "Recorder",
    "ResumeMismatchError",
    "Run",
    "RunExistsError",
    "SkippedStepError",
    "Step",
    "StepOutOfRangeError",
    "StepRecord",
    "TagError",
    "TrainModeWarning",
    "UnknownModuleError",
    "WriterError",
    "__version__",
    "load",
    "record",
    "attribute",
    "timeline",
    "metrics",
    "counterfactual",
    "load_ledger",
    "online_ledger",
    "write_report",
    "write_comparison",
    "ValidationError",
    "pathway_effects",
    "pathway_shapley",
    "ablation_effects",
    "validation_table",
    "agreement",
    "AttributionInputError",
    "FactorsSkippedWarning",
    "ManifestError",
    "MissingStepsWarning",
    "StepTypeError",
    "UnverifiedRunWarning",
    "ForwardPatchWarning",
    "attribute_ray",
    "register_optimizer",
    "RankMismatchError",
    "MissingShardError",
}


def test_public_names_are_pinned():
    assert set(chisel.__all__) == PUBLIC
    assert all(hasattr(chisel, name) for name in chisel.__all__)


def test_run_is_readable_while_it_is_written(tmp_path):
    model = mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    with chisel.record(model, optimizer, tmp_path / "run", factors=True, queue_size=1) as rec:
        run = chisel.load(tmp_path / "run")
        assert len(run) == 0 and len(run.steps) == 0
        seen = []
        for _ in range(6):
            model(torch.randn(4, 6)).sum().backward()
            rec.tag(advantage=torch.ones(4))
            optimizer.step()
            optimizer.zero_grad()
            seen.append(len(run))
            if len(run):
                t = len(run) - 1  # the newest visible step is complete
                assert set(run.update(t)) == set(run.param_names)
                assert set(run.factors(t)) == {"0", "2"}
        assert seen[-1] >= 6 - 2  # the writer is at most queue_size + 1 steps behind
    assert len(run) == 6 and [s.index for s in run] == list(range(6))
    assert run.params(6)["0.weight"].equal(model[0].weight.detach())


def test_chisel_info_cli(tmp_path, capsys):
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with chisel.record(model, optimizer, tmp_path / "run", factors=True) as rec:
        for _ in range(3):
            model(torch.randn(4, 6)).sum().backward()
            rec.tag(reward=torch.ones(4), episode=1)
            optimizer.step()
    assert main(["info", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    for expected in ("steps      3", "skipped 0", "4 tensors, 163 values", "episode, reward",
                     "2 modules: 0 (linear), 2 (linear)", "on disk"):
        assert expected in out, (expected, out)
    assert main(["info", str(tmp_path / "missing")]) == 2
    assert "manifest.json is missing" in capsys.readouterr().err


def test_python_dash_m_chisel_runs():
    done = subprocess.run(
        [sys.executable, "-m", "chisel", "--help"], capture_output=True, text=True, check=True
    )
    assert "info" in done.stdout and "demo" in done.stdout
