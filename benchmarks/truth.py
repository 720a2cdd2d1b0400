"""Does the attribution hold? The demo's validation figures over seeds and button schedules.

Runs `chisel demo` (default preset unless --quick) for every (seed, button) asked for, each into
its own run directory, and prints, from each run's validation.json, the Spearman agreements
(training-path attribution and the Shapley headline against single-pathway removal, against
feature ablation on the metric and on the return) and the coverage of Δm by named features.
Existing runs are reused with --reuse (their validation.json is read as is).

    python benchmarks/truth.py --seeds 1 2 3 --buttons none --also late:1
    python benchmarks/truth.py --quick --seeds 1            # a smoke run (~2 min)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from chisel.demo.config import DemoConfig
from chisel.demo.pipeline import run_demo
from chisel.report.artifacts import VALIDATION_SUMMARY_FILE

PAIRS = [
    ("attribution_vs_removal", "attr~removal"),
    ("shapley_vs_removal", "shap~removal"),
    ("attribution_vs_ablation_metric", "|attr|~abl(m)"),
    ("shapley_vs_ablation_metric", "|shap|~abl(m)"),
    ("attribution_vs_ablation_return", "|attr|~abl(R)"),
    ("shapley_vs_ablation_return", "|shap|~abl(R)"),
]


def _runs(args: argparse.Namespace) -> list[tuple[int, str]]:
    runs = [(s, b) for b in args.buttons for s in args.seeds]
    for extra in args.also:
        button, seed = extra.split(":")
        runs.append((int(seed), button))
    return runs


def _row(name: str, summary: dict) -> str:
    rho = summary.get("spearman", {})
    cells = []
    for key, _ in PAIRS:
        entry = rho.get(key) or {}
        value = entry.get("rho")
        cells.append("—" if value is None else f"{value:+.2f} (n={entry.get('n')})")
    cover = [summary.get("coverage_attribution"), summary.get("coverage_shapley")]
    cells += ["—" if c is None else f"{100 * c:.0f}%" for c in cover]
    return f"| {name} | " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--buttons", nargs="+", default=["none"])
    parser.add_argument("--also", nargs="*", default=["late:1"], help="more runs as button:seed")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--root", type=Path, default=Path("runs/truth"))
    parser.add_argument("--reuse", action="store_true", help="read existing runs, train nothing")
    args = parser.parse_args()
    rows = []
    for seed, button in _runs(args):
        name = f"{button}-seed{seed}{'-quick' if args.quick else ''}"
        out = args.root / name
        if not (args.reuse and (out / VALIDATION_SUMMARY_FILE).is_file()):
            run_demo(DemoConfig.make(quick=args.quick, seed=seed, button=button, out=out))
        summary = json.loads((out / VALIDATION_SUMMARY_FILE).read_text())
        rows.append(_row(name, summary))
        print(rows[-1], flush=True)
    header = ["run", *(label for _, label in PAIRS), "coverage (attr)", "coverage (Shapley)"]
    print("\n| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    print("\n".join(rows))


if __name__ == "__main__":
    main()
