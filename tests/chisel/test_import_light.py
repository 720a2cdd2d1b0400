"""`import chisel` is light and has no side effects; recording loads no analysis stack."""

from __future__ import annotations

import json
import subprocess
import sys

import chisel

HEAVY = ("matplotlib", "pandas", "pyarrow", "scipy", "sklearn", "chisel.report", "chisel.attribution")


def _child(code: str) -> dict:
    """Run `code` in a fresh interpreter; it prints one JSON object as its last line."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _heavy(modules: list[str]) -> list[str]:
    return sorted(m for m in modules if any(m == h or m.startswith(h + ".") for h in HEAVY))


def test_import_chisel_is_light_and_recording_loads_no_analysis_stack(tmp_path):
    run = str(tmp_path / "run")
    out = _child(
        "import json, sys\n"
        "import torch\n"
        "import chisel\n"
        "after_import = sorted(sys.modules)\n"
        "m = torch.nn.Linear(3, 2); opt = torch.optim.SGD(m.parameters(), lr=0.1)\n"
        f"with chisel.record(m, opt, {run!r}, factors=True) as rec:\n"
        "    m(torch.randn(4, 3)).sum().backward(); rec.tag(w=torch.ones(4)); opt.step()\n"
        f"steps = len(chisel.load({run!r}))\n"
        "print(json.dumps({'import': after_import, 'steps': steps,"
        " 'recorded': sorted(sys.modules)}))\n"
    )
    assert _heavy(out["import"]) == []
    assert [m for m in out["import"] if m.startswith("chisel")] == ["chisel", "chisel._version"]
    # its time (target ≤ 0.3 s beyond torch) is measured by benchmarks/import_time.py
    assert out["steps"] == 1
    assert _heavy(out["recorded"]) == []  # recording and reading a step need no pandas


def test_importing_the_report_leaves_matplotlib_backend_alone():
    """The report draws on `matplotlib.figure.Figure` (rendered by Agg when saved): importing
    it neither switches the backend nor loads pyplot, so a user's own plotting is untouched."""
    out = _child(
        "import json, sys, matplotlib\n"
        "matplotlib.use('svg')\n"
        "import chisel\n"
        "chisel.write_report\n"
        "print(json.dumps({'backend': matplotlib.get_backend(),"
        " 'pyplot': 'matplotlib.pyplot' in sys.modules}))\n"
    )
    assert out == {"backend": "svg", "pyplot": False}


def test_lazy_exports_agree_with_all():
    assert set(chisel._EXPORTS) | {"__version__"} == set(chisel.__all__)
    assert set(chisel.__all__) <= set(dir(chisel))
    assert chisel.record is __import__("chisel.recorder", fromlist=["record"]).record
    assert chisel.store.reader.Run is chisel.Run  # subpackages resolve on use, as before
    try:
        chisel.no_such_name  # noqa: B018
    except AttributeError as err:
        assert "no_such_name" in str(err)
    else:
        raise AssertionError("an unknown attribute must raise AttributeError")
