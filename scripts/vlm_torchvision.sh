#!/usr/bin/env bash
# The image-text tests with torchvision, in a virtual environment of their own: Qwen2.5-VL and Qwen3-VL, whose
# processors hold a video processor that transformers builds only with torchvision, run beside Gemma 3 and LLaVA
# (tests/test_vlm.py skips them, naming why, where torchvision does not import).
#
#   bash scripts/vlm_torchvision.sh            # venv in /tmp/automodel-tv (several GB: a torch that has a
#                                              # torchvision build this machine can install)
# AUTOMODEL_TV_TORCH picks that torch (default torch==2.14.1: PyPI's build, whose torchvision PyPI holds; a CPU
# torch needs PyTorch's CPU index to be reachable). torchvision itself comes from the install step users run:
# python -m automodel.install_torchvision.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${AUTOMODEL_TV_VENV:-/tmp/automodel-tv}
TORCH_SPEC=${AUTOMODEL_TV_TORCH:-torch==2.14.1}
export PIP_DISABLE_PIP_VERSION_CHECK=1
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -c "import torch" 2>/dev/null || "$VENV/bin/pip" install --quiet "$TORCH_SPEC"
"$VENV/bin/pip" install --quiet -e ".[test]"
"$VENV/bin/python" -m automodel.install_torchvision
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_vlm.py -rs "$@"
