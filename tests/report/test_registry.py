"""The report is a registry of sections: a registered section shows, in its place, on the runs it
says it applies to; the built-in order is the report's order; a scenario's sections (the demo's)
are found through the run's scenario file, and the report never imports the demo otherwise."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from chisel.report import (
    ReportInputs,
    load_artifacts,
    register_comparison_section,
    register_section,
    registered_comparison_sections,
    registered_sections,
    unregister_section,
    write_comparison,
    write_report,
)
from chisel.report.registry import REPORT, SectionRegistryError
from chisel.report.scenario import SECTIONS_KEY, load_scenario_sections

from . import synthetic as syn

GENERIC = [
    "summary", "timeline", "validation", "coverage", "probes", "circuits", "credit",
    "completeness", "missing",
]
# what a demo run shows: the demo's versions stand in for summary, probes and credit
DEMO = [
    "demo-summary", "reward-optimizer", "timeline", "validation", "coverage", "counterfactual",
    "demo-probes", "circuits", "demo-credit", "completeness", "causal", "missing",
]
DEMO_MODULE = "chisel.demo.report_sections"


def _generic(specs) -> list[str]:
    return [s.name for s in specs if s.build.__module__.startswith("chisel.report")]


def _bare_with_ledger(tmp_path, name="bare"):
    demo = syn.make_run(tmp_path / f"{name}-src")
    bare = syn.make_run(tmp_path / name, artifacts=False)
    (bare / "ledger.parquet").write_bytes((demo / "ledger.parquet").read_bytes())
    return bare


def test_built_in_sections_in_report_order():
    assert _generic(registered_sections()) == GENERIC
    assert _generic(registered_comparison_sections()) == ["summaries", "top", "timelines", "missing"]


def test_a_demo_run_selects_the_demo_sections_a_bare_run_the_generic_ones(tmp_path):
    demo = load_artifacts(syn.make_run(tmp_path / "demo"))
    assert load_scenario_sections(demo) == DEMO_MODULE  # demo.json without the key: the demo's
    assert [s.name for s in REPORT.select(demo)] == DEMO
    bare = load_artifacts(_bare_with_ledger(tmp_path))
    assert load_scenario_sections(bare) is None
    assert [s.name for s in REPORT.select(bare)] == [n for n in GENERIC if n != "probes"]


def test_the_report_imports_the_demo_only_for_a_run_naming_it(tmp_path):
    """In a fresh interpreter: a run without a scenario file is reported without importing
    chisel.demo; a run whose demo.json names the demo's module imports it (not the demo's
    training pipeline) and shows its sections."""
    bare = _bare_with_ledger(tmp_path)
    named = syn.make_run(tmp_path / "named")
    demo = json.loads((named / "demo.json").read_text())
    (named / "demo.json").write_text(json.dumps({**demo, SECTIONS_KEY: DEMO_MODULE}))
    script = textwrap.dedent(f"""
        import sys
        from chisel.report import write_report
        page = write_report({str(bare)!r}).read_text()
        assert "chisel.demo" not in sys.modules, sorted(m for m in sys.modules if "demo" in m)
        assert '<section id="causal">' not in page
        page = write_report({str(named)!r}).read_text()
        assert {DEMO_MODULE!r} in sys.modules
        assert "chisel.demo.pipeline" not in sys.modules  # the sections, not the training
        assert '<section id="causal">' in page and '<section id="reward-optimizer">' in page
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_a_module_outside_chisel_is_never_imported(tmp_path):
    run = syn.make_run(tmp_path / "run")
    demo = json.loads((run / "demo.json").read_text())
    (run / "demo.json").write_text(json.dumps({**demo, SECTIONS_KEY: "os"}))
    page = write_report(run).read_text()
    assert "names report sections &#x27;os&#x27;, not a module of chisel" in page
    assert '<section id="causal">' not in page  # the demo's sections are not used either
    (run / "demo.json").write_text(json.dumps({**demo, SECTIONS_KEY: "chisel.nope"}))
    assert "which cannot be imported" in write_report(run).read_text()


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
    assert "my-steps" not in [s.name for s in registered_sections()]  # unregistered again


def test_when_limits_a_section_to_the_runs_it_applies_to(tmp_path):
    register_section("only-demo", lambda i: ("only-demo", "Demo only", "<p>x</p>"),
                     when=lambda art: art.is_demo)
    try:
        demo_page = write_report(syn.make_run(tmp_path / "demo")).read_text()
        bare_page = write_report(_bare_with_ledger(tmp_path)).read_text()
    finally:
        unregister_section("only-demo")
    assert '<section id="only-demo">' in demo_page
    assert '<section id="only-demo">' not in bare_page


def test_a_replacement_stands_in_on_the_runs_it_accepts(tmp_path):
    register_section("my-completeness", lambda i: ("completeness", "Mine", "<p>mine</p>"),
                     when=lambda art: art.name == "mine", replaces="completeness")
    try:
        mine = write_report(_bare_with_ledger(tmp_path, "mine")).read_text()
        other = write_report(_bare_with_ledger(tmp_path, "other")).read_text()
    finally:
        unregister_section("my-completeness")
    assert "<p>mine</p>" in mine and "Completeness errors" not in mine
    assert "<p>mine</p>" not in other and "Completeness errors" in other
    order = [mine.index(f'<section id="{a}">') for a in ("credit", "completeness", "artifacts")]
    assert order == sorted(order)


def test_a_comparison_section_sees_both_runs(tmp_path):
    a, b = syn.make_run(tmp_path / "a"), _bare_with_ledger(tmp_path)
    register_comparison_section(
        "rows", lambda i: ("rows", "Rows", f"<p>{len(i.arts[0].ledger)} {len(i.arts[1].ledger)}</p>"),
        before="top",
    )
    try:
        page = write_comparison(a, b, tmp_path / "cmp").read_text()
    finally:
        unregister_section("rows")
    n = len(load_artifacts(a).ledger)
    assert f"<p>{n} {n}</p>" in page
    assert page.index('<section id="summaries">') < page.index('<section id="rows">') < page.index(
        '<section id="top">')
    # the demo's comparison sections apply as soon as one run is a demo run
    assert '<section id="groups">' in page and "blue-wall correlate" in page


def test_names_are_unique_and_anchors_must_exist():
    before = [s.name for s in registered_sections()]
    with pytest.raises(SectionRegistryError, match="already registered"):
        register_section("summary", lambda i: None)
    with pytest.raises(SectionRegistryError, match="no report section 'nope'"):
        register_section("x", lambda i: None, before="nope")
    with pytest.raises(SectionRegistryError, match="no report section 'nope' for 'x' to replace"):
        register_section("x", lambda i: None, replaces="nope")
    assert [s.name for s in registered_sections()] == before


def test_the_report_package_names_no_scenario():
    """chisel/report imports no scenario and holds none of the TrashWorld demo's words (its
    sections, tables and figures live in chisel/demo/report_*.py)."""
    import ast
    import re
    from pathlib import Path

    words = re.compile(r"trash|button|blue|wall_blue|TrashWorld|reward_source|advantage", re.I)
    found = []
    for path in sorted((Path(__file__).resolve().parents[2] / "chisel" / "report").glob("*.py")):
        text = path.read_text()
        found += [f"{path.name}: {m.group(0)}" for m in words.finditer(text)]
        for node in ast.walk(ast.parse(text)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [f"{path.name} imports {n}" for n in names if n.startswith("chisel.demo")]
    assert found == []
