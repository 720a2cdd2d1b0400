"""Imports point downstream only: probes → capture → store → attribute → validation → report.

`probes` never imports `chisel`; within chisel a stage never imports a later one.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# chisel stages, upstream first; modules outside these folders (recorder, cli, …) are glue
STAGES = ["capture", "store", "attribution", "validation", "report"]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def test_probes_never_imports_chisel():
    offenders = {
        str(p.relative_to(ROOT)): sorted(m for m in _imports(p) if m.split(".")[0] == "chisel")
        for p in (ROOT / "probes").rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_chisel_stages_import_only_upstream():
    bad = []
    for i, stage in enumerate(STAGES):
        folder = ROOT / "chisel" / stage
        if not folder.is_dir():
            continue
        later = STAGES[i + 1 :]
        for path in folder.rglob("*.py"):
            for module in _imports(path):
                parts = module.split(".")
                if parts[0] == "chisel" and len(parts) > 1 and parts[1] in later:
                    bad.append(f"{path.relative_to(ROOT)} imports {module}")
    assert bad == []


def test_no_pickle_on_read_paths():
    hits = []
    for path in [*(ROOT / "chisel").rglob("*.py"), *(ROOT / "probes").rglob("*.py")]:
        text = path.read_text()
        for needle in ("pickle.load", "torch.load(", "np.load("):
            for line in text.splitlines():
                if needle in line and "weights_only=True" not in line and "allow_pickle=False" not in line:
                    hits.append(f"{path.relative_to(ROOT)}: {line.strip()}")
    assert hits == []


def _module_graph() -> dict[str, set[str]]:
    """module -> the modules of chisel/probes it imports anywhere in its file (function-level
    and TYPE_CHECKING imports included: a circle through them is still a circle to a reader)."""
    files = {}
    for package in ("chisel", "probes"):
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            files[".".join(parts)] = path
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    module = ".".join([*base, *([node.module] if node.module else [])])
                else:
                    module = node.module or ""
                subs = {f"{module}.{a.name}" for a in node.names} & set(files)
                deps |= subs
                if len(subs) < len(node.names):  # a name from the module itself
                    deps.add(module)
        graph[name] = {d for d in deps if d in files and d != name}
    return graph


def test_no_import_circles():
    graph = _module_graph()
    circles, index, low, stack, on_stack = [], {}, {}, [], set()

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert circles == []
