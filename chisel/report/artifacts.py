"""Read the artifacts of a run directory that the report draws on (see docs/demo-run.md).

Only manifest.json is required: every other artifact may be missing or unreadable, and is then
recorded in `RunArtifacts.missing` with the reason, so the report can say what it could not show.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from chisel.attribution import ledger as L
from chisel.store import read_manifest

# artifact files of a demo run directory
LEDGER_FILE = "ledger.parquet"
PROBES_FILE = "probes.parquet"
DEMO_FILE = "demo.json"
CAUSAL_FILE = "causal.json"
FEATURES_DIR = "features"
# validation by intervention (chisel.validation): one row per pathway / feature, and a summary
VALIDATION_FILE = "validation.parquet"
VALIDATION_SUMMARY_FILE = "validation.json"
# what the report writes
REPORT_FILE = "report.html"
COMPARE_FILE = "compare.html"
FIGURES_DIR = "figures"

# what only `chisel demo` writes: a run without demo.json is reported without them
DEMO_ONLY = (DEMO_FILE, PROBES_FILE, CAUSAL_FILE)

PROBE_COLUMNS = ("step", "site", "concept", "metric", "score")
# validation.parquet: only the feature label is required, every measured column is optional
VALIDATION_NEEDS = ("feature",)
_LEDGER_NEEDS = (L.STEP, L.FAMILY, L.FEATURE, L.QUANTITY, L.VALUE)


@dataclass(frozen=True)
class Missing:
    """An artifact the report could not use: its file and why."""

    artifact: str
    reason: str


@dataclass
class RunArtifacts:
    """What a run directory holds for the report; None where an artifact is missing."""

    root: Path
    manifest: dict[str, Any]
    ledger: pd.DataFrame | None = None
    probes: pd.DataFrame | None = None
    demo: dict[str, Any] | None = None
    causal: dict[str, Any] | None = None
    validation: pd.DataFrame | None = None  # validation.parquet: one row per pathway
    validation_summary: dict[str, Any] | None = None  # validation.json
    missing: list[Missing] = field(default_factory=list)

    @property
    def is_demo(self) -> bool:
        """A run with a scenario file, demo.json (present, even unreadable: the report then
        says so): its scenario's sections are shown (see `scenario`), and the artifacts a
        scenario writes (probes, causal check) are expected."""
        return self.demo is not None or (self.root / DEMO_FILE).exists()

    @property
    def name(self) -> str:
        return self.root.name or str(self.root)

    def why_missing(self, artifact: str) -> str | None:
        reasons = [m.reason for m in self.missing if m.artifact == artifact]
        return "; ".join(reasons) if reasons else None


def _read_parquet(
    path: Path,
    needs: tuple[str, ...],
    missing: list[Missing],
    read: Callable[[Path], pd.DataFrame] = pd.read_parquet,
) -> pd.DataFrame | None:
    if not path.exists():
        missing.append(Missing(path.name, f"{path.name} is not in the run directory"))
        return None
    try:
        frame = read(path)
    except Exception as err:  # a truncated or foreign file: report it, do not crash
        missing.append(
            Missing(path.name, f"{path.name} cannot be read ({type(err).__name__}: {err})")
        )
        return None
    lacking = [c for c in needs if c not in frame.columns]
    if lacking:
        missing.append(Missing(path.name, f"{path.name} lacks the columns {lacking}"))
        return None
    return frame


def _read_json(path: Path, missing: list[Missing]) -> dict[str, Any] | None:
    if not path.is_file():
        missing.append(Missing(path.name, f"{path.name} is not in the run directory"))
        return None
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        missing.append(Missing(path.name, f"{path.name} cannot be read ({err})"))
        return None
    if not isinstance(obj, dict):
        missing.append(
            Missing(path.name, f"{path.name} holds a {type(obj).__name__}, not an object")
        )
        return None
    return obj


def load_artifacts(run_dir: str | Path) -> RunArtifacts:
    """The manifest (required: `NotARunError` without it) and whichever artifacts exist."""
    root = Path(run_dir)
    manifest = read_manifest(root)
    missing: list[Missing] = []
    # the ledger through chisel's own reader: a file, or a directory of parts (engine="ray")
    ledger = _read_parquet(root / LEDGER_FILE, _LEDGER_NEEDS, missing, L.load_ledger)
    if ledger is not None and L.SAMPLE not in ledger.columns:
        ledger = ledger.assign(**{L.SAMPLE: pd.array([None] * len(ledger), dtype="Int64")})
    probes = _read_parquet(root / PROBES_FILE, PROBE_COLUMNS, missing)
    demo = _read_json(root / DEMO_FILE, missing)
    causal = _read_json(root / CAUSAL_FILE, missing)
    validation = _read_parquet(root / VALIDATION_FILE, VALIDATION_NEEDS, missing)
    validation_summary = _read_json(root / VALIDATION_SUMMARY_FILE, missing)
    return RunArtifacts(
        root,
        manifest,
        ledger,
        probes,
        demo,
        causal,
        validation=validation,
        validation_summary=validation_summary,
        missing=missing,
    )


def resolve_out(out: str | Path, default_name: str) -> Path:
    """`out` as the HTML file to write: a path ending in .html, else a folder to write into."""
    out = Path(out)
    return out if out.suffix.lower() in (".html", ".htm") else out / default_name
