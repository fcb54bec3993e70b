#!/usr/bin/env bash
# One-time set-up: a virtual environment in .venv holding torch and automodel (editable), with test tools.
#
# torch goes in first, on its own: installed later as a dependency, the newest CUDA build (several GB)
# would be pulled even on a machine without a GPU. Pin another build with AUTOMODEL_TORCH, e.g.
#   AUTOMODEL_TORCH="torch==2.13.0" bash scripts/setup.sh
# On a CPU-only machine, point pip at a CPU wheel first (a find-links folder, or PyTorch's CPU index).
#
# Every install is constrained (pip -c) by constraints.txt: the versions CI last passed with, so a clone set up
# later installs that same set, not whatever has been published since (scripts/freeze_constraints.sh rewrites
# it from a green .venv). With AUTOMODEL_TORCH its torch pin is left out; AUTOMODEL_CONSTRAINTS= (empty) installs
# the newest releases the version ranges in pyproject.toml allow (another Python, or trying a new transformers).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_SPEC=${AUTOMODEL_TORCH:-torch==2.13.0}
CONSTRAINTS=${AUTOMODEL_CONSTRAINTS-constraints.txt}
export PIP_DISABLE_PIP_VERSION_CHECK=1

if [ ! -x .venv/bin/python ]; then
  echo "automodel setup: creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
pinned=()
if [ -n "$CONSTRAINTS" ]; then
  [ -f "$CONSTRAINTS" ] || { echo "automodel setup: AUTOMODEL_CONSTRAINTS=$CONSTRAINTS: no such file" >&2; exit 2; }
  if [ -n "${AUTOMODEL_TORCH:-}" ]; then # another torch than the tested one: its pin must not refuse it
    grep -v -i '^torch==' "$CONSTRAINTS" >.venv/constraints-chosen-torch.txt
    CONSTRAINTS=.venv/constraints-chosen-torch.txt
  fi
  pinned=(-c "$CONSTRAINTS")
  echo "automodel setup: versions pinned by $CONSTRAINTS"
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "automodel setup: installing $TORCH_SPEC"
  .venv/bin/pip install --quiet ${pinned[@]+"${pinned[@]}"} "$TORCH_SPEC"
fi
echo "automodel setup: installing automodel and its dependencies"
.venv/bin/pip install --quiet ${pinned[@]+"${pinned[@]}"} -e ".[test,plot,loggers,eval]"
# torchao (precision=fp8) and bitsandbytes (peft=qlora) go in a folder of their own that only their tests put
# on the path: transformers and peft import them in every run once they are installed (~0.6 s each, and log
# noise), so they stay opt-in extras (`pip install 'automodel[fp8]'`, `'automodel[qlora]'`) for users and
# out of the tests' other hundreds of runs
.venv/bin/pip install --quiet --no-deps --target .venv/extras ${pinned[@]+"${pinned[@]}"} \
  "torchao>=0.10" "bitsandbytes>=0.45"
.venv/bin/python -c "import torch, transformers, peft, hydra; print(f'automodel setup: done (torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__})')"
