"""A readable summary of a run directory (`chisel info`)."""

from __future__ import annotations

from chisel.store.reader import Run


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GB"


def summarize(run: Run) -> str:
    """Steps, parameters, skipped steps, tags, factor modules and size on disk, as text."""
    m = run.manifest
    steps = run.steps
    n = len(run)
    lines = [f"chisel run {run.path}"]
    lines.append(
        f"  model      {m['model']['class']}, optimizer {m['optimizer']['class']}, "
        f"recorded by chisel {m['chisel_version']} / torch {m['torch_version']}"
    )
    n_values = sum(_numel(p["shape"]) for p in m["params"])
    enc = sorted({p["encoding"] for p in m["params"]})
    lines.append(
        f"  params     {len(m['params'])} tensors, {n_values:,} values; stored as "
        f"{m['config']['dtype']} ({'/'.join(enc)}); frozen: {len(m['frozen'])}"
    )
    if n and "skipped" in steps:
        skipped = steps[steps["skipped"].fillna(False).astype(bool)]
        reasons = skipped["skip_reason"].value_counts().to_dict() if len(skipped) else {}
        span = ""
        if steps["time"].notna().any():
            span = f" over {steps['time'].max() - steps['time'].min():.1f} s"
        lines.append(f"  steps      {n}{span}; skipped {len(skipped)} {reasons or ''}".rstrip())
        if "error" in steps:
            bad = steps[steps["error"].notna()]["step"].tolist()
            lines.append(f"  unreadable steps {bad}")
        lr = steps["lr"].dropna()
        if len(lr):
            lines.append(f"  lr         {lr.iloc[0]:.3g} → {lr.iloc[-1]:.3g}")
        norms = steps["update_norm"].dropna()
        if len(norms):
            lines.append(
                f"  |Δθ|       median {norms.median():.3g}, max {norms.max():.3g}"
            )
        tag_names = sorted({t for s in steps["tags"].dropna() for t in s.split(",") if t})
        lines.append(f"  tags       {', '.join(tag_names) or '(none)'}")
    else:
        lines.append("  steps      0")
    fm = m.get("factor_modules", {})
    if fm:
        kinds = ", ".join(f"{k} ({v['kind']})" for k, v in list(fm.items())[:8])
        more = f" … and {len(fm) - 8} more" if len(fm) > 8 else ""
        lines.append(f"  factors    {len(fm)} modules: {kinds}{more}")
    else:
        lines.append("  factors    off")
    lines.append(f"  keyframes  {len(run.keyframes)} (at {run.keyframes[:6]}{' …' if len(run.keyframes) > 6 else ''})")
    lines.append(f"  on disk    {_size(run.size_bytes())}")
    return "\n".join(lines)


def _numel(shape: list[int]) -> int:
    out = 1
    for s in shape:
        out *= s
    return out
