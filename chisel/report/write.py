"""`write_report`: one run's report.html and figures/*.png."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

from chisel.report import builtin_sections  # noqa: F401  (registers the built-in sections)
from chisel.report import html as H
from chisel.report import sections as S
from chisel.report.artifacts import FIGURES_DIR, REPORT_FILE, load_artifacts, resolve_out
from chisel.report.compare import write_comparison
from chisel.report.facts import run_facts
from chisel.report.registry import REPORT, ReportInputs
from chisel.report.scenario import load_scenario_sections
from chisel.report.summary import summarize


def write_report(
    run_dir: str | Path,
    out: str | Path | None = None,
    *,
    sections: Sequence[tuple[str, str, str]] = (),
    compare: str | Path | None = None,
) -> Path:
    """Write the self-contained report of a run directory; return the HTML path.

    Any run with a ledger gets the timeline, validation and coverage (when written), circuits,
    credit by each tag, completeness and the artifacts it lacks. A run whose scenario file
    (demo.json) names a module of report sections gets those too (`chisel demo`: the choice
    test, concept groups, reward events, the causal check; see `chisel.report.scenario`).

    Args:
        run_dir: a run directory (manifest.json required; ledger.parquet, validation.parquet,
            probes.parquet, demo.json, causal.json are used when present, see docs/demo-run.md).
        out: a folder, or a path ending in .html; default the run directory. Figures go to
            `figures/` beside the HTML.
        sections: one-off extra sections (anchor, title, body markup), placed after the
            summary (the LM demo's answer, `chisel.demo_lm.report`). Sections for every report
            are registered with `chisel.report.register_section` (see `registry`).
        compare: deprecated (a DeprecationWarning): call
            `write_comparison(run_dir, compare, out or run_dir)`, which this does.

    Raises:
        NotARunError: run_dir has no manifest.json.
    """
    if compare is not None:
        warnings.warn(
            "write_report(run, compare=other) is deprecated: call "
            "chisel.write_comparison(run, other, out) (same page, compare.html)",
            DeprecationWarning,
            stacklevel=2,
        )
        return write_comparison(run_dir, compare, out if out is not None else run_dir)
    extra = list(sections)
    art = load_artifacts(run_dir)
    load_scenario_sections(art)
    path = resolve_out(out if out is not None else art.root, REPORT_FILE)
    inputs = ReportInputs(art, summarize(art), S.FigureSink(path.parent / FIGURES_DIR))
    built = []
    for spec in REPORT.select(art):
        built.append(spec.build(inputs))
        if (spec.replaces or spec.name) == "summary":
            built.extend(extra)  # one-off sections come right after the summary
    built = [x for x in built if x is not None]
    subtitle = " · ".join([f"run {art.root}", *run_facts(art).subtitle])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(H.page(f"chisel report: {art.name}", subtitle, built), encoding="utf-8")
    return path
