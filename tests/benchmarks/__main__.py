"""`make bench`: run every benchmark in this folder, one after the other, each printing its table.

    python -m tests.benchmarks            # all of them
    python -m tests.benchmarks store      # only bench_store (names without the bench_ prefix)

Each benchmark is also runnable alone (``python -m tests.benchmarks.bench_store --help``) with
its own options; here every one runs with its defaults. A benchmark that fails is reported and the
others still run; the exit status is non-zero if any failed.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
import time
import traceback
from pathlib import Path


def available() -> list[str]:
    folder = Path(__file__).parent
    return sorted(
        m.name.removeprefix("bench_")
        for m in pkgutil.iter_modules([str(folder)])
        if m.name.startswith("bench_")
    )


def main(argv: list[str] | None = None) -> int:
    names = list(sys.argv[1:] if argv is None else argv) or available()
    unknown = sorted(set(names) - set(available()))
    if unknown:
        print(
            f"error: unknown benchmark(s) {', '.join(unknown)}; "
            f"choose from {', '.join(available())}",
            file=sys.stderr,
        )
        return 2
    failed = []
    for name in names:
        print(f"\n=== bench_{name} ===", flush=True)
        start = time.perf_counter()
        try:
            status = importlib.import_module(f"tests.benchmarks.bench_{name}").main([])
        except Exception:
            traceback.print_exc()
            status = 1
        if status:
            failed.append(name)
        print(f"=== bench_{name}: {time.perf_counter() - start:.0f} s ===", flush=True)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
