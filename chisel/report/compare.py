"""`write_comparison`: two runs side by side (e.g. two seeds, or two settings of a scenario).

The page is a registry of sections like the report (`registry.COMPARISON`): each reads both runs
(`ComparisonInputs`) and shows them side by side: a table with a column per run, a figure with a
panel per run. chisel's generic ones are registered here; a scenario adds or replaces its own
(`register_comparison_section`, see chisel.demo.report_sections).
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import zip_longest
from pathlib import Path

import pandas as pd

from chisel.report import figures as F
from chisel.report import html as H
from chisel.report import sections as S
from chisel.report import validation as V
from chisel.report.artifacts import (
    COMPARE_FILE,
    FIGURES_DIR,
    RunArtifacts,
    load_artifacts,
    resolve_out,
)
from chisel.report.facts import run_facts
from chisel.report.registry import COMPARISON, ComparisonInputs
from chisel.report.scenario import load_scenario_sections
from chisel.report.summary import TOP_K, Summary, feature_timeline, summarize

Row = tuple[str, str, str]


def _label(art: RunArtifacts, letter: str) -> str:
    tag = run_facts(art).label
    return f"{letter}: {art.name}" + (f", {tag}" if tag else "")


def row(name: str, a: object, b: object) -> Row:
    return name, str(a), str(b)


def find(items: list, attr: str, value: object) -> object | None:
    return next((item for item in items if getattr(item, attr) == value), None)


def paired(name: str, a: object | None, b: object | None, fmt: Callable[[object], str]) -> Row:
    """One comparison row; a side the run does not have reads "n/a"."""
    return row(name, fmt(a) if a is not None else "n/a", fmt(b) if b is not None else "n/a")


def head_rows(sa: Summary, sb: Summary) -> list[Row]:
    return [row("run", sa.run, sb.run)]


def core_rows(sa: Summary, sb: Summary) -> list[Row]:
    """Features, Δm, coverage, the headline ranking and the validation agreements."""
    rows = [row("features attributed", len(sa.features), len(sb.features))]
    rows.append(row("Σ feature attribution", H.num(sa.feature_sum), H.num(sb.feature_sum)))
    rows.append(row("Δ metric", H.num(sa.delta_metric), H.num(sb.delta_metric)))
    rows.append(
        paired("features' share of Δm", sa.coverage, sb.coverage, lambda c: H.pct(c.share()))
    )
    rows.append(row("headline ranking", sa.headline_by, sb.headline_by))
    for x in V.PREDICTORS:
        for y in V.EFFECTS:
            pair = [s.validation.agreement(x, y) if s.validation else None for s in (sa, sb)]
            if any(pair):
                name = f"Spearman: {V.PREDICTORS[x]} vs {V.EFFECTS[y]}"
                rows.append(paired(name, *pair, lambda a: f"{H.num(a.rho, 3)} (n = {H.num(a.n)})"))
    return rows


def completeness_rows(sa: Summary, sb: Summary) -> list[Row]:
    return [row("max completeness error", H.num(sa.completeness_max), H.num(sb.completeness_max))]


def summaries_table(inputs: ComparisonInputs, rows: list[Row]) -> tuple[str, str, str]:
    return "summaries", "Summaries", H.table(["", *inputs.labels], rows)


def summaries_section(inputs: ComparisonInputs) -> tuple[str, str, str]:
    sa, sb = inputs.summaries
    return summaries_table(
        inputs, [*head_rows(sa, sb), *core_rows(sa, sb), *completeness_rows(sa, sb)]
    )


def _top_rows(sa: Summary, sb: Summary) -> list[tuple[object, ...]]:
    rows = []
    for i, (fa, fb) in enumerate(zip_longest(sa.top(TOP_K), sb.top(TOP_K)), start=1):
        rows.append(
            (
                i,
                fa.name if fa else "",
                H.num(fa.total) if fa else "",
                fb.name if fb else "",
                H.num(fb.total) if fb else "",
            )
        )
    return rows


def top_section(inputs: ComparisonInputs) -> tuple[str, str, str]:
    labels = inputs.labels
    return (
        "top",
        f"Top {TOP_K} features by |cumulative attribution|",
        H.table(
            ["rank", f"{labels[0]} feature", "Σ A", f"{labels[1]} feature", "Σ A"],
            _top_rows(*inputs.summaries),
            numeric=(0, 2, 4),
        ),
    )


def timelines_section(inputs: ComparisonInputs) -> tuple[str, str, str]:
    arts = inputs.arts
    tls = [feature_timeline(a.ledger) if a.ledger is not None else None for a in arts]
    if all(t is None or t.empty for t in tls):
        body = H.missing("Neither run has integrated attribution rows (ledger.parquet).")
    else:
        facts = [run_facts(a) for a in arts]
        fig = F.timeline_pair_figure(
            [t if t is not None else pd.DataFrame() for t in tls],
            [S.training_curve(a) for a in arts],
            list(inputs.labels),
            columns=[f.curves for f in facts],
            metrics=[f.metric for f in facts],
        )
        body = inputs.figs.put("timelines", fig, "timelines")
    return "timelines", "Timelines", body


def artifacts_section(inputs: ComparisonInputs) -> tuple[str, str, str]:
    notes = [f"{lab}: {m.reason}" for lab, a in zip(inputs.labels, inputs.arts) for m in a.missing]
    return "artifacts", "Missing artifacts", H.bullets(notes) if notes else H.para("None.")


COMPARISON.register("summaries", summaries_section)
COMPARISON.register("top", top_section)
COMPARISON.register("timelines", timelines_section)
COMPARISON.register("missing", artifacts_section)


def write_comparison(run_a: str | Path, run_b: str | Path, out: str | Path) -> Path:
    """Write compare.html (and figures/compare-*.png) putting two runs side by side.

    `out` is a folder or a path ending in .html. Raises `NotARunError` if either run directory
    has no manifest.json; other missing artifacts are noted on the page.
    """
    arts = (load_artifacts(run_a), load_artifacts(run_b))
    for art in arts:
        load_scenario_sections(art)
    labels = (_label(arts[0], "A"), _label(arts[1], "B"))
    path = resolve_out(out, COMPARE_FILE)
    figs = S.FigureSink(path.parent / FIGURES_DIR, prefix="compare-")
    inputs = ComparisonInputs(arts, (summarize(arts[0]), summarize(arts[1])), labels, figs)
    built = [spec.build(inputs) for spec in COMPARISON.select(arts)]
    sections = [x for x in built if x is not None]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        H.page("chisel comparison", f"{labels[0]} vs {labels[1]}", sections), encoding="utf-8"
    )
    return path
