"""The full layout matrix: every check of tests/test_parallel_layouts.py, CI's tier and the variants only this
runs (FULL_ONLY there), as a table of each layout's largest differences from one process.

    .venv/bin/python scripts/layout_matrix.py             # about 20 minutes on a 2-core CPU
    .venv/bin/python scripts/layout_matrix.py -k "two"    # a pytest -k expression: a part of it

Runs pytest on that file with AUTOMODEL_LAYOUTS=full and exits with its exit code.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINE = re.compile(r"(\d|two|four) ranks? (.+?): max loss diff (\S+), max grad-norm diff (\S+)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-k", default="", help="a pytest -k expression selecting checks")
    args = ap.parse_args()
    cmd = [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "tests/test_parallel_layouts.py"]
    if args.k:
        cmd += ["-k", args.k]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "AUTOMODEL_LAYOUTS": "full"}, capture_output=True,
                          text=True)
    rows = [m.groups() for m in map(LINE.search, proc.stdout.splitlines()) if m]
    print("| ranks | layout | max loss diff | max grad-norm diff |\n|---|---|---|---|")
    for ranks, name, loss, grad in rows:
        print(f"| {ranks} | {name} | {loss} | {grad} |")
    summary = [ln for ln in proc.stdout.splitlines() if re.search(r"\d+ (passed|failed)", ln)]
    print("\n" + (summary[-1] if summary else proc.stdout[-3000:] + proc.stderr[-3000:]))
    if proc.returncode:
        print("\n".join(ln for ln in proc.stdout.splitlines() if ln.startswith(("FAILED", "ERROR"))))
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
