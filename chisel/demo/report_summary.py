"""The TrashWorld demo's summary and causal-check sections: the generic summary with the demo's
returns, concept groups, blue-wall correlate and causal check in it (numbers: `report_numbers`)."""

from __future__ import annotations

from chisel.demo.report_numbers import DemoNumbers, causal_rows, demo_numbers
from chisel.report import html as H
from chisel.report.artifacts import CAUSAL_FILE, RunArtifacts
from chisel.report.sections import Section, absent, summary_section
from chisel.report.summary import BY_ATTRIBUTION, BY_SHAPLEY, Summary, shapley_rank

NAMED_GROUPS = ("reward_predictive", "task")  # the groups the summary's sentence names


def _group_paras(n: DemoNumbers) -> list[str]:
    """The demo's concept groups (demo.json "concepts"): their shares of the attribution."""
    out = []
    named = [g for g in n.groups if g.group in NAMED_GROUPS]
    if named:
        text = "; ".join(
            f"{g.group}: {H.num(g.total)} ({H.pct(g.share)} of the signed feature sum, "
            f"{H.pct(g.abs_share)} of Σ|attribution|)"
            for g in named
        )
        out.append(H.para(f"Reinforcement of the chosen actions through {text}.", "answer"))
    out.append(
        H.table(
            ["group", "concepts", "features", "Σ attribution", "share (signed)",
             "Σ |attribution|", "share of Σ|·|"],
            [
                (g.group, ", ".join(g.concepts), g.features, H.num(g.total), H.pct(g.share),
                 H.num(g.abs_total), H.pct(g.abs_share))
                for g in n.groups
            ],
            numeric=(2, 3, 4, 5, 6),
        )
    )
    return out


def _correlate_paras(s: Summary, n: DemoNumbers) -> list[str]:
    c = n.correlate
    if c is None:
        return []
    if not c.features:
        return [H.missing(
            f"No feature of the spurious concepts {', '.join(c.concepts)} was attributed."
        )]
    verdict = "was chiseled too" if c.chiseled else "was not chiseled much"
    rank = shapley_rank(s, c.features)
    return [H.para(
        f"Blue-wall correlate ({', '.join(c.concepts)}) {verdict}: Σ attribution {H.num(c.total)}, "
        f"{H.pct(c.abs_share)} of Σ|attribution| (even share {H.pct(c.even_share)}), best rank "
        f"{c.best_rank} of {c.n_features} features by {BY_ATTRIBUTION}"
        + (f"; best rank {rank} of {len(s.relied_on)} pathways by {BY_SHAPLEY}."
           if rank is not None else "."),
        "answer",
    )]


def summary(art: RunArtifacts, s: Summary) -> Section:
    """Stands in for the generic summary on demo runs."""
    n = demo_numbers(art, s)
    lead = []
    if n.returns:
        lead.append(H.para("Returns: " + ", ".join(f"{k} {H.num(v)}" for k, v in n.returns.items())))
    checks = []
    if n.causal:
        checks.append(H.para(
            "Causal check (drop in return when projecting out k directions): "
            + ", ".join(f"{r.name} {H.num(r.drop)}" for r in n.causal) + "."
        ))
    findings = [*_group_paras(n), *_correlate_paras(s, n)]
    return summary_section(art, s, lead=lead, findings=findings, checks=checks)


def causal_section(art: RunArtifacts, s: Summary) -> Section:
    title = "Causal check"
    baseline, causal = causal_rows(art.causal)  # all this section needs of the demo's numbers
    if baseline is None:
        return "causal", title, absent(art, CAUSAL_FILE, "the causal check")
    c = art.causal or {}
    head = H.para(
        f"Projecting out k = {c.get('k', '?')} feature directions at site "
        f"{c.get('site', '?')}; baseline return {H.num(baseline)}."
    )
    rows = [
        (r.name, H.num(r.ret), H.num(r.drop), H.pct(r.drop_rel),
         "" if r.std is None else H.num(r.std), ", ".join(r.features))
        for r in causal
    ]
    return "causal", title, head + H.table(
        ["condition", "return", "drop", "drop / baseline", "std", "features"],
        rows,
        numeric=(1, 2, 3, 4),
    )
