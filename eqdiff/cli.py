"""The ``eqdiff`` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

logger = logging.getLogger("eqdiff")


def _demo(args: argparse.Namespace) -> int:
    from eqdiff.demo import run_demo

    result = run_demo(args.workdir, args.store, steps=args.steps, run_id=args.run_id)
    report = Path(args.store) / "runs" / result.run_id
    logger.info("demo finished in %.1f s: %d trained, %d already done, %d failed",
                result.seconds, len(result.completed), len(result.skipped), len(result.failed))
    for name, reason in result.failed.items():
        logger.error("failed: %s: %s", name, reason)
    logger.info("artifacts: %s (concepts/, samples/, run.json)", report.resolve())
    return 1 if result.failed else 0


def _zoo(args: argparse.Namespace) -> int:
    from eqdiff.zoo import build_zoo

    for role, folder in build_zoo(args.folder).items():
        logger.info("%s: %s", role, folder.resolve())
    return 0


def _report(args: argparse.Namespace) -> int:
    import webbrowser

    from eqdiff.evaluation import rebuild_report
    from eqdiff.storage import open_store

    out = Path(args.out or Path("artifacts") / "reports" / args.run_id)
    page = rebuild_report(open_store(args.store), args.run_id, out)
    logger.info("report: %s (also stored under runs/%s/report/)", page.resolve(), args.run_id)
    if args.open:
        webbrowser.open(page.resolve().as_uri())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eqdiff",
        description="Equilibrated Diffusion subject customization at dataset scale.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser(
        "demo", help="run the whole local job on the synthetic demo dataset and tiny models",
        description="Builds the offline tiny models and the synthetic demo dataset, then "
                    "trains and samples every (subject, method) on the CPU. Finished stages "
                    "are skipped on a rerun.")
    demo.add_argument("--workdir", default="artifacts/demo-work",
                      help="folder for the models, dataset and checkpoints")
    demo.add_argument("--store", default="./artifacts",
                      help="artifact store URL: a folder, file:///… or s3://bucket/prefix")
    demo.add_argument("--steps", type=int, default=30, help="training steps per concept")
    demo.add_argument("--run-id", default="demo", help="name of the run in the store")
    demo.set_defaults(handler=_demo)

    report = commands.add_parser(
        "report", help="(re)build a run's evaluation report from its stored scores",
        description="Reads runs/RUN/scores/*/*/scores.parquet and run.json from the store, "
                    "recomputes nothing, writes the report to --out and to runs/RUN/report/.")
    report.add_argument("--store", default="./artifacts",
                        help="artifact store URL: a folder, file:///… or s3://bucket/prefix")
    report.add_argument("--run-id", required=True, help="name of the run in the store")
    report.add_argument("--out", default="", help="local folder for the report files "
                                                  "(default artifacts/reports/RUN)")
    report.add_argument("--open", action="store_true", help="open report.html in a browser")
    report.set_defaults(handler=_report)

    zoo = commands.add_parser("zoo", help="build the tiny offline models into a folder")
    zoo.add_argument("folder", nargs="?", default="artifacts/zoo")
    zoo.set_defaults(handler=_zoo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
