"""The sections chisel's own report registers, in order (see `registry`): generic, for any run
with a ledger. A scenario's sections are registered by the scenario (see `scenario`)."""

from __future__ import annotations

from chisel.report import sections as S
from chisel.report import validation_sections as VS
from chisel.report.artifacts import PROBES_FILE, RunArtifacts
from chisel.report.registry import register_section


def _has_probes(art: RunArtifacts) -> bool:
    """probes.parquet is there (readable or not: an unreadable one is noted)."""
    return art.probes is not None or (art.root / PROBES_FILE).exists()


register_section("summary", lambda i: S.summary_section(i.art, i.summary))
register_section("timeline", lambda i: S.timeline_section(i.art, i.figs))
register_section("validation", lambda i: VS.validation_section(i.art, i.summary, i.figs))
register_section("coverage", lambda i: VS.coverage_section(i.art, i.summary, i.figs))
register_section("probes", lambda i: S.probes_section(i.art, i.figs), when=_has_probes)
register_section("circuits", lambda i: S.circuits_section(i.art, i.figs))
register_section("credit", lambda i: S.credit_section(i.art, i.figs))
register_section("completeness", lambda i: S.completeness_section(i.art, i.summary, i.figs))
register_section("missing", lambda i: S.missing_section(i.art))
