"""`chisel.attribute`: stream over the steps of a run and write the ledger."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

import probes
from chisel.attribution import ledger as L
from chisel.attribution.binding import AttributionInputError, Binding, bind
from chisel.attribution.functional import ParamSpace, UpdatePath
from chisel.attribution.geometry import geometry_rows
from chisel.attribution.integrated import bias_row, kernel_rows, param_rows
from chisel.attribution.metrics import Metric
from chisel.attribution.quadrature import integrate_path
from chisel.errors import StepOutOfRangeError
from chisel.store.index import as_step
from chisel.store.reader import Run, load

Features = probes.FeatureSet | Iterable[probes.Feature] | probes.Feature | None


def _feature_set(features: Features) -> probes.FeatureSet:
    if features is None:
        return probes.FeatureSet([])
    if isinstance(features, probes.Feature):
        return probes.FeatureSet([features])
    return features if isinstance(features, probes.FeatureSet) else probes.FeatureSet(list(features))


def _steps(run: Run, steps: int | Iterable[int] | None) -> list[int]:
    n = len(run)
    if steps is None:
        return list(range(n))
    scalar = isinstance(steps, int) or getattr(steps, "ndim", None) == 0
    chosen = [as_step(t, "steps entry") for t in ([steps] if scalar else list(steps))]
    bad = [t for t in chosen if not 0 <= t < n]
    if bad:
        raise StepOutOfRangeError(
            f"steps {bad[:5]} are outside the run ({n} recorded steps: 0..{n - 1})."
        )
    return chosen


Family = Literal["geometry", "integrated", "credit"]
SplitMode = Literal["auto", "kinks", "none"]
SPLITS: tuple[str, ...] = get_args(SplitMode)


@dataclass(frozen=True)
class AttributionOptions:
    """How each step is attributed (the keywords of `chisel.attribute` that shape the rows),
    checked when made: an option that would fail late, after the work, or be taken letter by
    letter (a string for a sequence) is refused here with an `AttributionInputError`."""

    families: tuple[Family, ...] = L.FAMILIES
    points: int = 16
    dtype: torch.dtype = torch.float64
    split: SplitMode = "auto"
    device: str | torch.device = "cpu"
    horizon: int | None = None
    credit_by: tuple[str, ...] | None = None
    batch_points: bool | None = None
    centred: bool = True
    reference: Any = None

    def __post_init__(self) -> None:
        families, credit_by = self.families, self.credit_by
        if isinstance(families, str):
            raise AttributionInputError(
                f"families={families!r} is a string; give a sequence, e.g. families=({families!r},)."
            )
        if isinstance(credit_by, str):
            raise AttributionInputError(
                f"credit_by={credit_by!r} is a string; give a sequence of tag names, e.g. "
                f"credit_by=[{credit_by!r}]."
            )
        object.__setattr__(self, "families", tuple(families))
        object.__setattr__(self, "credit_by", None if credit_by is None else tuple(credit_by))
        unknown = set(self.families) - set(L.FAMILIES)
        if unknown:
            raise AttributionInputError(f"unknown families {sorted(unknown)}; use any of {L.FAMILIES}.")
        points = self.points
        if isinstance(points, bool) or not isinstance(points, int) or points < 1:
            raise AttributionInputError(
                f"points={points!r}: the Gauss-Legendre points per piece must be an int >= 1 (16 "
                "closes smooth networks to ~1e-15 in float64)."
            )
        if self.split not in SPLITS:
            raise AttributionInputError(f"split={self.split!r}; use one of {SPLITS}.")
        if not (isinstance(self.dtype, torch.dtype) and self.dtype.is_floating_point):
            raise AttributionInputError(
                f"dtype={self.dtype!r}: attribution needs a floating dtype (torch.float64 for sums "
                "that close to rounding, torch.float32 for speed)."
            )
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError) as err:
            raise AttributionInputError(f"device={self.device!r} is not a torch device ({err}).") from err


def _check_out(out: Any) -> None:
    if out not in (None, False, True) and Path(out).is_dir():
        raise AttributionInputError(
            f"out={str(out)!r} is a directory; give the ledger's file path, e.g. "
            f"{str(Path(out) / 'ledger.parquet')!r}, or out=True for <run>/ledger.parquet."
        )


def _check_model(run: Run, model: nn.Module) -> None:
    have = {n: tuple(p.shape) for n, p in model.named_parameters()}
    shapes = {p["name"]: tuple(p["shape"]) for p in run.manifest["params"]}
    wrong = [f"{n}: run {s}, model {have.get(n, 'missing')}" for n, s in shapes.items() if have.get(n) != s]
    if wrong:
        raise AttributionInputError(
            f"the model does not match the run's parameters ({'; '.join(wrong[:4])}). Pass a model "
            "of the architecture that was trained; its parameter values do not matter."
        )


def _tag_columns(run: Run, steps: Sequence[int]) -> list[str]:
    names: set[str] = set()
    for t in steps:
        names.update(run.record(t).tags)
    return sorted(L.TAG_PREFIX + n for n in names)


def attribute(
    run: Run | str | os.PathLike,
    model: nn.Module,
    features: Features,
    metric: Metric,
    *,
    steps: int | Iterable[int] | None = None,
    families: Sequence[str] = L.FAMILIES,
    points: int = 16,
    dtype: torch.dtype = torch.float64,
    split: str = "auto",
    device: str | torch.device = "cpu",
    out: bool | str | os.PathLike | None = None,
    horizon: int | None = None,
    credit_by: Sequence[str] | None = None,
    progress: bool | None = None,
    return_ledger: bool = True,
    batch_points: bool | None = None,
    centred: bool = True,
    reference: Any = None,
) -> pd.DataFrame | None:
    """Attribute every chosen update of `run` to `features`, as changes of `metric`.

    Args:
        run: a `chisel.Run` or its directory.
        model: supplies the architecture; the parameters come from the run.
        features: a `probes.FeatureSet` (or features); may be empty for param-level rows only.
        metric: `model -> scalar tensor` (see `chisel.metrics`).
        steps: which steps (default: all; skipped AMP steps are left out).
        families: any of "geometry", "integrated", "credit".
        points: Gauss-Legendre points per smooth piece of the path.
        dtype: computation dtype (float64 for sums that close to ~1e-12).
        split: "auto" splits the path at the kinks of piecewise-linear activation modules
            (nn.ReLU, LeakyReLU, ReLU6, Hardtanh, PReLU) when the model has any, "kinks" always
            looks for them, "none" never. Functional calls (F.relu) are not seen.
        out: write the ledger as parquet, streaming step by step: True for
            `<run>/ledger.parquet`, or a path.
        horizon: how many earlier steps' samples receive credit through momentum (default:
            the steps holding 99% of the buffer's mass, i.e. while the decay since that step is
            >= 1e-2, at most 500 steps; what is left is reported per step as
            "momentum_unresolved_share").
        credit_by: per-sample tag names; when given, credit rows of samples are summed within
            the groups of these tags (with `sample` null) instead of one row per sample.
        progress: show a progress bar (default: when stderr is a terminal).
        batch_points: evaluate the gradients at all quadrature points in one vmapped call
            (default: on accelerators; on CPU a loop of backward passes is faster).
        return_ledger: with `out`, False keeps nothing in memory across steps (rows go
            straight to the parquet file) and returns None; read it with `chisel.load_ledger`.
        centred: split each weight's input around its mean over the metric's states: features
            get the share of their variation, the mean input its own "<mean>" row (integrated
            and credit; a weight without a bias cannot be centred and is split uncentred, with a
            warning). False: the plain split (no "<mean>" rows). A feature constant over the
            metric's states (a metric on states where a cue is present) has no variation there
            and gets no share: centre on a `reference` that contains its contrast instead.
        reference: model inputs (a tensor or a tuple of positional inputs) whose mean input
            per weight centres the split, instead of the metric's own states.

    Returns:
        The ledger: columns step, family, param, site, feature, quantity, value, part, sample,
        origin_step, count and one `tag/<name>` column per tag (credit rows). Quantity
        "attribution" splits each weight's share by its input features, "attribution_write" by
        its output features (both close to the same share; see docs/concepts.md).
    """
    run = run if isinstance(run, Run) else load(run)
    options = AttributionOptions(
        families, points, dtype, split, device, horizon, credit_by, batch_points, centred, reference
    )
    _check_out(out)
    chosen = [t for t in _steps(run, steps) if not run.record(t).skipped]
    plan = _Plan.make(run, model, metric, features, options)
    tag_columns = _tag_columns(run, chosen) if L.CREDIT in options.families else []
    path = Path(run.path / "ledger.parquet") if out is True else Path(out) if out else None
    writer = L.LedgerWriter(path, tag_columns) if path else None
    credit = _credit_engine(run, horizon, options.credit_by) if L.CREDIT in options.families else None
    frames = []
    show = sys.stderr.isatty() if progress is None else progress
    failed = True
    try:
        # in a log file (no terminal) a redraw is a new line: redraw rarely
        interval = 0.1 if sys.stderr.isatty() else 15.0
        for t in tqdm(chosen, desc="attributing", unit="step", disable=not show, mininterval=interval):
            rows = _step_rows(run, t, plan, credit)
            frame = L.to_frame(rows, tag_columns)
            if writer is not None:
                writer.write(frame)
            if return_ledger or writer is None:
                frames.append(frame)
        failed = False
    finally:
        if writer is not None:
            writer.abort() if failed else writer.close()
    if writer is not None and not return_ledger:
        return None
    if not frames:
        return L.to_frame([], tag_columns)
    return pd.concat(frames, ignore_index=True)


@dataclass(frozen=True)
class _Plan:
    """What every step of one `attribute` call shares: the options, the model's functional
    copy with the metric, and the features bound to the weights."""

    space: ParamSpace
    binding: Binding
    options: AttributionOptions

    @classmethod
    def make(
        cls, run: Run, model: nn.Module, metric: Metric, features: Features, options: AttributionOptions
    ) -> _Plan:
        features = _feature_set(features)
        _check_model(run, model)
        o = options
        space = ParamSpace(model, metric, o.dtype, o.device, batch_points=o.batch_points)
        names = set(run.param_names)
        binding = bind(space.model, space.run_metric, space.dtype, names, features, o.centred)
        return cls(space, binding, options)


def _step_rows(run: Run, t: int, plan: _Plan, credit: Any) -> pd.DataFrame:
    """One step's ledger rows (all families asked for), in the ledger's columns."""
    space, o = plan.space, plan.options
    families = o.families
    blocks, by_param = plan.binding.blocks, plan.binding.by_param
    theta = {n: v.to(space.device, space.dtype) for n, v in run.params(t).items()}
    delta = {n: v.to(space.device, space.dtype) for n, v in run.update(t).items()}
    rows: list[dict[str, Any]] = []
    if L.GEOMETRY in families:
        for param, (ins, outs) in blocks.items():
            w = by_param[param]
            outs = None if outs is not None and outs.carried else outs  # geometry: exact sites only
            if ins is not None or outs is not None:
                rows += geometry_rows(t, param, w.matrix(theta[param]), w.matrix(delta[param]), ins, outs)
    if L.INTEGRATED not in families and L.CREDIT not in families:
        return pd.DataFrame(rows)
    path = UpdatePath(space, theta, delta)
    integral = integrate_path(path, points=o.points, split=o.split)
    kernels = plan.binding.kernels(space, path, integral.gbar, o.centred, o.reference)
    if L.INTEGRATED in families:
        rows += param_rows(t, delta, integral)
        for param, sides in kernels.items():
            w = by_param[param]
            for k in sides:
                rows += kernel_rows(t, w, delta, k)
            ins = blocks[param][0]
            if ins is not None and w.bias is not None:
                rows.append(bias_row(t, w, ins.sites[0], delta, integral.gbar))
    if credit is not None:
        by_module = {by_param[p].module: sides for p, sides in kernels.items()}
        return pd.concat([pd.DataFrame(rows), credit(t, integral.gbar, by_module)], ignore_index=True)
    return pd.DataFrame(rows)


def _credit_engine(run: Run, horizon: int | None, by: Sequence[str] | None):
    """A callable (t, ḡ, kernels) -> credit rows, or an error if the run cannot support credit."""
    from chisel.attribution import credit as credit_module

    return credit_module.engine(run, horizon, by)
