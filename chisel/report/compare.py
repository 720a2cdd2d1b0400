"""`write_comparison`: two runs side by side (e.g. `--button early` against `--button late`)."""

from __future__ import annotations

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
from chisel.report.summary import TOP_K, Summary, feature_timeline, summarize


def _label(art: RunArtifacts, letter: str) -> str:
    d = art.demo or {}
    button = f", button {d['button']}" if "button" in d else ""
    return f"{letter}: {art.name}{button}"


def _row(name: str, a: object, b: object) -> tuple[str, str, str]:
    return name, str(a), str(b)


def _find(items: list, attr: str, value: object) -> object | None:
    return next((item for item in items if getattr(item, attr) == value), None)


def _paired(name: str, a: object | None, b: object | None, fmt) -> tuple[str, str, str]:
    """One comparison row; a side the run does not have reads "n/a"."""
    return _row(name, fmt(a) if a is not None else "n/a", fmt(b) if b is not None else "n/a")


def _summary_rows(sa: Summary, sb: Summary) -> list[tuple[str, str, str]]:
    rows = [_row("run", sa.run, sb.run)]
    for key in sorted(set(sa.returns) | set(sb.returns)):
        rows.append(_row(f"return: {key}", H.num(sa.returns.get(key)), H.num(sb.returns.get(key))))
    rows.append(_row("features attributed", len(sa.features), len(sb.features)))
    rows.append(_row("Σ feature attribution", H.num(sa.feature_sum), H.num(sb.feature_sum)))
    rows.append(_row("Δ metric", H.num(sa.delta_metric), H.num(sb.delta_metric)))
    rows.append(
        _paired("features' share of Δm", sa.coverage, sb.coverage, lambda c: H.pct(c.share()))
    )
    rows.append(_row("headline ranking", sa.headline_by, sb.headline_by))
    for x in V.PREDICTORS:
        for y in V.EFFECTS:
            pair = [s.validation.agreement(x, y) if s.validation else None for s in (sa, sb)]
            if any(pair):
                name = f"Spearman: {V.PREDICTORS[x]} vs {V.EFFECTS[y]}"
                rows.append(_paired(name, *pair, lambda a: f"{H.num(a.rho, 3)} (n = {H.num(a.n)})"))
    for group in {g.group: None for s in (sa, sb) for g in s.groups}:
        ga, gb = (_find(s.groups, "group", group) for s in (sa, sb))
        rows.append(
            _paired(f"share of Σ|attribution|: {group}", ga, gb, lambda g: H.pct(g.abs_share))
        )
        rows.append(_paired(f"Σ attribution: {group}", ga, gb, lambda g: H.num(g.total)))

    def wall(s: Summary) -> str:
        c = s.correlate
        if c is None or not c.features:
            return "n/a"
        return f"{H.pct(c.abs_share)}, rank {c.best_rank}/{c.n_features}"

    rows.append(_row("blue-wall correlate", wall(sa), wall(sb)))
    rows.append(
        _row("max completeness error", H.num(sa.completeness_max), H.num(sb.completeness_max))
    )
    for name in {r.name: None for s in (sa, sb) for r in s.causal}:
        ra, rb = (_find(s.causal, "name", name) for s in (sa, sb))
        rows.append(_paired(f"causal drop: {name}", ra, rb, lambda r: H.num(r.drop)))
    return rows


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


def write_comparison(run_a: str | Path, run_b: str | Path, out: str | Path) -> Path:
    """Write compare.html (and figures/compare-*.png) putting two runs side by side.

    `out` is a folder or a path ending in .html. Raises `NotARunError` if either run directory
    has no manifest.json; other missing artifacts are noted on the page.
    """
    arts = [load_artifacts(run_a), load_artifacts(run_b)]
    labels = [_label(arts[0], "A"), _label(arts[1], "B")]
    path = resolve_out(out, COMPARE_FILE)
    figs = S.FigureSink(path.parent / FIGURES_DIR, prefix="compare-")
    sums = [summarize(a) for a in arts]
    sections = [("summaries", "Summaries", H.table(["", *labels], _summary_rows(*sums)))]
    sections.append(
        (
            "top",
            f"Top {TOP_K} features by |cumulative attribution|",
            H.table(
                ["rank", f"{labels[0]} feature", "Σ A", f"{labels[1]} feature", "Σ A"],
                _top_rows(*sums),
                numeric=(0, 2, 4),
            ),
        )
    )
    tls = [feature_timeline(a.ledger) if a.ledger is not None else None for a in arts]
    if all(t is None or t.empty for t in tls):
        body = H.missing("Neither run has integrated attribution rows (ledger.parquet).")
    else:
        fig = F.timeline_pair_figure(
            [t if t is not None else pd.DataFrame() for t in tls],
            [S.training_curve(a) for a in arts],
            labels,
        )
        body = figs.put("timelines", fig, "timelines")
    sections.append(("timelines", "Timelines", body))
    shares = {lab: {g.group: g.abs_share for g in s.groups} for lab, s in zip(labels, sums)}
    if any(shares.values()):
        body = figs.put("groups", F.group_shares_figure(shares), "group shares")
    else:
        body = H.missing(
            "No group shares: no integrated feature rows or no concept groups in demo.json."
        )
    sections.append(("groups", "Reinforcement by concept group", body))
    notes = [f"{lab}: {m.reason}" for lab, a in zip(labels, arts) for m in a.missing]
    sections.append(
        ("artifacts", "Missing artifacts", H.bullets(notes) if notes else H.para("None."))
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        H.page("chisel comparison", f"{labels[0]} vs {labels[1]}", sections), encoding="utf-8"
    )
    return path
