"""mkdocs hook: the API reference is generated from the packages' `__all__` at build time.

docs/api.md holds the prose and a `<!-- api-reference -->` line; the hook replaces that line with
one mkdocstrings entry per public name (under its defining module), grouped by pipeline stage, so
the reference lists exactly what `import chisel` and `import probes` export and cannot drift.
"""

from __future__ import annotations

import importlib
import inspect

MARKER = "<!-- api-reference -->"
PACKAGES = ("chisel", "probes")
# first matching module prefix wins; errors and warnings are grouped apart whatever their module
STAGES = (
    ("Recording", ("chisel.recorder", "chisel.capture")),
    ("Reading a run", ("chisel.store",)),
    ("Attribution", ("chisel.attribution", "chisel.metrics")),
    ("Validation: does the attribution hold?", ("chisel.validation",)),
    ("Counterfactuals", ("chisel.counterfactual",)),
    ("Reports", ("chisel.report",)),
    ("Environments", ("chisel.envs",)),
    ("Features (`probes`)", ("probes",)),
)


def _entries() -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {title: [] for title, _ in STAGES}
    groups["Errors and warnings"] = []
    groups["Other"] = []
    for package in PACKAGES:
        pkg = importlib.import_module(package)
        for name in pkg.__all__:
            obj = getattr(pkg, name)
            if name.startswith("__"):
                continue
            module = obj.__name__ if inspect.ismodule(obj) else getattr(obj, "__module__", package)
            path = module if inspect.ismodule(obj) else f"{module}.{getattr(obj, '__name__', name)}"
            if inspect.isclass(obj) and issubclass(obj, (Exception, Warning)):
                group = "Errors and warnings"
            else:
                group = next(
                    (t for t, prefixes in STAGES if module.startswith(prefixes)), "Other"
                )
            shown = f"{package}.{name}"
            groups[group].append(f"### `{shown}`\n\n::: {path}\n    options:\n      heading_level: 4\n      show_root_heading: false\n")
    return {g: e for g, e in groups.items() if e}


def on_page_markdown(markdown: str, page, config, files) -> str:
    if MARKER not in markdown:
        return markdown
    body = "\n".join(
        f"## {group}\n\n" + "\n".join(entries) for group, entries in _entries().items()
    )
    return markdown.replace(MARKER, body)
