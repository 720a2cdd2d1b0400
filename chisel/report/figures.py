"""The report's figures: one function per figure, each returning a matplotlib Figure (Agg)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from chisel.attribution import ledger as L
from chisel.report.tables import Circuits

CURVE_X = "update"  # the training curve's step column; every other column is drawn
_MAX_LABEL = 48


def text(s: object) -> str:
    """A user string as literal matplotlib text: `$` would start mathtext; long names are cut."""
    s = str(s)
    s = s if len(s) <= _MAX_LABEL else s[: _MAX_LABEL - 1] + "…"
    return s.replace("\\", "\\\\").replace("$", r"\$")


def _subplots(*grid: int, figsize: tuple[float, float], **kw: object) -> tuple[Figure, object]:
    """`pyplot.subplots` without pyplot: a bare `Figure` (no backend switch, no global figure
    registry, nothing to close), rendered by Agg when saved."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*grid, **kw)


def to_png(fig: Figure, path: Path | None = None) -> bytes:
    """The figure as PNG bytes (no metadata text), also written to `path`."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    data = buf.getvalue()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return data


def _top_columns(tl: pd.DataFrame, k: int) -> pd.DataFrame:
    final = tl.iloc[-1].abs().sort_values(ascending=False, kind="stable")
    return tl[final.index[:k]]


Curves = Sequence[tuple[str, str]] | None  # (column, legend label); None: every column


def _draw_timeline(ax: Axes, tl: pd.DataFrame, k: int, metric: str = "") -> None:
    if tl.empty:
        ax.text(
            0.5,
            0.5,
            "no integrated attribution rows",
            ha="center",
            va="center",
            transform=ax.transAxes,
        )
        return
    for name, col in _top_columns(tl, k).items():
        ax.plot(tl.index, col.to_numpy(), marker="o", ms=3, lw=1.5, label=text(name))
    ax.axhline(0.0, color="0.6", lw=0.8)
    ax.set_ylabel(f"cumulative attribution\n(Δ {text(metric or 'metric')})")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)


def _draw_curve(ax: Axes, curve: pd.DataFrame | None, columns: Curves = None) -> None:
    if curve is None or curve.empty or CURVE_X not in curve:
        ax.text(
            0.5,
            0.5,
            "no training curve (demo.json)",
            ha="center",
            va="center",
            transform=ax.transAxes,
        )
        return
    if not columns:
        columns = [
            (str(c), str(c).replace("_", " "))
            for c in curve.columns
            if c != CURVE_X and pd.api.types.is_numeric_dtype(curve[c])
        ]
    for column, label in columns:
        if column in curve:
            ax.plot(curve[CURVE_X], curve[column], lw=1.5, label=text(label))
    ax.set_ylabel("per episode")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("optimizer step")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)


def timeline_figure(
    tl: pd.DataFrame,
    curve: pd.DataFrame | None,
    k: int = 8,
    title: str = "",
    curve_panel: bool | None = None,
    curves: Curves = None,
    metric: str = "",
) -> Figure:
    """The chisel timeline (top-k features by |final|) above the training curve (every column
    of `curve` against its "update" column), sharing steps. `curve_panel` (default: whether
    there is a curve) draws the lower panel, noting a missing curve there; `curves` picks and
    labels its columns; `metric` names the metric on the timeline's axis."""
    if not (curve is not None if curve_panel is None else curve_panel):
        fig, top = _subplots(figsize=(11, 4))
        _draw_timeline(top, tl, k, metric)
        top.set_title(text(title) or "cumulative reinforcement per feature pathway")
        top.set_xlabel("optimizer step")
        fig.tight_layout()
        return fig
    fig, (top, bottom) = _subplots(2, 1, figsize=(11, 6.5), sharex=True, height_ratios=[3, 2])
    _draw_timeline(top, tl, k, metric)
    top.set_title(text(title) or "cumulative reinforcement per feature pathway")
    _draw_curve(bottom, curve, curves)
    bottom.set_title("reward over training")
    bottom.set_xlabel("optimizer step")
    fig.tight_layout()
    return fig


def timeline_pair_figure(
    tls: list[pd.DataFrame],
    curves: list[pd.DataFrame | None],
    names: list[str],
    k: int = 6,
    columns: Sequence[Curves] = (),
    metrics: Sequence[str] = (),
) -> Figure:
    """Two runs side by side: timelines on top, training curves below (when either run has
    one), one column per run."""
    rows = 2 if any(c is not None for c in curves) else 1
    fig, axes = _subplots(
        rows, len(tls), figsize=(7 * len(tls), 3 * rows), squeeze=False,
        height_ratios=[3, 2][:rows],
    )
    for j, (tl, curve, name) in enumerate(zip(tls, curves, names)):
        _draw_timeline(axes[0, j], tl, k, metrics[j] if j < len(metrics) else "")
        axes[0, j].set_title(text(name))
        if rows == 2:
            _draw_curve(axes[1, j], curve, columns[j] if j < len(columns) else None)
            axes[1, j].sharex(axes[0, j])
    fig.tight_layout()
    return fig


def probes_figure(probes: pd.DataFrame, max_panels: int = 24) -> Figure:
    """One heatmap per concept (and metric): probe score by site (y) and step (x)."""
    panels = list(probes.groupby(["concept", "metric"], sort=False))[:max_panels]
    cols = min(4, len(panels))
    rows = int(np.ceil(len(panels) / cols))
    fig, axes = _subplots(rows, cols, figsize=(3.4 * cols, 2.6 * rows + 0.4), squeeze=False)
    ranges = probes.groupby("metric")["score"].agg(["min", "max"])
    for ax, ((concept, metric), frame) in zip(axes.flat, panels):
        grid = frame.pivot_table(index="site", columns="step", values="score", aggfunc="mean")
        lo, hi = ranges.loc[metric, "min"], ranges.loc[metric, "max"]
        if not (np.isfinite(lo) and np.isfinite(hi)):  # a metric with no finite score
            lo, hi = 0.0, 1.0
        im = ax.imshow(
            grid.to_numpy(), aspect="auto", cmap="viridis", vmin=lo, vmax=hi if hi > lo else lo + 1
        )
        ax.set_title(f"{text(concept)} ({text(metric)})", fontsize=9)
        ax.set_yticks(range(len(grid.index)), [text(s) for s in grid.index], fontsize=7)
        steps = list(grid.columns)
        ticks = sorted({0, len(steps) // 2, len(steps) - 1})
        ax.set_xticks(ticks, [str(steps[i]) for i in ticks], fontsize=7)
        ax.set_xlabel("step", fontsize=7)
        fig.colorbar(im, ax=ax, fraction=0.05, pad=0.02).ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle("probe scores: concept × site × step")
    fig.tight_layout()
    return fig


def circuits_figure(circ: Circuits, k: int = 10) -> Figure:
    """Horizontal bars: the k most strengthened (positive) and k most weakened circuits."""
    up, down = circ.strengthened(k), circ.weakened(k)
    bars = pd.concat([down.sort_values(ascending=False), up.sort_values()])
    fig, ax = _subplots(figsize=(9, 0.3 * max(len(bars), 4) + 1.2))
    colors = ["#2a7f62" if v > 0 else "#b8433a" for v in bars.to_numpy()]
    ax.barh(range(len(bars)), bars.to_numpy(), color=colors)
    ax.set_yticks(range(len(bars)), [text(n) for n in bars.index], fontsize=7)
    ax.axvline(0.0, color="0.3", lw=0.8)
    ax.set_xlabel("Σ_t uᵀ ΔW_t d  (connection change, summed over steps)")
    what = "features → actions" if circ.to_actions else "feature → feature"
    ax.set_title(f"strongest strengthened and weakened circuits ({what})")
    fig.tight_layout()
    return fig


def credit_by_tag_figure(tables: dict[str, pd.DataFrame]) -> Figure:
    """Credit summed per tag value (or sign), one bar panel per tag (at most four)."""
    shown = list(tables.items())[:4]
    fig, axes = _subplots(1, len(shown), figsize=(4.2 * len(shown), 3.4), squeeze=False)
    for ax, (tag, frame) in zip(axes[0], shown):
        values = frame["total"].to_numpy(dtype=float)
        ax.bar(range(len(frame)), values, color=["#4c72b0" if v >= 0 else "#dd8452" for v in values])
        ax.set_xticks(range(len(frame)), [text(i) for i in frame.index], fontsize=7, rotation=30)
        ax.axhline(0.0, color="0.3", lw=0.8)
        ax.set_title(f"credit by {tag}")
        ax.set_ylabel("Σ credit (Δ metric)")
    fig.tight_layout()
    return fig


def completeness_figure(comp: pd.DataFrame) -> Figure:
    """Relative completeness error per attributed step, log scale (zeros drawn at 1e-16)."""
    fig, ax = _subplots(figsize=(9, 3))
    values = np.maximum(comp[L.VALUE].to_numpy(dtype=float), 1e-16)
    ax.semilogy(comp[L.STEP].to_numpy(), values, marker="o", ms=3, lw=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("|Σ A − Δm| / |Δm|")
    ax.set_title("completeness error of the integrated attribution")
    fig.tight_layout()
    return fig


_SHORT_LABEL = 28
_PART_COLORS = {
    "features": "#2a7f62",
    "dictionary": "#55a868",
    L.MEAN: "#8172b3",
    L.BIAS: "#dd8452",
    L.RESIDUAL: "#b8433a",
    L.SPAN: "#937860",
    "unsplit": "#7f7f7f",
}


def _short(s: object) -> str:
    """A point label: long names keep their head and tail ("concept…site"), which tell
    pathways apart, and lose the middle."""
    s = str(s)
    if len(s) > _SHORT_LABEL:
        tail = _SHORT_LABEL // 3
        s = s[: _SHORT_LABEL - tail - 1] + "…" + s[-tail:]
    return text(s)


def _extremes(xs: pd.Series, ys: pd.Series, k: int = 4) -> list:
    """Up to k points to name, the most extreme in |y| and |x| in turn, skipping a point whose
    label would overlap one already named (about the same height, within a label's width)."""
    span_x = float(xs.max() - xs.min()) or 1.0
    span_y = float(ys.max() - ys.min()) or 1.0
    by_y = ys.abs().sort_values(ascending=False).index
    by_x = xs.abs().sort_values(ascending=False).index
    named: list = []
    for i in dict.fromkeys(i for pair in zip(by_y, by_x) for i in pair):
        near = any(
            abs(xs[i] - xs[j]) < 0.4 * span_x and abs(ys[i] - ys[j]) < 0.07 * span_y for j in named
        )
        if not near:
            named.append(i)
        if len(named) == k:
            break
    return named


def _scatter(
    ax: Axes, rows: pd.DataFrame, x: str, y: str, xerr: str | None, absolute: bool
) -> None:
    keep = rows[np.isfinite(rows[x]) & np.isfinite(rows[y])]
    if keep.empty:
        ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
        return
    xs = keep[x].abs() if absolute else keep[x]
    err = keep[xerr].to_numpy() if xerr and np.isfinite(keep[xerr]).any() else None
    ax.errorbar(xs, keep[y], xerr=err, fmt="o", ms=4, color="#4c72b0", ecolor="0.6", elinewidth=0.8)
    ax.axhline(0.0, color="0.75", lw=0.8)
    ax.axvline(0.0, color="0.75", lw=0.8)
    # name the extreme points only (largest |y| and |x|), short, so long names stay readable
    middle = 0.5 * (xs.min() + xs.max())
    for i in _extremes(xs, keep[y]):
        right = xs[i] > middle  # labels point inwards, so they stay inside the panel
        ax.annotate(
            _short(keep.at[i, "label"]),
            (xs[i], keep.at[i, y]),
            xytext=(-4 if right else 4, 3),
            textcoords="offset points",
            ha="right" if right else "left",
            fontsize=6.5,
            color="0.25",
        )


def validation_figure(
    rows: pd.DataFrame,
    panels: list[tuple[str, str, str, bool]],
    names: dict[str, str],
    xerr: dict[str, str] | None = None,
) -> Figure:
    """Scatter panels of the feature pathways, one per (x column, y column, title, |x|?):
    rows of panels are the x columns in order, columns the y columns. `rows` needs "label"."""
    xs = list(dict.fromkeys(p[0] for p in panels))
    ys = list(dict.fromkeys(p[1] for p in panels))
    fig, axes = _subplots(
        len(xs), len(ys), figsize=(4.1 * len(ys), 3.5 * len(xs)), squeeze=False
    )
    spec = {(x, y): (title, absolute) for x, y, title, absolute in panels}
    for i, x in enumerate(xs):
        for j, y in enumerate(ys):
            ax = axes[i, j]
            if (x, y) not in spec:
                ax.axis("off")
                continue
            title, absolute = spec[x, y]
            _scatter(ax, rows, x, y, (xerr or {}).get(x), absolute)
            xname = f"|{names.get(x, x)}|" if absolute else names.get(x, x)
            err = (xerr or {}).get(x)
            if err and err in rows and np.isfinite(rows[err]).any():
                xname += " (± se)"
            ax.set_title(text(title), fontsize=9)
            ax.set_xlabel(text(xname), fontsize=8)
            ax.set_ylabel(text(names.get(y, y)), fontsize=8)
            ax.tick_params(labelsize=7)
    fig.tight_layout()
    return fig


def _robust_limits(values: np.ndarray) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return -0.1, 1.1
    lo, hi = np.quantile(finite, [0.02, 0.98])
    lo, hi = min(lo, 0.0), max(hi, 1.0)
    pad = 0.05 * (hi - lo)
    return lo - pad, hi + pad


def coverage_figure(
    step_mass: pd.DataFrame, cumulative: pd.DataFrame, names: dict[str, str]
) -> Figure:
    """Left: each part's share of the step's movement, |part_t| / Σ_parts |part_t|, stacked
    (bounded, where a share of a Δm_t near 0 is not); right: each part's share of Δm cumulated
    over the steps up to t (the central 96% of values sets the range)."""
    fig, axes = _subplots(1, 2, figsize=(11, 3.6))
    colors = [_PART_COLORS.get(p) for p in step_mass.columns]
    axes[0].stackplot(
        step_mass.index,
        step_mass.to_numpy(dtype=float).T,
        colors=colors,
        labels=[text(names.get(p, p)) for p in step_mass.columns],
        alpha=0.85,
    )
    axes[0].set_ylim(0.0, 1.0)
    axes[0].set_ylabel("share of the step's |parts|")
    axes[0].set_title("per step: |part_t| / Σ |parts_t|", fontsize=10)
    for part in cumulative.columns:
        axes[1].plot(
            cumulative.index,
            cumulative[part].to_numpy(dtype=float),
            lw=1.4,
            marker="o" if len(cumulative) <= 40 else None,
            ms=2.5,
            color=_PART_COLORS.get(part),
        )
    axes[1].axhline(0.0, color="0.6", lw=0.8)
    axes[1].set_ylim(*_robust_limits(cumulative.to_numpy(dtype=float).ravel()))
    axes[1].set_ylabel("share of Δm")
    axes[1].set_title("cumulated: Σ part / Σ Δm over the steps up to t", fontsize=10)
    for ax in axes:
        ax.set_xlabel("optimizer step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    handles, labels = axes[0].get_legend_handles_labels()
    axes[1].legend(
        handles, labels, fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False
    )
    fig.tight_layout()
    return fig
