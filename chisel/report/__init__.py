"""The report stage: a self-contained HTML report and PNG figures of a demo run directory.

    chisel.report.write_report("runs/demo")                    # runs/demo/report.html, figures/
    chisel.report.write_comparison("runs/early", "runs/late", "runs/compare")

The last stage: it reads the artifacts of docs/demo-run.md (manifest.json required, the rest
optional) and nothing imports it.
"""

from chisel.report.artifacts import RunArtifacts, load_artifacts
from chisel.report.compare import write_comparison
from chisel.report.registry import (
    ReportInputs,
    register_section,
    registered_sections,
    unregister_section,
)
from chisel.report.summary import Summary, summarize
from chisel.report.write import write_report

__all__ = [
    "ReportInputs",
    "RunArtifacts",
    "Summary",
    "load_artifacts",
    "register_section",
    "registered_sections",
    "summarize",
    "unregister_section",
    "write_comparison",
    "write_report",
]
