"""Attribution on a cluster engine (Ray): `attribute_ray`, `chisel attribute --engine ray`.

Attribution is independent per step given ḡ's inputs, so the chosen steps are cut into contiguous
ranges, one Ray task each. Every task opens the run from its (shared) directory, rebuilds the
model and the metric, and writes its rows as one parquet file per step range,
`<out>/part-<first>-<last>.parquet`, written under a dot-name and renamed into place when complete.
`chisel.load_ledger(out)` reads the directory as one table sorted by step (`pandas.read_parquet`
and `pyarrow.dataset.dataset` read it as one table too).

Exactly the serial ledger: a task computes its steps with the serial engine's own step function;
the only state the serial engine carries across steps is credit's optimizer replay (the momentum
back-flow reads earlier steps' gradients and factors from the run directory, which every task
can read). Each task replays the optimizer from the state point that the serial engine's state
before the task's first step comes from (a keyframe at least `horizon` steps back; with
`optim_state="every_step"`, possibly the serial start itself, so late tasks replay longer), so
every float is computed the same way.

What a worker needs must be rebuildable there: the metric by import (`"module:attr"`, or a
module-level function), the model from a `"module:function"` factory or by pickling (its
parameter values are shipped from the driver either way: rows read through a nonlinearity, such
as the output-side split or stream features, depend on them).
"""

from __future__ import annotations

import bisect
import importlib
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from chisel.attribution import engine as E
from chisel.attribution import ledger as L
from chisel.attribution.binding import AttributionInputError
from chisel.store.reader import Run, load

PART_NAME = "part-{first:09d}-{last:09d}.parquet"  # zero-padded: name order is step order


class NotShippableError(AttributionInputError):
    """A metric or model that a worker process cannot rebuild (a lambda, a closure, a local class)."""


# -- rebuilding the metric and the model in a worker ------------------------------------------
def resolve(spec: str, what: str) -> Any:
    """The object named by "package.module:attr.path"."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise NotShippableError(
            f"{what}={spec!r} is not 'module:attr'; name an importable object, e.g. "
            f"'mypackage.metrics:{'METRIC' if what == 'metric' else 'make_model'}'."
        )
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise NotShippableError(
            f"{what}={spec!r}: cannot import {module_name!r} ({err}). The module must be "
            "importable wherever the workers run (installed, or on PYTHONPATH)."
        ) from err
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise NotShippableError(f"{what}={spec!r}: module {module_name!r} has no {attr!r}.")
        obj = getattr(obj, part)
    return obj


def spec_of(metric: Any) -> str:
    """A metric as "module:attr": a spec string as given, or a module-level function's name."""
    if isinstance(metric, str):
        found = resolve(metric, "metric")
        if not callable(found):
            raise NotShippableError(f"metric={metric!r} names a {type(found).__name__}, not a callable.")
        return metric
    module, name = getattr(metric, "__module__", None), getattr(metric, "__qualname__", "")
    if module and module != "__main__" and "<" not in name and name:
        try:
            if resolve(f"{module}:{name}", "metric") is metric:
                return f"{module}:{name}"
        except NotShippableError:
            pass
    raise NotShippableError(
        f"the metric {metric!r} cannot be rebuilt by a worker: it is a lambda, a closure (as "
        "chisel.metrics builds) or lives in __main__. Define it at module level in an importable "
        "module (e.g. `METRIC = chisel.metrics.logprob(obs, actions)` in mymetrics.py) and pass "
        "metric='mymetrics:METRIC'."
    )


@dataclass(frozen=True)
class _ModelRecipe:
    """How a worker rebuilds the driver's model: a factory spec or a pickled module, then the
    driver's parameter values."""

    factory: str | None
    module: nn.Module | None
    state: dict[str, torch.Tensor]

    def build(self) -> nn.Module:
        model = resolve(self.factory, "model")() if self.factory else self.module
        model.load_state_dict(self.state)
        return model


def _model(model: Any) -> tuple[nn.Module, _ModelRecipe]:
    if isinstance(model, str):
        factory = resolve(model, "model")
        built = factory() if callable(factory) else None
        if not isinstance(built, nn.Module):
            raise NotShippableError(
                f"model={model!r} must name a function that returns a fresh nn.Module (called with "
                f"no arguments); it gave {type(built).__name__}."
            )
        return built, _ModelRecipe(model, None, built.state_dict())
    if not isinstance(model, nn.Module):
        raise AttributionInputError(f"model is a {type(model).__name__}; give an nn.Module or 'module:function'.")
    from ray import cloudpickle

    try:
        cloudpickle.dumps(model)
    except Exception as err:  # any pickling failure means the same fix
        raise NotShippableError(
            f"the model cannot be pickled for the workers ({type(err).__name__}: {err}). Pass "
            "model='module:function' naming a function that builds it; its parameters are "
            "copied from the model you trained either way."
        ) from err
    return model, _ModelRecipe(None, model, model.state_dict())


def _features(features: Any) -> Any:
    if isinstance(features, (str, os.PathLike)):
        import probes

        return probes.FeatureSet.load(features)
    return E._feature_set(features)


# -- the driver --------------------------------------------------------------------------------
def ranges(steps: Sequence[int], tasks: int) -> list[list[int]]:
    """`steps` cut into at most `tasks` contiguous, nearly equal, non-empty ranges."""
    k = max(1, min(tasks, len(steps)))
    size, extra = divmod(len(steps), k)
    out, start = [], 0
    for i in range(k):
        stop = start + size + (i < extra)
        out.append(list(steps[start:stop]))
        start = stop
    return [r for r in out if r]


def _ledger_dir(run: Run, out: Any) -> Path:
    if out is None or out is False:
        raise AttributionInputError(
            "attribute_ray writes the ledger as a directory of parquet parts: give out=True "
            "(<run>/ledger/) or out='a/directory'."
        )
    path = run.path / "ledger" if out is True else Path(out)
    if path.exists() and not path.is_dir():
        raise AttributionInputError(
            f"out={str(path)!r} is a file; attribute_ray writes a directory of parquet parts. Give "
            "a directory path (it is created)."
        )
    if path.is_dir() and any(path.glob("*.parquet")):
        raise AttributionInputError(
            f"{path} already holds ledger parts; remove them or choose another out, so that no "
            "stale range mixes into this ledger."
        )
    return path


def attribute_ray(
    run: Run | str | os.PathLike,
    model: nn.Module | str,
    features: Any,
    metric: str | Callable[[nn.Module], torch.Tensor],
    *,
    out: bool | str | os.PathLike,
    address: str | None = None,
    tasks: int | None = None,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    init_options: dict[str, Any] | None = None,
    steps: int | Iterable[int] | None = None,
    families: Sequence[str] = L.FAMILIES,
    points: int = 16,
    dtype: torch.dtype = torch.float64,
    split: str = "auto",
    device: str | torch.device = "cpu",
    horizon: int | None = None,
    credit_by: Sequence[str] | None = None,
    progress: bool | None = None,
    return_ledger: bool = True,
    batch_points: bool | None = None,
    centred: bool = True,
    reference: Any = None,
) -> pd.DataFrame | None:
    """`chisel.attribute` with the steps split over Ray tasks: the same ledger, row for row,
    written as a directory of parquet parts (one per contiguous step range).

    Args:
        model: an nn.Module (pickled to the workers) or "module:function", a function returning
            a fresh model of the run's architecture; the workers load this model's parameter
            values either way (rows read through nonlinearities depend on them).
        features: a `probes.FeatureSet` (or features), or a FeatureSet directory.
        metric: "module:attr" naming a metric (`model -> scalar`), or a module-level function;
            a lambda or closure (as `chisel.metrics` builds) is a `NotShippableError`.
        out: the ledger directory (created; True: `<run>/ledger`); it must hold no parts yet.
        address: the Ray cluster to join ("auto", "ray://head:10001"); None: the running Ray
            instance, else a local one started (and shut down) here.
        tasks: step ranges, one task and one parquet part each (default: the cluster's CPUs).
        num_cpus, num_gpus: what Ray reserves per task (with num_gpus, pass device="cuda").
        init_options: more `ray.init` keywords when Ray is started here.
        steps, families, points, dtype, split, device, horizon, credit_by, progress,
        return_ledger, batch_points, centred, reference: as for `chisel.attribute`.

    Returns:
        The ledger (as `chisel.load_ledger(out)` reads it), or None with return_ledger=False.
    """
    import ray

    if tasks is not None and (isinstance(tasks, bool) or not isinstance(tasks, int) or tasks < 1):
        raise AttributionInputError(f"tasks={tasks!r}: give an int >= 1 (step ranges) or None.")
    run = run if isinstance(run, Run) else load(run)
    options = E.AttributionOptions(
        families, points, dtype, split, device, horizon, credit_by, batch_points, centred, reference
    )
    directory = _ledger_dir(run, out)
    metric_spec = spec_of(metric)
    built, recipe = _model(model)
    E._check_model(run, built)
    feature_set = _features(features)
    chosen = [t for t in E._steps(run, steps) if not run.record(t).skipped]
    credited = L.CREDIT in options.families
    tag_columns = E._tag_columns(run, chosen) if credited else []
    origins = _replay_origins(run, chosen, horizon, options.credit_by) if credited else {}
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, **(init_options or {}))
    written: list[Path] = []
    refs: list[Any] = []
    try:
        n = tasks or max(1, int(ray.cluster_resources().get("CPU", 1)))
        remote = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus)(_attribute_range)
        directory.mkdir(parents=True, exist_ok=True)
        if not chosen:  # an empty ledger with the serial engine's columns
            written.append(directory / "part-empty.parquet")
            L.LedgerWriter(written[-1], tag_columns).close()
        for part in ranges(chosen, n):
            path = directory / PART_NAME.format(first=part[0], last=part[-1])
            written.append(path)
            refs.append(remote.remote(
                str(run.path), recipe, metric_spec, feature_set, part, origins.get(part[0]),
                tag_columns, options, str(path),
            ))
        _wait(ray, refs, progress)
    except BaseException as err:
        for ref in refs:  # stop the other tasks before their parts are renamed into place
            ray.cancel(ref)
        if refs:
            ray.wait(refs, num_returns=len(refs), timeout=60)
        for path in written:  # no partial ledger: drop this call's parts
            path.unlink(missing_ok=True)
        cause = getattr(err, "cause", None)
        if isinstance(cause, Exception) and isinstance(err, ray.exceptions.RayTaskError):
            raise cause from None  # the worker's own (chisel) error, not Ray's wrapper
        raise
    finally:
        if started:
            ray.shutdown()
    return L.load_ledger(directory) if return_ledger else None


def _wait(ray: Any, refs: list[Any], progress: bool | None) -> None:
    from tqdm.auto import tqdm

    show = sys.stderr.isatty() if progress is None else progress
    pending = list(refs)
    with tqdm(total=len(refs), desc="attributing", unit="range", disable=not show) as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            ray.get(done)  # raises the task's error at once
            bar.update(len(done))


# -- one task ----------------------------------------------------------------------------------
def _attribute_range(
    run_path: str,
    recipe: _ModelRecipe,
    metric_spec: str,
    features: Any,
    steps: list[int],
    origin: int | None,
    tag_columns: list[str],
    options: E.AttributionOptions,
    out: str,
) -> int:
    """Steps `steps` (contiguous in the chosen steps) of the serial engine, written to `out`;
    returns the rows written. Mirrors `engine.attribute`'s setup (tests/attribute/
    test_ray_engine.py holds the two equal row for row)."""
    run = load(run_path)
    plan = E._Plan.make(run, recipe.build(), resolve(metric_spec, "metric"), features, options)
    credit = None
    if L.CREDIT in options.families:
        credit = _credit(run, options.horizon, options.credit_by, origin, steps[0])
    writer = L.LedgerWriter(out, tag_columns)
    rows, failed = 0, True
    try:
        for t in steps:
            frame = L.to_frame(E._step_rows(run, t, plan, credit), tag_columns)
            writer.write(frame)
            rows += len(frame)
        failed = False
    finally:
        writer.abort() if failed else writer.close()
    return rows


def _credit(run: Run, horizon: int | None, by: Sequence[str] | None, origin: int | None, start: int):
    """`credit.engine`, with its optimizer replay brought to the serial engine's state before
    `start` (replayed from `origin`; None: the serial engine seeks afresh at `start` too)."""
    from chisel.attribution import credit as C

    return C.engine(run, horizon, by, start=None if origin is None else (origin, start))


def _replay_origins(
    run: Run, chosen: Sequence[int], horizon: int | None, by: Sequence[str] | None
) -> dict[int, int | None]:
    """{step: where the serial engine's optimizer replay state before it was loaded from}, None
    where the serial engine seeks afresh (a jump): `OptimizerReplay._seek` walked over the
    chosen steps without replaying. The serial replay reloads every keyframe it crosses, so a
    task may start from the last keyframe at least `history` steps back (its back-flow log then
    holds the same steps); with optim_state="every_step" that is often the serial start itself."""
    from chisel.attribution import credit as C

    C.engine(run, horizon, by)  # fail here, before any task, when the run cannot give credit
    replay = C.CreditSession(run, horizon=horizon).replay
    history, keyframes = replay.history, replay.state_points
    out: dict[int, int | None] = {}
    position = origin = None
    for t in chosen:
        point = replay.start_point(max(t - history, 0))
        if position is None or not point <= position <= t:
            origin, out[t] = point, None
        else:  # the latest keyframe reloaded since, if any
            crossed = keyframes[: bisect.bisect_right(keyframes, t - history)]
            out[t] = max(origin, crossed[-1]) if crossed else origin
        position = t + 1
    return out


# -- `chisel attribute` -------------------------------------------------------------------------
def run_cli(args: Any) -> Path:
    """`chisel attribute RUN_DIR ...` (chisel/cli.py parses); returns the ledger's path.

    Modules named by --metric and --model are imported from the current directory too, as
    `python -m` would (Ray adds the driver's current directory to its local workers' path)."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    ray = args.engine == "ray"
    if not ray and (args.tasks is not None or args.address is not None):
        raise AttributionInputError("--tasks and --address apply to --engine ray only.")
    run = load(args.run_dir)
    out = Path(args.out) if args.out else run.path / ("ledger" if ray else "ledger.parquet")
    options = dict(families=tuple(args.families or L.FAMILIES), horizon=args.horizon, out=out,
                   return_ledger=False)
    if ray:
        attribute_ray(run, args.model, _features(args.features), args.metric,
                      address=args.address, tasks=args.tasks, **options)
    else:
        spec_of(args.metric)
        E.attribute(run, _model(args.model)[0], _features(args.features),
                    resolve(args.metric, "metric"), **options)
    return out
