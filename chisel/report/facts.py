"""What a scenario says about its runs: the report's subtitle, a comparison's run label, which
columns of the training curve to draw and what the metric is called (`RunFacts`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from chisel.report.artifacts import RunArtifacts


@dataclass(frozen=True)
class RunFacts:
    """A scenario's words about a run.

    subtitle: items of the report's subtitle ("seed 1"). label: the short tag a comparison puts
    after the run's name. curves: the training curve's columns to draw, with
    their legend labels (default: every numeric column). metric: the metric's name on the
    timeline's axis (default "metric").
    """

    subtitle: tuple[str, ...] = ()
    label: str = ""
    curves: tuple[tuple[str, str], ...] = ()
    metric: str = ""


_FACTS: list[tuple[Callable[[RunArtifacts], RunFacts], Callable[[RunArtifacts], bool]]] = []


def register_run_facts(
    facts: Callable[[RunArtifacts], RunFacts], *, when: Callable[[RunArtifacts], bool]
) -> None:
    """Add a scenario's facts about the runs `when` accepts (every holding source is used)."""
    _FACTS.append((facts, when))


def run_facts(art: RunArtifacts) -> RunFacts:
    """The facts every registered source gives about this run, joined (the first curves and
    metric name given win)."""
    found = [facts(art) for facts, when in _FACTS if when(art)]
    return RunFacts(
        subtitle=tuple(x for f in found for x in f.subtitle),
        label=", ".join(f.label for f in found if f.label),
        curves=next((f.curves for f in found if f.curves), ()),
        metric=next((f.metric for f in found if f.metric), ""),
    )
