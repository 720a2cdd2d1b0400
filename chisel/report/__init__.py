"""The report stage: a self-contained HTML report and PNG figures of a run directory.

    chisel.report.write_report("runs/demo")                    # runs/demo/report.html, figures/
    chisel.report.write_comparison("runs/early", "runs/late", "runs/compare")

The last stage: it reads the artifacts of docs/demo-run.md (manifest.json required, the rest
optional) and nothing imports it but the scenarios that add their sections to it. Both pages
are registries of sections (`register_section`, `register_comparison_section`); chisel's own
are generic, a scenario's are found through the run's scenario file (`scenario`).
"""

from chisel.report.artifacts import RunArtifacts, load_artifacts
from chisel.report.compare import write_comparison
from chisel.report.registry import (
    ComparisonInputs,
    ReportInputs,
    RunFacts,
    register_comparison_section,
    register_run_facts,
    register_section,
    registered_comparison_sections,
    registered_sections,
    unregister_section,
)
from chisel.report.summary import Summary, summarize
from chisel.report.write import write_report

__all__ = [
    "ComparisonInputs",
    "ReportInputs",
    "RunArtifacts",
    "RunFacts",
    "Summary",
    "load_artifacts",
    "register_comparison_section",
    "register_run_facts",
    "register_section",
    "registered_comparison_sections",
    "registered_sections",
    "summarize",
    "unregister_section",
    "write_comparison",
    "write_report",
]
