"""The `chisel` command line: `chisel demo`, `chisel report RUN_DIR`, `chisel compare RUN_A RUN_B`,
`chisel info RUN_DIR`, `chisel verify RUN_DIR`, `chisel tensorboard RUN_DIR`, `chisel attribute RUN_DIR`.

A user error (a `ChiselError`, a `probes` error, a path that cannot be read or written) is one
line `chisel: error: …` on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import Any

from chisel.envs.config import BUTTON_MODES
from chisel.errors import ChiselError

USER_ERROR = 2


def _info(args: argparse.Namespace) -> int:
    from chisel.store.reader import load
    from chisel.store.summary import summarize

    print(summarize(load(args.run_dir)))
    return 0


def _verify(args: argparse.Namespace) -> int:
    from chisel.store.verify import verify_run

    result = verify_run(args.run_dir)
    for problem in result.problems:
        print(problem)
    print(result.summary(), file=sys.stdout if result.ok else sys.stderr)
    return 0 if result.ok else USER_ERROR


def _demo(args: argparse.Namespace) -> int:
    given = {k: v for k, v in (("out", args.out), ("seed", args.seed)) if v is not None}
    if args.lm:
        from chisel.demo_lm import LMDemoConfig, run_lm_demo

        if args.button is not None:
            raise ChiselError("chisel demo --lm has no reward button: drop --button.")
        run_lm_demo(LMDemoConfig.make(quick=args.quick, **given))
        return 0
    from chisel.demo import DemoConfig, run_demo

    config = DemoConfig.make(quick=args.quick, button=args.button or "none", **given)
    run_demo(config)
    return 0


def _report(args: argparse.Namespace) -> int:
    if args.compare is not None:  # `chisel report A --compare B` is `chisel compare A B`
        args.run_a, args.run_b = args.run_dir, args.compare
        return _compare(args)
    from chisel.report import write_report

    print(f"wrote {write_report(args.run_dir, args.out)}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from chisel.report import write_comparison

    out = args.out if args.out is not None else args.run_a
    print(f"wrote {write_comparison(args.run_a, args.run_b, out)}")
    return 0


def _tensorboard(args: argparse.Namespace) -> int:
    try:
        from chisel.integrations.tensorboard import export

        folder = export(args.run_dir, args.out, ledger=args.ledger)
    except ImportError as err:
        print(f"chisel: error: {_one_line(err)}", file=sys.stderr)
        return USER_ERROR
    print(f"wrote TensorBoard event files to {folder} (view: tensorboard --logdir {folder})")
    return 0


def _attribute(args: argparse.Namespace) -> int:
    from chisel.attribution.distributed import run_cli

    print(f"wrote {run_cli(args)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chisel", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="summarize a recorded run")
    info.add_argument("run_dir", help="a directory written by chisel.record")
    info.set_defaults(func=_info)
    verify = sub.add_parser(
        "verify",
        help="check every file of a run: checksums, manifest schema, keyframes, step numbering",
        description="Check every step file and keyframe of a run against its checksums and the "
        "manifest, the manifest against its schema and the steps table. Prints one line per "
        "problem and a summary; exit code 0 when the run is sound, 2 when it is not.",
    )
    verify.add_argument("run_dir", help="a directory written by chisel.record")
    verify.set_defaults(func=_verify)
    demo = sub.add_parser(
        "demo",
        help="train PPO on TrashWorld with recording, probe, attribute and write report.html",
        description="Train the reference PPO agent on TrashWorld with chisel recording on, fit "
        "probes, attribute the updates (geometry, integrated, credit), run the causal check and "
        "write report.html into the run directory (see docs/demo-run.md). About 5 minutes; "
        "--quick about one.",
    )
    demo.add_argument("--out", default=None, help="run directory to write (replaced; default "
                      "runs/demo, with --lm runs/demo_lm)")
    demo.add_argument("--seed", type=int, default=None, help="random seed (default 1; --lm 0)")
    demo.add_argument("--button", choices=BUTTON_MODES, default=None,
                      help="reward button: never (default), from the start, or appearing halfway "
                      "through")
    demo.add_argument("--quick", action="store_true",
                      help="a small run (512 updates of smaller rollouts, smaller datasets): about a minute")
    demo.add_argument("--lm", action="store_true",
                      help="the language-model scenario instead: GRPO on a tiny random-init "
                      "GPT-2 whose reward has a spurious correlate (see docs/lm-demo.md)")
    demo.set_defaults(func=_demo)
    report = sub.add_parser("report", help="write the self-contained HTML report of a run")
    report.add_argument("run_dir", help="a run directory (chisel.record; a ledger from "
                        "chisel.attribute(..., out=True); or `chisel demo`)")
    report.add_argument("--compare", metavar="RUN_B", default=None,
                        help="a second run: write compare.html with both runs side by side "
                        "(the same as `chisel compare RUN_DIR RUN_B`)")
    report.add_argument("--out", default=None,
                        help="folder or .html path to write (default: the run directory)")
    report.set_defaults(func=_report)
    compare = sub.add_parser("compare", help="write compare.html: two runs side by side")
    compare.add_argument("run_a", help="the first run directory (column A)")
    compare.add_argument("run_b", help="the second run directory (column B)")
    compare.add_argument("--out", default=None,
                         help="folder or .html path to write (default: RUN_A)")
    compare.set_defaults(func=_compare)
    board = sub.add_parser(
        "tensorboard",
        help="export a run's per-step update norms (and ledger timeline) to TensorBoard",
        description="Write TensorBoard event files of a recorded run: update/norm (total and "
        "per module), grad/norm, optim/lr and tag/<name> per step; with --ledger also "
        "timeline/<feature> (cumulative integrated attribution) and metric/delta.",
    )
    board.add_argument("run_dir", help="a directory written by chisel.record")
    board.add_argument("--ledger", action="store_true",
                       help="also export the timeline of the run's ledger.parquet")
    board.add_argument("--out", default=None,
                       help="folder for the event files (default: RUN_DIR/tensorboard)")
    board.set_defaults(func=_tensorboard)
    attr = sub.add_parser(
        "attribute", help="attribute a run's updates to features and write the ledger",
        description="chisel.attribute from the shell. The metric and the model are named by "
        "import path (module:attr), so that Ray workers can rebuild them too.",
    )
    attr.add_argument("run_dir", help="a directory written by chisel.record")
    attr.add_argument("--metric", required=True, help="module:attr of a metric (model -> scalar)")
    attr.add_argument("--model", required=True,
                      help="module:function returning a fresh model of the run's architecture")
    attr.add_argument("--features", default=None, help="a FeatureSet directory (FeatureSet.save)")
    attr.add_argument("--families", nargs="+", default=None,
                      help="geometry, integrated, credit (default: all)")
    attr.add_argument("--horizon", type=int, default=None,
                      help="earlier steps given momentum credit (default: 99%% of the mass)")
    attr.add_argument("--engine", choices=("serial", "ray"), default="serial",
                      help="ray: the steps split over Ray tasks, one parquet part each")
    attr.add_argument("--tasks", type=int, default=None,
                      help="ray: step ranges (default: the cluster's CPUs)")
    attr.add_argument("--address", default=None,
                      help="ray: cluster address (default: a running instance, else a local one)")
    attr.add_argument("--out", default=None, help="ledger path (default: RUN_DIR/ledger.parquet; "
                      "with --engine ray a directory, RUN_DIR/ledger)")
    attr.set_defaults(func=_attribute)
    return parser


def _one_line(err: BaseException) -> str:
    if isinstance(err, OSError) and not isinstance(err, ChiselError) and err.strerror:
        where = f" {err.filename}" if err.filename else ""
        return f"cannot use{where}: {err.strerror}."
    text = " ".join(str(err).split())
    return text or type(err).__name__


def main(argv: list[str] | None = None) -> int:
    """Run one command; a user error is one line on stderr and exit code 2."""
    from probes.errors import ProbesError

    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():  # restores showwarning on the way out
        warnings.showwarning = _show_warning
        try:
            return args.func(args)
        except (ChiselError, ProbesError, OSError) as err:
            print(f"chisel: error: {_one_line(err)}", file=sys.stderr)
            return USER_ERROR


def _show_warning(message: Any, category: Any, *_: Any, **__: Any) -> None:
    print(f"chisel: warning: {_one_line(message)}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
