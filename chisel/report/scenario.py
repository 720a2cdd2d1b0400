"""A run's scenario sections: the module its scenario file names, imported by name.

The report is the last stage and imports no scenario. A scenario that has sections of its own
(`chisel demo`: `chisel.demo.report_sections`) names their module in the run's scenario
file, demo.json, under "report_sections"; `load_scenario_sections` imports it, and importing it
registers its sections (see `registry`), each limited by `when=for_scenario(__name__)` to the
runs that name it. Only modules inside the chisel package are imported: a run directory is
data, and naming a module in it must not run foreign code. Other packages register their
sections themselves (import them before calling `write_report`).

A demo.json written before the key existed names no module; it was always written by
`chisel demo`, whose module it then stands for (`LEGACY_SECTIONS`).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable

from chisel.report.artifacts import DEMO_FILE, Missing, RunArtifacts

SECTIONS_KEY = "report_sections"
LEGACY_SECTIONS = "chisel.demo.report_sections"  # demo.json without SECTIONS_KEY
_MODULE = re.compile(r"chisel(\.[A-Za-z_][A-Za-z0-9_]*)+")


def scenario_module(art: RunArtifacts) -> str | None:
    """The module of report sections the run's scenario file names (None: none)."""
    if not art.is_demo:
        return None
    name = (art.demo or {}).get(SECTIONS_KEY, LEGACY_SECTIONS)
    return name if isinstance(name, str) and name else None


def for_scenario(module: str) -> Callable[[RunArtifacts], bool]:
    """A `when` for a scenario's sections: the runs whose scenario file names `module`."""

    def when(art: RunArtifacts) -> bool:
        return scenario_module(art) == module

    return when


def load_scenario_sections(art: RunArtifacts) -> str | None:
    """Import the run's scenario sections (registering them); the module's name, or None when
    the run names none or it cannot be imported (then noted in `art.missing`)."""
    name = scenario_module(art)
    if name is None:
        return None
    if not _MODULE.fullmatch(name):
        art.missing.append(
            Missing(DEMO_FILE, f"{DEMO_FILE} names report sections {name!r}, not a module of "
                    "chisel: not imported (register them with chisel.report.register_section)")
        )
        return None
    try:
        importlib.import_module(name)
    except ImportError as err:
        art.missing.append(
            Missing(DEMO_FILE, f"{DEMO_FILE} names report sections {name!r}, which cannot be "
                    f"imported ({err})")
        )
        return None
    return name
