"""The TrashWorld demo's comparison sections: the summaries table with the returns, concept-group
shares, blue-wall correlate and causal drops of both runs, and the groups side by side."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from chisel.demo.report_numbers import DemoNumbers, demo_numbers
from chisel.report import compare as C
from chisel.report import figures as F
from chisel.report import html as H
from chisel.report.registry import ComparisonInputs
from chisel.report.sections import Section


def _numbers(inputs: ComparisonInputs) -> tuple[DemoNumbers, DemoNumbers]:
    na, nb = (demo_numbers(a, s) for a, s in zip(inputs.arts, inputs.summaries))
    return na, nb


def _wall(n: DemoNumbers) -> str:
    c = n.correlate
    if c is None or not c.features:
        return "n/a"
    return f"{H.pct(c.abs_share)}, rank {c.best_rank}/{c.n_features}"


def summaries_section(inputs: ComparisonInputs) -> Section:
    """Stands in for the generic summaries table when either run is a demo run."""
    sa, sb = inputs.summaries
    na, nb = _numbers(inputs)
    rows = C.head_rows(sa, sb)
    for key in sorted(set(na.returns) | set(nb.returns)):
        rows.append(C.row(f"return: {key}", H.num(na.returns.get(key)), H.num(nb.returns.get(key))))
    rows.extend(C.core_rows(sa, sb))
    for group in {g.group: None for n in (na, nb) for g in n.groups}:
        ga, gb = (C.find(n.groups, "group", group) for n in (na, nb))
        rows.append(
            C.paired(f"share of Σ|attribution|: {group}", ga, gb, lambda g: H.pct(g.abs_share))
        )
        rows.append(C.paired(f"Σ attribution: {group}", ga, gb, lambda g: H.num(g.total)))
    rows.append(C.row("blue-wall correlate", _wall(na), _wall(nb)))
    rows.extend(C.completeness_rows(sa, sb))
    for name in {r.name: None for n in (na, nb) for r in n.causal}:
        ra, rb = (C.find(n.causal, "name", name) for n in (na, nb))
        rows.append(C.paired(f"causal drop: {name}", ra, rb, lambda r: H.num(r.drop)))
    return C.summaries_table(inputs, rows)


def group_shares_figure(shares: dict[str, dict[str, float]], title: str = "") -> Figure:
    """Grouped bars: {run: {group: abs share}}, one bar group per concept group."""
    groups = sorted({g for s in shares.values() for g in s})
    fig = Figure(figsize=(9, 3.4))
    ax = fig.subplots()
    width = 0.8 / max(len(shares), 1)
    for i, (run, s) in enumerate(shares.items()):
        xs = np.arange(len(groups)) + i * width
        ax.bar(xs, [s.get(g, 0.0) for g in groups], width=width, label=F.text(run))
    ax.set_xticks(np.arange(len(groups)) + width * (len(shares) - 1) / 2,
                  [F.text(g) for g in groups])
    ax.set_ylabel("share of Σ|attribution|")
    ax.set_title(F.text(title) or "reinforcement by concept group")
    ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


def groups_section(inputs: ComparisonInputs) -> Section:
    shares = {
        lab: {g.group: g.abs_share for g in n.groups}
        for lab, n in zip(inputs.labels, _numbers(inputs))
    }
    if any(shares.values()):
        body = inputs.figs.put("groups", group_shares_figure(shares), "group shares")
    else:
        body = H.missing(
            "No group shares: no integrated feature rows or no concept groups in demo.json."
        )
    return "groups", "Reinforcement by concept group", body
