"""`report`: the results table (Markdown, JSON) and plots of every student in the run folder."""

from __future__ import annotations

import argparse

from stages.common import add_config_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from pipeline.config import load_config
    from pipeline.report import write_report

    # Not config_from_args: it would write RUN_DIR/report.config.yaml, creating a run folder
    # even when there is nothing to report. The report reads each run's own config.yaml.
    config = load_config(args.config, args.set)
    report = write_report(config)
    finished = sum(r.finished for r in report.runs)
    print(
        f"report: {len(report.runs)} runs ({finished} finished) in {len(report.groups)} experiments"
    )
    for path in report.files.values():
        print(f"report: {path}")
    return 0
