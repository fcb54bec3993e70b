#!/usr/bin/env bash
# Write constraints.txt from .venv: the exact versions of every package the tests passed with, so that
# scripts/setup.sh (pip -c constraints.txt) installs the same set in a fresh clone months later, whatever
# PyPI has published since. Run it after a green CI run (`CI=true bash .ci/run`) on purpose, to move the set.
#
# Left out: automodel itself (editable) and pip (the venv's own). torch is written without its local build
# label (2.13.0, not 2.13.0+cpu): the pin then fits the CPU wheel and PyPI's CUDA one alike, as setup.sh's does.
# torchao and bitsandbytes live in .venv/extras (opt-in extras installed with --target): read from there.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || { echo "freeze_constraints: no .venv here; run scripts/setup.sh first" >&2; exit 1; }

packages() {
  PIP_DISABLE_PIP_VERSION_CHECK=1 .venv/bin/pip freeze --all --exclude-editable |
    grep -v -i -e '^pip==' -e '^automodel==' -e '^#' -e ' @ ' |
    sed -E 's/^(torch==[^+]+)\+.*$/\1/'
  for info in .venv/extras/*.dist-info; do
    [ -f "$info/METADATA" ] || continue
    name=$(sed -n 's/^Name: //p' "$info/METADATA" | head -n 1)
    echo "$name==$(sed -n 's/^Version: //p' "$info/METADATA" | head -n 1)"
  done
}
{
  echo "# Written by scripts/freeze_constraints.sh from a .venv the tests passed in ($(.venv/bin/python --version),"
  echo "# $(date -u +%Y-%m-%d)); scripts/setup.sh installs with pip -c this file. Regenerate it, never edit by hand."
  packages | LC_ALL=C sort -f -u
} >constraints.txt.tmp
mv constraints.txt.tmp constraints.txt
echo "freeze_constraints: wrote constraints.txt ($(grep -vc '^#' constraints.txt) packages)"
