"""The generic sections of one run's report: each returns (anchor, title, body markup), never
raises on a missing artifact, and writes its figure as figures/<name>.png. A scenario builds its
own versions from the same pieces (`summary_section(..., findings=...)`, `credit_table`,
`credit_notes`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from chisel.report import figures as F
from chisel.report import html as H
from chisel.report import tables as T
from chisel.report import validation as V
from chisel.report.artifacts import (
    DEMO_FILE,
    DEMO_ONLY,
    LEDGER_FILE,
    PROBES_FILE,
    RunArtifacts,
)
from chisel.report.coverage import part_name
from chisel.report.facts import run_facts
from chisel.report.summary import (
    BY_ATTRIBUTION,
    BY_SHAPLEY,
    TOP_K,
    Summary,
    completeness,
    feature_timeline,
)

Section = tuple[str, str, str]


@dataclass
class FigureSink:
    """Writes figures into a folder and hands back their <img> markup."""

    folder: Path
    prefix: str = ""

    def put(self, name: str, fig: F.Figure, alt: str) -> str:
        png = F.to_png(fig, self.folder / f"{self.prefix}{name}.png")
        return H.img(png, alt)


def absent(art: RunArtifacts, artifact: str, what: str) -> str:
    why = art.why_missing(artifact) or f"{artifact} has no rows for it"
    return H.missing(f"Not shown: {what}. {why}.")


def training_curve(art: RunArtifacts) -> pd.DataFrame | None:
    """The scenario file's (demo.json) "training_curve": rows of "update" and per-episode
    numbers, drawn under the timeline."""
    curve = (art.demo or {}).get("training_curve")
    return pd.DataFrame(curve) if curve else None


def _headline_paras(s: Summary) -> list[str]:
    """The two rankings side by side: what the agent now relies on (Shapley importance, when
    validation has it) and when / from which experience (training-path attribution)."""
    out = []
    attribution = "; ".join(f"{f.name} ({H.num(f.total)})" for f in s.top(5))
    if s.headline_by == BY_SHAPLEY:
        v = s.validation
        final, reverted = v.number("metric_final"), v.number("metric_reverted")
        total = v.number("shapley_total")
        if total is None:
            total = float(v.pathways[V.SHAPLEY].sum())
        gap = f"m(final) − m(all players reverted) = {H.num(total)}"
        if final is not None and reverted is not None:
            neg = f"({H.num(reverted)})" if reverted < 0 else H.num(reverted)
            gap += f" = {H.num(final)} − {neg}"
        top = "; ".join(f"{n} ({H.num(x)})" for n, x in s.relied_on[:5])
        kinds = v.shapley_by_kind()
        split = ", ".join(
            f"{'feature pathways' if k == V.KIND_FEATURE else k} {H.num(float(x))}"
            + (f" ({H.pct(float(x) / total)})" if total else "")
            for k, x in kinds.items()
        )
        tail = f" By kind: {split}."
        cover, whole = v.number("coverage_shapley"), v.number("delta_metric_reverted")
        if len(kinds) == 1 and cover is not None and whole is not None:
            tail = (
                " The players are the feature pathways only (the rest of the learned change stays "
                f"in place); together they carry {H.pct(cover)} of the whole learned change, "
                f"m(final) − m(every pathway reverted) = {H.num(whole)}."
            )
        out.append(
            H.para(
                f"What the agent now relies on (headline ranking: {BY_SHAPLEY}, the value of "
                "each pathway's learned change in the final network, interactions included; "
                f"the values of all players sum exactly to {gap}; negative: the change lowers "
                f"the metric now): {top}.{tail}",
                "answer",
            )
        )
        out.append(
            H.para(
                f"When and from which experience ({BY_ATTRIBUTION}: each pathway's share of the "
                "metric's change at the moment it happened, summed over the attributed updates; "
                f"largest |cumulative attribution|): {attribution}.",
                "answer",
            )
        )
        agree = [
            f"{a.predictor_name} ρ = {H.num(a.rho, 2)} (n = {H.num(a.n)})"
            for a in (v.agreement(x, V.REMOVAL) for x in V.PREDICTORS)
            if a is not None
        ]
        if agree:
            out.append(
                H.para(
                    "Agreement with single-pathway removal (Spearman): "
                    + "; ".join(agree)
                    + ". See “Does the attribution hold?”."
                )
            )
    else:
        out.append(
            H.para(
                f"Chiseled pathways (headline ranking: {BY_ATTRIBUTION}, largest |cumulative "
                f"attribution|; {s.headline_why}): {attribution}.",
                "answer",
            )
        )
    return out


def _coverage_para(s: Summary) -> str:
    cov = s.coverage
    if cov is None:
        return H.para(
            f"Σ over {len(s.features)} features = {H.num(s.feature_sum)}; off-span residual and "
            f"bias = {H.num(s.residual)}; Δ metric over the attributed steps = "
            f"{H.num(s.delta_metric)}."
        )
    totals = cov.totals
    rest = "; ".join(
        f"{part_name(p)} {H.num(float(totals[p]))}" for p in cov.parts if p not in cov.features
    )
    carried = " and ".join(
        f"{part_name(p)} {H.num(float(totals[p]))} ({H.pct(cov.share(p))})" for p in cov.features
    )
    text = (
        f"Coverage: of Δm = {H.num(cov.delta_metric)} over the attributed steps, the "
        f"{len(s.features)} features carry {H.num(s.feature_sum)} ({H.pct(cov.share())}): "
        f"{carried}; the rest: {rest}."
    )
    shapley = s.validation.number("coverage_shapley") if s.validation is not None else None
    if shapley is not None:
        text += f" By Shapley importance the named pathways carry {H.pct(shapley)}."
    return H.para(text)


def summary_section(
    art: RunArtifacts,
    s: Summary,
    *,
    lead: Sequence[str] = (),
    findings: Sequence[str] = (),
    checks: Sequence[str] = (),
) -> Section:
    """The headline, coverage and completeness; a scenario's own paragraphs go before them
    (`lead`), after the coverage (`findings`) and at the end (`checks`)."""
    out = list(lead)
    if not s.features:
        out.append(
            absent(art, LEDGER_FILE, "which pathways were chiseled (no integrated feature rows)")
        )
        return "summary", "Summary", "".join(out)
    out.extend(_headline_paras(s))
    out.append(_coverage_para(s))
    out.extend(findings)
    if s.completeness_max is not None:
        out.append(
            H.para(
                f"Largest relative completeness error: {H.num(s.completeness_max)} "
                f"(step {s.completeness_step})."
            )
        )
    out.extend(checks)
    return "summary", "Summary", "".join(out)


def timeline_section(art: RunArtifacts, figs: FigureSink) -> Section:
    title = "Chisel timeline"
    if art.ledger is None:
        return "timeline", title, absent(art, LEDGER_FILE, "the chisel timeline")
    tl = feature_timeline(art.ledger)
    if tl.empty or not tl.shape[1]:
        return (
            "timeline",
            title,
            absent(art, LEDGER_FILE, "the chisel timeline (no integrated rows)"),
        )
    body = H.para(
        f"The {min(TOP_K, tl.shape[1])} features with the largest |cumulative integrated attribution|: "
        "how much each one's pathway raised (above 0) or lowered (below 0) the metric, "
        "summed over the attributed updates"
        + ("; the reward curve below shares the step axis." if art.is_demo else ".")
    )
    curve, facts = training_curve(art), run_facts(art)
    fig = F.timeline_figure(
        tl, curve, k=TOP_K, curve_panel=art.is_demo, curves=facts.curves, metric=facts.metric
    )
    body += figs.put("timeline", fig, "chisel timeline")
    if art.is_demo and curve is None:
        body += absent(art, DEMO_FILE, "the reward curve")
    return "timeline", title, body


def probes_section(art: RunArtifacts, figs: FigureSink) -> Section:
    title = "Probe scores (concept × site × step)"
    scores = None if art.probes is None else art.probes.dropna(subset=["score"])
    if scores is None or scores.empty:
        return "probes", title, absent(art, PROBES_FILE, "probe scores (no finite score)")
    return "probes", title, figs.put("probes", F.probes_figure(scores), "probe scores")


def circuits_section(art: RunArtifacts, figs: FigureSink) -> Section:
    title = "Strengthened and weakened circuits"
    circ = T.circuits(art.ledger, (art.demo or {}).get("action_names"))
    if circ.totals.empty:
        return "circuits", title, absent(art, LEDGER_FILE, "circuits (no geometry circuit rows)")
    body = figs.put("circuits", F.circuits_figure(circ), "circuits")
    rows = [("strengthened", n, H.num(v)) for n, v in circ.strengthened().items()]
    rows += [("weakened", n, H.num(v)) for n, v in circ.weakened().items()]
    return (
        "circuits",
        title,
        body + H.table(["direction", "circuit", "Σ uᵀΔW d"], rows, numeric=(2,)),
    )


def credit_table(frame: pd.DataFrame, label: str) -> str:
    def count(v: float) -> str | int:
        return "—" if pd.isna(v) else int(v)

    def per(v: float) -> str:
        return "—" if pd.isna(v) else H.num(v)

    rows = [(i, count(r.samples), H.num(r.total), per(r.per_sample)) for i, r in frame.iterrows()]
    return H.table([label, "samples", "Σ credit", "per sample"], rows, numeric=(1, 2, 3))


def credit_notes(art: RunArtifacts) -> list[str]:
    """Momentum horizon and optimizer parts: the same for every run."""
    body = []
    unresolved = T.momentum_unresolved(art.ledger)
    if len(unresolved):
        body.append(
            H.para(
                f"Momentum horizon: on average {H.pct(float(unresolved.mean()))} of an update's "
                f"momentum part is left unresolved (max {H.pct(float(unresolved.max()))} at "
                f"step {int(unresolved.idxmax())}, over {len(unresolved)} credit steps): it "
                "comes from gradients older than the horizon and stays in the momentum "
                "(unresolved) part, credited to no sample."
            )
        )
    parts = T.credit_parts(art.ledger)
    if len(parts):
        body.append(H.para("Credit by part of the optimizer split:"))
        body.append(
            H.table(["part", "Σ credit"], [(p, H.num(v)) for p, v in parts.items()], numeric=(1,))
        )
    return body


def credit_section(art: RunArtifacts, figs: FigureSink) -> Section:
    """Credit of any run, by every tag its samples carry."""
    title = "Credit by tag"
    tables = {tag: frame for tag, frame in T.credit_by_tags(art.ledger).items() if not frame.empty}
    if not tables:
        return "credit", title, absent(art, LEDGER_FILE, "credit (no tagged per-sample credit rows)")
    body = [
        H.para(
            "Credit of the training samples (whole-sample rows, summed over parameters and the "
            "updates their gradients reached through momentum), grouped by each tag the run "
            f"logged: per value for whole numbers (at most {T.MAX_TAG_VALUES} values), else by "
            "sign. "
            "Where the ledger holds sums over tag groups (credit_by), a group's samples are "
            "read from its rows' count column (— where the ledger has none)."
        ),
        figs.put("credit", F.credit_by_tag_figure(tables), "credit"),
    ]
    for tag, frame in tables.items():
        body.append(credit_table(frame, f"tag/{tag}"))
    body.extend(credit_notes(art))
    return "credit", title, "".join(body)


def completeness_section(art: RunArtifacts, s: Summary, figs: FigureSink) -> Section:
    title = "Completeness errors"
    comp = completeness(art.ledger)
    if comp.empty:
        return (
            "completeness",
            title,
            absent(art, LEDGER_FILE, "completeness (no completeness_rel rows)"),
        )
    body = figs.put("completeness", F.completeness_figure(comp), "completeness errors")
    body += H.para(
        f"Max relative completeness error {H.num(s.completeness_max)} at step "
        f"{s.completeness_step}, over {len(comp)} attributed steps (exact zeros drawn at 1e-16)."
    )
    return "completeness", title, body


def missing_section(art: RunArtifacts) -> Section:
    # a run that is not a demo run never has the demo's artifacts: not worth a line each
    missing = [m for m in art.missing if art.is_demo or m.artifact not in DEMO_ONLY]
    if not missing:
        where = "docs/demo-run.md" if art.is_demo else "the report (ledger, validation)"
        return "artifacts", "Artifacts", H.para(f"Every artifact of {where} was found.")
    return "artifacts", "Missing artifacts", H.bullets(m.reason for m in missing)
