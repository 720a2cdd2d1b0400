"""`write_report`: one run's report.html and figures/*.png."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from chisel.report import builtin_sections  # noqa: F401  (registers the built-in sections)
from chisel.report import html as H
from chisel.report import sections as S
from chisel.report.artifacts import FIGURES_DIR, REPORT_FILE, load_artifacts, resolve_out
from chisel.report.registry import ReportInputs, registered_sections
from chisel.report.summary import summarize


def write_report(
    run_dir: str | Path,
    out: str | Path | None = None,
    *,
    compare: str | Path | None = None,
    sections: Sequence[tuple[str, str, str]] = (),
) -> Path:
    """Write the self-contained report of a run directory; return the HTML path.

    Any run with a ledger gets the timeline, circuits, credit by each tag, completeness and,
    where present, validation; a `chisel demo` run (demo.json) adds its concept groups, the
    blue-wall correlate, probe scores, reward events and the causal check.

    Args:
        run_dir: a run directory (manifest.json required; ledger.parquet, probes.parquet,
            demo.json, causal.json are used when present, see docs/demo-run.md).
        out: a folder, or a path ending in .html; default the run directory. Figures go to
            `figures/` beside the HTML.
        compare: a second run directory: write the side-by-side comparison of the two runs
            instead (compare.html, see `write_comparison`).
        sections: one-off extra sections (anchor, title, body markup), placed after the
            summary (the LM demo's answer, `chisel.demo_lm.report`). Sections for every report
            are registered with `chisel.report.register_section` (see `registry`).

    Raises:
        NotARunError: run_dir (or compare) has no manifest.json.
    """
    if compare is not None:
        from chisel.report.compare import write_comparison

        return write_comparison(run_dir, compare, out if out is not None else run_dir)
    extra = list(sections)
    art = load_artifacts(run_dir)
    path = resolve_out(out if out is not None else art.root, REPORT_FILE)
    inputs = ReportInputs(art, summarize(art), S.FigureSink(path.parent / FIGURES_DIR))
    built = []
    for spec in registered_sections():
        if spec.when(art):
            built.append(spec.build(inputs))
        if spec.name == "summary":
            built.extend(extra)  # one-off sections come right after the summary
    built = [x for x in built if x is not None]
    subtitle = f"run {art.root}"
    if art.demo:
        d = art.demo
        subtitle += f" · seed {d.get('seed', '?')} · button {d.get('button', '?')}"
        if d.get("metric"):
            subtitle += f" · metric: {d['metric']}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(H.page(f"chisel report: {art.name}", subtitle, built), encoding="utf-8")
    return path
