"""Run every benchmark in this directory, one after another, and print their output.

Each ``benchmarks/*.py`` (except this file and names starting with ``_``, which are
helpers) runs as a subprocess of the same interpreter, with its default arguments.
Name some to run only those: ``python benchmarks/run.py header ingest``. Exits non-zero
if any benchmark failed (a benchmark below its target is not a failure).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()


def benchmarks() -> list[Path]:
    return sorted(p for p in HERE.parent.glob("*.py") if p != HERE and not p.name.startswith("_"))


def main() -> int:
    found = {p.stem: p for p in benchmarks()}
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", help=f"which to run (default: all of {sorted(found)})")
    args = parser.parse_args()
    unknown = [n for n in args.names if n.removesuffix(".py") not in found]
    if unknown:
        parser.error(f"no benchmark {', '.join(unknown)}; there are {', '.join(sorted(found))}")
    chosen = [found[n.removesuffix(".py")] for n in args.names] or list(found.values())

    failed: list[str] = []
    for path in chosen:
        print(f"\n===== {path.name} =====", flush=True)
        start = time.perf_counter()
        code = subprocess.run([sys.executable, str(path)], check=False).returncode
        took = time.perf_counter() - start
        status = "ok" if code == 0 else f"FAILED (exit {code})"
        print(f"===== {path.name}: {status} in {took:.1f} s =====", flush=True)
        if code != 0:
            failed.append(path.name)
    if failed:
        print(f"\n{len(failed)} of {len(chosen)} benchmark(s) failed: {', '.join(failed)}")
        return 1
    print(f"\nall {len(chosen)} benchmark(s) ran")
    return 0


if __name__ == "__main__":
    sys.exit(main())
