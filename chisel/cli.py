"""The `chisel` command line: `chisel demo`, `chisel report RUN_DIR`, `chisel info RUN_DIR`."""

from __future__ import annotations

import argparse
import sys

from chisel.errors import ChiselError


def _info(args: argparse.Namespace) -> int:
    from chisel.store.reader import load
    from chisel.store.summary import summarize

    print(summarize(load(args.run_dir)))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from chisel.demo import DemoConfig, run_demo

    config = DemoConfig.make(quick=args.quick, out=args.out, seed=args.seed, button=args.button)
    run_demo(config)
    return 0


def _report(args: argparse.Namespace) -> int:
    from chisel.report import write_report

    path = write_report(args.run_dir, args.out, compare=args.compare)
    print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chisel", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="summarize a recorded run")
    info.add_argument("run_dir", help="a directory written by chisel.record")
    info.set_defaults(func=_info)
    demo = sub.add_parser(
        "demo",
        help="train PPO on TrashWorld with recording, probe, attribute and write report.html",
        description="Train the reference PPO agent on TrashWorld with chisel recording on, fit "
        "probes, attribute the updates (geometry, integrated, credit), run the causal check and "
        "write report.html into the run directory (see docs/demo-run.md). About 5 minutes; "
        "--quick about one.",
    )
    demo.add_argument("--out", default="runs/demo", help="run directory to write (replaced)")
    demo.add_argument("--seed", type=int, default=1, help="random seed")
    demo.add_argument("--button", choices=["none", "early", "late"], default="none",
                      help="reward button: never, from the start, or appearing halfway through")
    demo.add_argument("--quick", action="store_true",
                      help="a small run (256 updates, smaller datasets): under a minute")
    demo.set_defaults(func=_demo)
    report = sub.add_parser("report", help="write the self-contained HTML report of a demo run")
    report.add_argument("run_dir", help="a run directory written by `chisel demo`")
    report.add_argument("--compare", metavar="RUN_B", default=None,
                        help="a second run: write compare.html with both runs side by side")
    report.add_argument("--out", default=None,
                        help="folder or .html path to write (default: the run directory)")
    report.set_defaults(func=_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ChiselError as err:
        print(f"chisel: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
