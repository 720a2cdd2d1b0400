"""The report's sections, in order: registries of small functions over a run's artifacts.

A section is a function `build(inputs) -> (anchor, title, body markup) | None`; None leaves it
out. `write_report` runs every section of `REPORT` whose `when(artifacts)` holds, in registry
order, over `ReportInputs` (one run's artifacts, their summary, the figure folder);
`write_comparison` does the same with `COMPARISON` over `ComparisonInputs` (two runs; `when`
gets the pair). chisel's own sections are generic: they hold for any run with a ledger.

A scenario adds its own sections from its own package (`chisel demo`'s live in
`chisel.demo.report_sections`, found through the run's scenario file, see `scenario`):
`register_section(name, build, when=...)` places a new one (at the end, or before/after a named
one); `replaces="credit"` gives a generic section a scenario's version on the runs `when`
accepts, in the same place. `register_run_facts` (module `facts`) adds the scenario's words
about a run: the page's subtitle, the comparison's run labels, the training curve's columns. One-off sections go to `write_report(sections=...)`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from chisel.report.artifacts import RunArtifacts
from chisel.report.facts import RunFacts, register_run_facts, run_facts  # noqa: F401
from chisel.report.sections import FigureSink, Section
from chisel.report.summary import Summary

In = TypeVar("In")  # what a section reads
A = TypeVar("A")  # what its `when` reads


@dataclass(frozen=True)
class ReportInputs:
    """What every section of one run's report reads."""

    art: RunArtifacts
    summary: Summary
    figs: FigureSink


@dataclass(frozen=True)
class ComparisonInputs:
    """What every section of a comparison reads: both runs' artifacts, summaries and labels
    ("A: <run name>, <the scenario's tag>"), and the figure folder (figures named compare-*.png)."""

    arts: tuple[RunArtifacts, RunArtifacts]
    summaries: tuple[Summary, Summary]
    labels: tuple[str, str]
    figs: FigureSink


SectionBuilder = Callable[[ReportInputs], Section | None]
ComparisonBuilder = Callable[[ComparisonInputs], Section | None]


def any_run(art: Any) -> bool:
    return True


@dataclass(frozen=True)
class SectionSpec(Generic[In, A]):
    """One registered section: its name (unique), its builder, the runs it applies to, and the
    section it stands in for on those runs (`replaces`, or None for a section of its own)."""

    name: str
    build: Callable[[In], Section | None]
    when: Callable[[A], bool] = any_run
    replaces: str | None = None


class SectionRegistryError(ValueError):
    """A section name is taken, or a section to place a section by (or to replace) is unknown."""


class SectionRegistry(Generic[In, A]):
    """An ordered list of sections; `select(x)` is what a page over x shows, in order."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._specs: list[SectionSpec[In, A]] = []

    def register(
        self,
        name: str,
        build: Callable[[In], Section | None],
        *,
        when: Callable[[A], bool] = any_run,
        before: str | None = None,
        after: str | None = None,
        replaces: str | None = None,
    ) -> None:
        if any(s.name == name for s in self._specs):
            raise SectionRegistryError(f"a {self.what} section named {name!r} is already registered")
        names = [s.name for s in self._specs if s.replaces is None]
        if replaces is not None and replaces not in names:
            raise SectionRegistryError(
                f"no {self.what} section {replaces!r} for {name!r} to replace: {names}"
            )
        spec = SectionSpec(name, build, when, replaces)
        anchor = before if before is not None else after
        if anchor is None:
            self._specs.append(spec)
            return
        if anchor not in names:
            raise SectionRegistryError(
                f"no {self.what} section {anchor!r} to place {name!r} by: {names}"
            )
        at = [s.name for s in self._specs].index(anchor)
        self._specs.insert(at + (0 if before is not None else 1), spec)

    def unregister(self, name: str) -> None:
        self._specs[:] = [s for s in self._specs if s.name != name]

    def specs(self) -> list[SectionSpec[In, A]]:
        return list(self._specs)

    def select(self, x: A) -> list[SectionSpec[In, A]]:
        """The sections a page over x shows, in order: each section whose `when` holds, or in
        its place the first registered replacement whose `when` holds."""
        out = []
        for spec in self._specs:
            if spec.replaces is not None:
                continue
            stand_in = next(
                (r for r in self._specs if r.replaces == spec.name and r.when(x)), None
            )
            if stand_in is not None:
                out.append(stand_in)
            elif spec.when(x):
                out.append(spec)
        return out


REPORT: SectionRegistry[ReportInputs, RunArtifacts] = SectionRegistry("report")
COMPARISON: SectionRegistry[ComparisonInputs, Sequence[RunArtifacts]] = SectionRegistry(
    "comparison"
)


def register_section(
    name: str,
    build: SectionBuilder,
    *,
    when: Callable[[RunArtifacts], bool] = any_run,
    before: str | None = None,
    after: str | None = None,
    replaces: str | None = None,
) -> None:
    """Add a section to every report written from now on (at the end, or before/after a named
    one), shown on the runs `when` accepts; with `replaces`, shown instead of that section on
    those runs. Names are unique: registering a taken name raises (unregister it first)."""
    REPORT.register(name, build, when=when, before=before, after=after, replaces=replaces)


def register_comparison_section(
    name: str,
    build: ComparisonBuilder,
    *,
    when: Callable[[Sequence[RunArtifacts]], bool] = any_run,
    before: str | None = None,
    after: str | None = None,
    replaces: str | None = None,
) -> None:
    """`register_section` for `write_comparison`: `build` reads `ComparisonInputs` and `when`
    the pair of runs' artifacts."""
    COMPARISON.register(name, build, when=when, before=before, after=after, replaces=replaces)


def unregister_section(name: str) -> None:
    """Remove a registered report or comparison section (no error if there is none)."""
    REPORT.unregister(name)
    COMPARISON.unregister(name)


def registered_sections() -> list[SectionSpec]:
    """The registered report sections, in report order (replacements included)."""
    return REPORT.specs()


def registered_comparison_sections() -> list[SectionSpec]:
    """The registered comparison sections, in page order (replacements included)."""
    return COMPARISON.specs()
