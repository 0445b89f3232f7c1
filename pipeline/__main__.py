"""The command line: ``python -m pipeline STAGE [options]`` (also installed as ``logitbank``).

The only place that parses argv. Each stage module in ``stages/`` provides ``add_arguments`` and
``run``; this dispatches to it. Bad input — a project error, a missing dependency, a full disk, a
read-only directory — ends in one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import sys

from pipeline.errors import EXPECTED_ERRORS

#: stage name → (module, one-line help). Modules are imported only when their stage runs.
STAGES: dict[str, tuple[str, str]] = {
    "teacher": ("stages.teacher", "train a teacher from the zoo (or use a given checkpoint)"),
    "export": ("stages.export", "export the teacher to ONNX, parity-checked against PyTorch"),
    "precompute": ("stages.precompute", "the teacher's logits for V views into the store"),
    "distill": ("stages.distill", "train a student from the store with a distillation method"),
    "verify": ("stages.verify", "check a store's checksums and completeness"),
    "audit": ("stages.audit", "bytes per row and KD-loss error of every encoding on a store"),
    "plan": ("stages.plan", "disk bytes, files and memory of a store before a run"),
    "sweep": ("stages.sweep", "train many students (runs × seeds) from one store, one by one"),
    "report": ("stages.report", "results table (Markdown, JSON) and plots of the distill runs"),
}

_OS_ERRORS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for name, (module, help_text) in STAGES.items():
        stage_parser = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(stage_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module = importlib.import_module(STAGES[args.stage][0])
    try:
        return int(module.run(args) or 0)
    except EXPECTED_ERRORS as exc:
        return _fail(str(exc))
    except ImportError as exc:
        return _fail(
            f"a dependency is missing ({exc}): run `make setup` to install logitbank's requirements"
        )
    except OSError as exc:
        if exc.errno in _OS_ERRORS:
            where = f" ({exc.filename})" if exc.filename else ""
            return _fail(
                f"{_OS_ERRORS[exc.errno]}{where}: free space or choose a writable path; "
                f"finished work is kept and a rerun resumes"
            )
        raise
    except KeyboardInterrupt:
        print(
            "interrupted: finished chunks are kept; rerun the same command to resume",
            file=sys.stderr,
        )
        return 130


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
