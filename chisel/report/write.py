"""`write_report`: one run's report.html and figures/*.png."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from chisel.report import counterfactual_section as CS
from chisel.report import html as H
from chisel.report import reward_optimizer_section as RS
from chisel.report import sections as S
from chisel.report import validation_sections as VS
from chisel.report.artifacts import FIGURES_DIR, REPORT_FILE, load_artifacts, resolve_out
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
        sections: extra sections (anchor, title, body markup), placed after the summary: how
            a scenario adds its own (the LM demo's answer, `chisel.demo_lm.report`).

    Raises:
        NotARunError: run_dir (or compare) has no manifest.json.
    """
    if compare is not None:
        from chisel.report.compare import write_comparison

        return write_comparison(run_dir, compare, out if out is not None else run_dir)
    art = load_artifacts(run_dir)
    path = resolve_out(out if out is not None else art.root, REPORT_FILE)
    figs = S.FigureSink(path.parent / FIGURES_DIR)
    s = summarize(art)
    sections = [
        S.summary_section(art, s),
        RS.reward_optimizer_section(art),
        *sections,
        S.timeline_section(art, figs),
        VS.validation_section(art, s, figs),
        VS.coverage_section(art, s, figs),
        CS.counterfactual_section(art, figs),
        S.probes_section(art, figs) if art.is_demo or art.probes is not None else None,
        S.circuits_section(art, figs),
        S.credit_section(art, figs),
        S.completeness_section(art, s, figs),
        S.causal_section(art, s) if art.is_demo or art.causal is not None else None,
        S.missing_section(art),
    ]
    sections = [x for x in sections if x is not None]  # demo-only sections of other runs
    subtitle = f"run {art.root}"
    if art.demo:
        d = art.demo
        subtitle += f" · seed {d.get('seed', '?')} · button {d.get('button', '?')}"
        if d.get("metric"):
            subtitle += f" · metric: {d['metric']}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(H.page(f"chisel report: {art.name}", subtitle, sections), encoding="utf-8")
    return path
