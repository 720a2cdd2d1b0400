"""The report is a registry of sections: a registered section shows, in its place, on the runs it
says it applies to; the built-in order is the report's order."""

from __future__ import annotations

import pytest

from chisel.report import (
    ReportInputs,
    register_section,
    registered_sections,
    unregister_section,
    write_report,
)
from chisel.report.registry import SectionRegistryError

from . import synthetic as syn

BUILT_IN = [
    "summary", "reward-optimizer", "timeline", "validation", "coverage", "counterfactual",
    "probes", "circuits", "credit", "completeness", "causal", "missing",
]


def test_built_in_sections_in_report_order():
    assert [s.name for s in registered_sections()] == BUILT_IN


def test_a_registered_section_shows_where_it_was_placed(tmp_path):
    seen = []

    def steps_section(inputs: ReportInputs):
        seen.append(inputs.art.name)
        steps = sorted(inputs.art.ledger["step"].unique())
        return "my-steps", "Steps in the ledger", f"<p>{len(steps)} steps</p>"

    register_section("my-steps", steps_section, after="timeline")
    try:
        page = write_report(syn.make_run(tmp_path / "run")).read_text()
    finally:
        unregister_section("my-steps")
    assert seen == ["run"]
    assert f"<p>{len(syn.STEPS)} steps</p>" in page
    order = [page.index(f'<section id="{a}">') for a in ("timeline", "my-steps", "validation")]
    assert order == sorted(order)
    assert [s.name for s in registered_sections()] == BUILT_IN  # unregistered again


def test_when_limits_a_section_to_the_runs_it_applies_to(tmp_path):
    register_section("only-demo", lambda i: ("only-demo", "Demo only", "<p>x</p>"),
                     when=lambda art: art.is_demo)
    try:
        demo_page = write_report(syn.make_run(tmp_path / "demo")).read_text()
        bare = syn.make_run(tmp_path / "bare", artifacts=False)
        (bare / "ledger.parquet").write_bytes((tmp_path / "demo" / "ledger.parquet").read_bytes())
        bare_page = write_report(bare).read_text()
    finally:
        unregister_section("only-demo")
    assert '<section id="only-demo">' in demo_page
    assert '<section id="only-demo">' not in bare_page


def test_names_are_unique_and_anchors_must_exist():
    with pytest.raises(SectionRegistryError, match="already registered"):
        register_section("summary", lambda i: None)
    with pytest.raises(SectionRegistryError, match="no report section 'nope'"):
        register_section("x", lambda i: None, before="nope")
    assert [s.name for s in registered_sections()] == BUILT_IN
