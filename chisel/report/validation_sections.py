"""The report sections of validation by intervention ("Does the attribution hold?") and of
coverage (how much of Δm the named features carry); same contract as `sections`."""

from __future__ import annotations

import numpy as np
import pandas as pd

from chisel.report import figures as F
from chisel.report import html as H
from chisel.report import validation as V
from chisel.report.artifacts import (
    LEDGER_FILE,
    VALIDATION_FILE,
    VALIDATION_SUMMARY_FILE,
    RunArtifacts,
)
from chisel.report.coverage import PARTS, part_name
from chisel.report.sections import FigureSink, Section, absent
from chisel.report.summary import Summary


def absent_any(art: RunArtifacts, artifacts: tuple[str, ...], what: str) -> str:
    reasons = [r for a in artifacts if (r := art.why_missing(a))]
    why = "; ".join(reasons) or f"{' and '.join(artifacts)} have no rows for it"
    return H.missing(f"Not shown: {what}. {why}.")


VALIDATION_INTRO = (
    "The training-path attribution says when, and from which experience, each pathway (a "
    "feature read by a weight) was reinforced. Here it is held against interventions on the "
    "final network: pathway removal = m(final) − m(final with this pathway's learned change "
    "reverted), on the same metric; feature ablation = the effect of projecting the feature out "
    "of its site (mean kept), on the metric and on the return; the Shapley importance = the "
    "value of each pathway's learned change with the others' interactions averaged in, which "
    "sums exactly to m(final) − m(all its players reverted): what the agent now relies on. Positive: the "
    "pathway helps the metric now. Spearman ρ over the feature pathways."
)


MAX_NAMED = 5  # features named per over/under-stated list, largest rank gap first
MAX_ROWS = 40  # pathways in the ranked table
COUNTS = ("players", "permutations", "evaluations")


def _sentence_misranked(v: V.Validation, effect: str) -> str | None:
    over, under, n = V.misranked(v.table, effect)
    if n < 3:
        return None
    what = V.EFFECTS[effect]

    def names(gaps: list[V.RankGap]) -> str:
        text = ", ".join(
            f"{g.label} (|attribution| rank {g.rank_predictor}, {V.SHORT[effect]} rank "
            f"{g.rank_effect})"
            for g in gaps[:MAX_NAMED]
        )
        more = len(gaps) - MAX_NAMED
        return text + (f" and {more} more" if more > 0 else "")

    head = f"Against {what} (ranks of {n} feature pathways, 1 = largest)"
    if not over and not under:
        return f"{head}, no feature is in the top third by one and the bottom half by the other."
    parts = []
    if over:
        parts.append(f"the training-path attribution over-states {names(over)}")
    if under:
        parts.append(f"it under-states {names(under)}")
    return f"{head}: " + "; ".join(parts) + "."


def _plus_minus(value: float, se: float) -> str:
    if not np.isfinite(value):
        return "n/a"
    return H.num(value) if not np.isfinite(se) else f"{H.num(value)} ± {H.num(se, 2)}"


def _pathway_table(v: V.Validation, rows: pd.DataFrame, first: str) -> str:
    columns = [
        (c, name)
        for c, name in (
            (V.ATTRIBUTION, "attribution (cumulative)"),
            (V.SHAPLEY, "Shapley ± se"),
            (V.REMOVAL, "removal"),
            (V.ABLATION_METRIC, "ablation: metric"),
            (V.ABLATION_RETURN, "ablation: return"),
        )
        if v.has(c)
    ]
    header = ["#", first, "site", "param", *[n for _, n in columns]]
    body = []
    for i, r in enumerate(rows.itertuples(index=False), start=1):
        r = r._asdict()
        cells = [
            _plus_minus(r[c], r[V.SHAPLEY_SE]) if c == V.SHAPLEY else H.num(r[c])
            for c, _ in columns
        ]
        body.append((i, r[V.LABEL], r[V.SITE], r[V.PARAM], *cells))
    return H.table(header, body, numeric=(0, *range(4, 4 + len(columns))))


def _validation_numbers(v: V.Validation) -> str | None:
    keys = (
        ("delta_metric", "Δm over the attributed steps"),
        ("metric_final", "m(final)"),
        ("metric_reverted", "m(all players of the Shapley game reverted)"),
        ("shapley_total", "Σ Shapley"),
        ("coverage_attribution", "named features' share of Δm (attribution)"),
        ("coverage_shapley", "named pathways' share of the whole learned change (Shapley)"),
        ("players", "pathways in the Shapley game"),
        ("permutations", "sampled permutations"),
        ("shapley_max_se", "largest Shapley se"),
        ("evaluations", "metric evaluations"),
        ("wall_time_s", "wall time (s)"),
    )

    def fmt(key: str, x: float) -> str:
        if key.startswith("coverage"):
            return H.pct(x)
        return str(int(x)) if key in COUNTS and x == int(x) else H.num(x)

    parts = [f"{name} {fmt(key, x)}" for key, name in keys if (x := v.number(key)) is not None]
    players = v.summary.get("shapley_players")
    if isinstance(players, str):
        parts.append(f"players of the Shapley game: {players}")
    return H.para("; ".join(parts) + ".") if parts else None


def validation_section(art: RunArtifacts, s: Summary, figs: FigureSink) -> Section:
    anchor, title = "validation", "Does the attribution hold?"
    v = s.validation
    if v is None:
        return (
            anchor,
            title,
            absent_any(
                art, (VALIDATION_FILE, VALIDATION_SUMMARY_FILE), "the validation by intervention"
            ),
        )
    body = [H.para(VALIDATION_INTRO)]
    if v.agreements:
        body.append(
            H.table(
                ["predictor", "measured effect", "Spearman ρ", "n", "from"],
                [
                    (
                        a.predictor_name,
                        a.effect_name,
                        H.num(a.rho, 3),
                        H.num(a.n),
                        a.source,
                    )
                    for a in v.agreements
                ],
                numeric=(2, 3),
            )
        )
    panels = [
        (a.predictor, a.effect, f"ρ = {H.num(a.rho, 2)}, n = {H.num(a.n)}", a.transform == V.ABS)
        for a in v.agreements
        if v.has(a.predictor) and v.has(a.effect)
    ]
    if panels and len(v.features):
        names = {**V.PREDICTORS, **V.EFFECTS}
        fig = F.validation_figure(v.features, panels, names, {V.SHAPLEY: V.SHAPLEY_SE})
        body.append(figs.put("validation", fig, "attribution and Shapley vs interventions"))
        body.append(
            H.para(
                "One dot per feature pathway; the most extreme ones are named. The weights' "
                "<mean>, <residual> and <bias> pathways and the groups are in the tables only."
            )
        )
    sentences = [t for e in V.EFFECTS if v.has(e) and (t := _sentence_misranked(v, e))]
    body.extend(H.para(t, "answer") for t in sentences)
    if (numbers := _validation_numbers(v)) is not None:
        body.append(numbers)
    if len(v.pathways):
        by = {V.SHAPLEY: "|Shapley|", V.REMOVAL: "|removal|"}.get(v.ranking, "|attribution|")
        ranked = v.ranked()
        more = len(ranked) - MAX_ROWS
        shown = f"the first {MAX_ROWS} of {len(ranked)} " if more > 0 else ""
        body.append(H.para(f"Pathways ranked by {by} ({shown}in {VALIDATION_FILE}):"))
        body.append(_pathway_table(v, ranked.head(MAX_ROWS), "pathway"))
    if len(v.groups):
        body.append(H.para("Groups of pathways (all features of a concept, of a site):"))
        body.append(_pathway_table(v, v.ranked(v.groups), "group"))
    if v.table.empty:
        body.append(absent(art, VALIDATION_FILE, "the per-pathway measures"))
    return anchor, title, "".join(body)


def coverage_section(art: RunArtifacts, s: Summary, figs: FigureSink) -> Section:
    anchor, title = "coverage", "Coverage: how much of Δm the named features carry"
    cov = s.coverage
    if cov is None:
        return anchor, title, absent(art, LEDGER_FILE, "coverage (no integrated attribution rows)")
    body = [
        H.para(
            "The metric's change Δm of every attributed step splits exactly into the named "
            "features' pathways, each split weight's <mean> (the change acting on the mean "
            "input), <residual> (off the features' span) and <bias>, and the params without "
            "features. Left: each part's share of the step's movement, |part| / Σ |parts| (a "
            "share of a single step's Δm is unbounded where Δm_t is near 0); right: each part's "
            "share of Δm cumulated up to the step. The table: over all attributed steps."
        ),
        figs.put(
            "coverage",
            F.coverage_figure(cov.step_mass(), cov.cumulative_shares(), PARTS),
            "coverage of Δm",
        ),
    ]
    totals = cov.totals
    rows = [(part_name(p), H.num(float(totals[p])), H.pct(cov.share(p))) for p in cov.parts]
    rows.append(("Δm (all)", H.num(cov.delta_metric), H.pct(1.0)))
    v = s.validation
    shapley = v.number("coverage_shapley") if v is not None else None
    if shapley is not None:
        rows.append(("named pathways by Shapley (validation.json)", "", H.pct(shapley)))
    body.append(H.table(["part", "Σ over steps", "share of Δm"], rows, numeric=(1, 2)))
    return anchor, title, "".join(body)
