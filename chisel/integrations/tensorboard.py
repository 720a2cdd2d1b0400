"""TensorBoard: a live view of a recording, and the export of a recorded run.

    >>> with chisel.record(model, opt, "runs/x", tensorboard=True) as rec:  # doctest: +SKIP
    ...     ...; rec.tag(loss=loss.item()); opt.step()
    $ tensorboard --logdir runs/x/tensorboard

Scalars, one point per optimizer step (the step index is TensorBoard's step):

- `update/norm`: ‖Δθ_t‖ over every recorded parameter; `update/norm/<module>`: per module
  (the parameters `<module>.weight`, `<module>.bias`, … together);
- `grad/norm`: the norm of the gradient the optimizer consumed; `optim/lr`: group 0's lr;
- `tag/<name>`: a scalar tag (`rec.tag(loss=...)`), or the mean of a per-sample tag.

`chisel tensorboard RUN_DIR` writes the same scalars for a recorded run (and with `--ledger`,
`timeline/<feature>`: the cumulative integrated attribution of `chisel.timeline`, and
`metric/delta` per attributed step). The live view runs in chisel's writer thread, after the
step's file is written, from the norms the writer computed there: the training thread does no
extra work. It needs the `tensorboard` package (`pip install 'chisel-rl[tensorboard]'`).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from chisel.capture.step_record import StepRecord
from chisel.integrations._require import require

__all__ = ["DEFAULT_DIR", "LiveView", "export", "step_scalars"]

DEFAULT_DIR = "tensorboard"  # inside the run directory
UPDATE_NORM, GRAD_NORM, LR, TAG, TIMELINE, DELTA_METRIC = (
    "update/norm", "grad/norm", "optim/lr", "tag/", "timeline/", "metric/delta")
_WHAT = "chisel's TensorBoard view"


def log_dir(run_dir: str | os.PathLike, tensorboard: bool | str | os.PathLike) -> Path:
    """The event-file folder: `<run_dir>/tensorboard` for True, else the path given."""
    if tensorboard is True:
        return Path(run_dir) / DEFAULT_DIR
    if isinstance(tensorboard, (str, os.PathLike)) and str(tensorboard):
        return Path(tensorboard)
    raise TypeError(
        f"tensorboard must be True or a log directory (str or pathlib.Path), not {tensorboard!r}."
    )


def _module(param: str) -> str:
    return param.rsplit(".", 1)[0] if "." in param else param


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float, np.number)) and math.isfinite(float(value)):
        return float(value)
    return None


def step_scalars(
    update_norms: Mapping[str, float] | None,
    grad_norm: Any = None,
    lr: Any = None,
    tags: Mapping[str, Any] | None = None,
) -> dict[str, float]:
    """The scalars of one step: update norms (total and per module), grad norm, lr, tags
    (per-sample tags by their mean). Non-finite and missing values are left out."""
    out: dict[str, float] = {}
    norms = {n: float(v) for n, v in (update_norms or {}).items() if _number(v) is not None}
    if norms:
        out[UPDATE_NORM] = math.sqrt(sum(v * v for v in norms.values()))
        per_module: dict[str, float] = {}
        for name, value in norms.items():
            per_module[_module(name)] = per_module.get(_module(name), 0.0) + value * value
        out.update({f"{UPDATE_NORM}/{m}": math.sqrt(s) for m, s in per_module.items()})
    for key, value in ((GRAD_NORM, grad_norm), (LR, lr)):
        if _number(value) is not None:
            out[key] = float(value)
    for name, value in (tags or {}).items():
        if hasattr(value, "numpy"):  # a per-sample tensor: its mean (numpy, no torch op)
            value = value.numpy()
        if isinstance(value, np.ndarray) and value.size and value.dtype.kind in "biuf":
            value = float(value.astype(np.float64).mean())
        if _number(value) is not None:
            out[TAG + name] = float(value)
    return out


class LiveView:
    """Streams each recorded step's scalars to TensorBoard event files in `log_dir`.

    The `SummaryWriter` is made at the first step (so a start that fails leaves no folder).
    A failure of the view is reported once as a warning and ends the view, never the recording.
    """

    def __init__(self, log_dir: str | os.PathLike, geometry: Any = None) -> None:
        """geometry: a `live_geometry.LiveGeometry` for the features' read/write per step."""
        require("tensorboard", "tensorboard", _WHAT)  # before anything touches disk
        self.log_dir = Path(log_dir)
        self.geometry = geometry
        self._writer: Any = None
        self._failed = False

    def add_step(
        self,
        record: StepRecord,
        tags: Mapping[str, Any],
        deltas: Mapping[str, Any] | None = None,
    ) -> None:
        """Called by chisel's writer thread with a written step's record, tags and (when the
        view shows feature geometry) its update per parameter."""
        if self._failed or record.skipped:
            return
        try:
            if self._writer is None:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(str(self.log_dir))
            scalars = step_scalars(record.update_norms, record.grad_norm, record.lr, tags)
            if self.geometry is not None and deltas is not None:
                scalars.update(self.geometry.scalars(deltas))
            for name, value in scalars.items():
                self._writer.add_scalar(name, value, record.step)
        except Exception as err:
            self._failed = True
            warnings.warn(
                f"chisel: the TensorBoard view in {self.log_dir} stopped at step "
                f"{record.step} ({type(err).__name__}: {err}); recording goes on. "
                "Export the run afterwards with `chisel tensorboard RUN_DIR`.",
                RuntimeWarning,
                stacklevel=2,
            )

    def close(self) -> None:
        if self.geometry is not None:
            self.geometry.remove()
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()

    def __repr__(self) -> str:
        return f"LiveView({self.log_dir})"


def export(
    run_dir: str | os.PathLike, out: str | os.PathLike | None = None, *, ledger: bool = False
) -> Path:
    """Write a recorded run's step scalars (and, with `ledger`, its timeline) as TensorBoard
    event files in `out` (default `<run_dir>/tensorboard`); return that folder.

    Raises:
        NotARunError: run_dir holds no run. FileNotFoundError: `ledger` without ledger.parquet.
    """
    require("tensorboard", "tensorboard", _WHAT)
    from torch.utils.tensorboard import SummaryWriter

    from chisel.store.reader import load

    run = load(run_dir)
    folder = Path(out) if out is not None else Path(run_dir) / DEFAULT_DIR
    frame = _ledger_timeline(Path(run_dir)) if ledger else None
    writer = SummaryWriter(str(folder))
    try:
        steps = run.steps
        norm_columns = [c for c in steps.columns if c.startswith("update_norm/")]
        for _, row in steps.iterrows():
            if bool(row.get("skipped")):
                continue
            t = int(row["step"])
            norms = {c.removeprefix("update_norm/"): row[c] for c in norm_columns}
            tags = run.tags(t) if row.get("tags") else {}
            for name, value in step_scalars(norms, row.get("grad_norm"), row.get("lr"), tags).items():
                writer.add_scalar(name, value, t)
        if frame is not None:
            timeline, delta = frame
            for t, values in timeline.iterrows():
                for feature, value in values.items():
                    if _number(value) is not None:
                        writer.add_scalar(TIMELINE + str(feature), float(value), int(t))
            for t, value in delta.items():
                writer.add_scalar(DELTA_METRIC, float(value), int(t))
    finally:
        writer.close()
    return folder


def _ledger_timeline(run_dir: Path) -> tuple[Any, Any]:
    """(`chisel.timeline` of the ledger's features [step × feature], Δm per step)."""
    from chisel.attribution import ledger as L
    from chisel.attribution.timeline import timeline

    path = run_dir / "ledger.parquet"
    if not path.is_file():
        raise FileNotFoundError(
            f"--ledger: {path} does not exist. Attribute the run first "
            "(chisel.attribute(run, model, features, metric, out=True)), or export without --ledger."
        )
    frame = L.load_ledger(path)
    tl = timeline(frame)
    tl = tl[[c for c in tl.columns if c not in L.NOT_FEATURES]]
    rows = frame[(frame[L.FAMILY] == L.INTEGRATED) & (frame[L.QUANTITY] == L.DELTA_METRIC)
                 & (frame[L.FEATURE] == L.WHOLE)]
    return tl, rows.groupby(L.STEP)[L.VALUE].sum()
