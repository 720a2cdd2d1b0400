"""The report's sections, in order: a registry of small functions over one run's artifacts.

A section is a function `build(inputs) -> (anchor, title, body markup) | None` over
`ReportInputs` (the run's artifacts, their summary and the figure folder); None leaves it out.
`write_report` runs every registered section whose `when(artifacts)` holds, in registry order.
Generic sections hold for any run with a ledger; sections that only make sense for one scenario
(the TrashWorld demo's concept groups, causal check, choice test, counterfactual retraining) say
so in `when`. A user or a scenario adds its own with `register_section` (or passes one-off
sections to `write_report(sections=...)`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from chisel.report.artifacts import RunArtifacts
from chisel.report.sections import FigureSink, Section
from chisel.report.summary import Summary


@dataclass(frozen=True)
class ReportInputs:
    """What every section reads."""

    art: RunArtifacts
    summary: Summary
    figs: FigureSink


SectionBuilder = Callable[[ReportInputs], Section | None]


def any_run(art: RunArtifacts) -> bool:
    return True


@dataclass(frozen=True)
class SectionSpec:
    """One registered section: its name (unique), its builder, and the runs it applies to."""

    name: str
    build: SectionBuilder
    when: Callable[[RunArtifacts], bool] = any_run


_SECTIONS: list[SectionSpec] = []


class SectionRegistryError(ValueError):
    """A section name is taken, or an anchor to place a section before/after is unknown."""


def register_section(
    name: str,
    build: SectionBuilder,
    *,
    when: Callable[[RunArtifacts], bool] = any_run,
    before: str | None = None,
    after: str | None = None,
) -> None:
    """Add a section to every report written from now on (at the end, or before/after a named
    one). Names are unique: registering a taken name raises (unregister it first)."""
    if any(s.name == name for s in _SECTIONS):
        raise SectionRegistryError(f"a report section named {name!r} is already registered")
    spec = SectionSpec(name, build, when)
    anchor = before if before is not None else after
    if anchor is None:
        _SECTIONS.append(spec)
        return
    names = [s.name for s in _SECTIONS]
    if anchor not in names:
        raise SectionRegistryError(f"no report section {anchor!r} to place {name!r} by: {names}")
    _SECTIONS.insert(names.index(anchor) + (0 if before is not None else 1), spec)


def unregister_section(name: str) -> None:
    """Remove a registered section (no error if there is none)."""
    _SECTIONS[:] = [s for s in _SECTIONS if s.name != name]


def registered_sections() -> list[SectionSpec]:
    """The registered sections, in report order."""
    return list(_SECTIONS)
