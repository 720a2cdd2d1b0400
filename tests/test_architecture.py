"""Imports point downstream only: probes → capture → store → attribute → validation → report.

`probes` never imports `chisel`; within chisel a stage never imports a later one.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# chisel stages, upstream first; modules outside these folders (recorder, cli, …) are glue
STAGES = ["capture", "store", "attribution", "validation", "report"]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def test_probes_never_imports_chisel():
    offenders = {
        str(p.relative_to(ROOT)): sorted(m for m in _imports(p) if m.split(".")[0] == "chisel")
        for p in (ROOT / "probes").rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_chisel_stages_import_only_upstream():
    bad = []
    for i, stage in enumerate(STAGES):
        folder = ROOT / "chisel" / stage
        if not folder.is_dir():
            continue
        later = STAGES[i + 1 :]
        for path in folder.rglob("*.py"):
            for module in _imports(path):
                parts = module.split(".")
                if parts[0] == "chisel" and len(parts) > 1 and parts[1] in later:
                    bad.append(f"{path.relative_to(ROOT)} imports {module}")
    assert bad == []


def test_no_pickle_on_read_paths():
    hits = []
    for path in [*(ROOT / "chisel").rglob("*.py"), *(ROOT / "probes").rglob("*.py")]:
        text = path.read_text()
        for needle in ("pickle.load", "torch.load(", "np.load("):
            for line in text.splitlines():
                if needle in line and "weights_only=True" not in line and "allow_pickle=False" not in line:
                    hits.append(f"{path.relative_to(ROOT)}: {line.strip()}")
    assert hits == []
