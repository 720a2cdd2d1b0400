"""The TrashWorld demo's credit section: the training samples' credit by the reward event after
their action (trash deposited, button pressed), by the first reward event later in their episode,
and by the sign of their advantage (tags the demo's PPO logs, see chisel.demo.attribute).

Built from the generic pieces of `chisel.report.tables` (tagged rows, sample counts of rows
summed by `credit_by`) and `chisel.report.sections` (tables, momentum and optimizer notes).
"""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure

from chisel.attribution import ledger as L
from chisel.report import figures as F
from chisel.report import html as H
from chisel.report import tables as T
from chisel.report.artifacts import LEDGER_FILE, RunArtifacts
from chisel.report.sections import FigureSink, Section, absent, credit_notes, credit_table

REWARD_SOURCE_TAG = L.TAG_PREFIX + "reward_source"
NEXT_REWARD_SOURCE_TAG = L.TAG_PREFIX + "next_reward_source"
ADVANTAGE_TAG = L.TAG_PREFIX + "advantage"
ADVANTAGE_SIGN_TAG = L.TAG_PREFIX + "advantage_sign"
REWARD_SOURCES = {0: "none", 1: "trash deposited", 2: "button pressed"}
_EMPTY = ("samples", "total", "per_sample")


def _source_label(value: float) -> str:
    if pd.isna(value):
        return "untagged"
    return REWARD_SOURCES.get(int(value), f"source {int(value)}")


def credit_by_reward_source(
    ledger: pd.DataFrame | None, tag: str = REWARD_SOURCE_TAG
) -> pd.DataFrame:
    """Whole-sample credit (tagged rows, feature "") summed per reward source.

    tag: `tag/reward_source` (the reward right after the sample's action) or
    `tag/next_reward_source` (the first reward after it in the episode).
    """
    rows = T.sample_rows(ledger)
    if not len(rows) or tag not in rows or rows[tag].isna().all():
        return pd.DataFrame(columns=list(_EMPTY))
    order = {label: i for i, label in enumerate(REWARD_SOURCES.values())}
    out = T.grouped_credit(rows, rows[tag].map(_source_label))
    return out.sort_index(key=lambda idx: idx.map(lambda s: order.get(s, len(order))))


def _sign_label(value: float) -> str:
    if pd.isna(value):
        return "untagged"
    return "advantage > 0" if value > 0 else "advantage < 0" if value < 0 else "advantage = 0"


def credit_by_advantage(ledger: pd.DataFrame | None) -> pd.DataFrame:
    """Whole-sample credit summed by the sign of `tag/advantage` (or of `tag/advantage_sign`
    where rows were summed by it and the raw advantage is gone)."""
    rows = T.sample_rows(ledger)
    present = [c for c in (ADVANTAGE_TAG, ADVANTAGE_SIGN_TAG) if c in rows]
    if not len(rows) or not present:
        return pd.DataFrame(columns=list(_EMPTY))
    sign = rows[present[0]]
    for column in present[1:]:
        sign = sign.fillna(rows[column])
    if sign.isna().all():
        return pd.DataFrame(columns=list(_EMPTY))
    out = T.grouped_credit(rows, sign.map(_sign_label))
    order = ["advantage > 0", "advantage < 0", "advantage = 0", "untagged"]
    return out.reindex([g for g in order if g in out.index])


def credit_features_by_source(ledger: pd.DataFrame | None, k: int = 8) -> pd.DataFrame:
    """Tagged feature credit, feature × reward source, the k features largest in |total|
    (empty when feature rows were summed over samples without tags)."""
    rows = T.sample_rows(ledger, whole=False)
    if not len(rows) or REWARD_SOURCE_TAG not in rows:
        return pd.DataFrame()
    table = rows.assign(source=rows[REWARD_SOURCE_TAG].map(_source_label)).pivot_table(
        index=L.FEATURE, columns="source", values=L.VALUE, aggfunc="sum", fill_value=0.0
    )
    top = table.abs().sum(axis=1).sort_values(ascending=False).index[:k]
    order = [*REWARD_SOURCES.values()]
    columns = sorted(table.columns, key=lambda c: order.index(c) if c in order else len(order))
    table.columns.name = None
    return table.loc[top, columns]


def credit_figure(by_source: pd.DataFrame, by_advantage: pd.DataFrame) -> Figure:
    """Credit summed per reward event and per advantage sign (two bar panels)."""
    fig = Figure(figsize=(10, 3.4))
    axes = fig.subplots(1, 2)
    for ax, frame, title in (
        (axes[0], by_source, "credit by reward event"),
        (axes[1], by_advantage, "credit by advantage sign"),
    ):
        if frame.empty:
            ax.text(0.5, 0.5, "no tagged per-sample rows", ha="center", va="center",
                    transform=ax.transAxes)
        else:
            values = frame["total"].to_numpy(dtype=float)
            ax.bar(range(len(frame)), values,
                   color=["#4c72b0" if v >= 0 else "#dd8452" for v in values])
            ax.set_xticks(range(len(frame)), [F.text(i) for i in frame.index], fontsize=8)
            ax.axhline(0.0, color="0.3", lw=0.8)
        ax.set_title(title)
        ax.set_ylabel("Σ credit (Δ metric)")
    fig.tight_layout()
    return fig


def credit_section(art: RunArtifacts, figs: FigureSink) -> Section:
    """Stands in for the generic "credit by tag" section on demo runs."""
    title = "Credit by reward event and advantage sign"
    by_source = credit_by_reward_source(art.ledger)
    by_adv = credit_by_advantage(art.ledger)
    if by_source.empty and by_adv.empty:
        return "credit", title, absent(art, LEDGER_FILE, "credit (no tagged per-sample credit rows)")
    by_next = credit_by_reward_source(art.ledger, NEXT_REWARD_SOURCE_TAG)
    body = [
        H.para(
            "Credit of the training samples (whole-sample rows, summed over parameters and the "
            "updates their gradients reached through momentum), grouped by the reward event "
            "right after each sample's action (tag/reward_source), by the first reward event "
            "later in its episode (tag/next_reward_source) and by the sign of its advantage. "
            "Where the ledger holds sums over tag groups (credit_by), a group's samples are "
            "read from its rows' count column (— where the ledger has none)."
        ),
        figs.put("credit", credit_figure(by_source, by_adv), "credit"),
    ]
    for frame, label, tag in (
        (by_source, "reward event", "reward_source"),
        (by_next, "next reward event", "next_reward_source"),
        (by_adv, "advantage", "advantage"),
    ):
        if frame.empty and tag == "next_reward_source":
            continue
        body.append(
            credit_table(frame, label) if not frame.empty else H.missing(f"No tag/{tag} column.")
        )
    per_feature = credit_features_by_source(art.ledger)
    if not per_feature.empty:
        body.append(H.para("Per-sample credit through each feature, by reward event:"))
        cols = list(per_feature.columns)
        body.append(
            H.table(
                ["feature", *cols],
                [
                    (n, *(H.num(v) for v in r))
                    for n, r in zip(per_feature.index, per_feature.to_numpy())
                ],
                numeric=tuple(range(1, len(cols) + 1)),
            )
        )
    body.extend(credit_notes(art))
    return "credit", title, "".join(body)
