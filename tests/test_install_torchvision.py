"""`python -m automodel.install_torchvision`: the torchvision build that goes with the installed torch (the
Qwen-VL processors need it), never a second torch, and one line where it cannot be had."""

from __future__ import annotations

import subprocess
import sys

import pytest

from automodel.install_torchvision import PYTORCH_INDEX, Refused, plan


@pytest.mark.parametrize("torch_version, wanted, index", [
    ("2.13.0+cpu", ["torchvision==0.28.0+cpu", "torch==2.13.0"], f"{PYTORCH_INDEX}/cpu"),
    ("2.14.1+cu130", ["torchvision==0.29.1", "torch==2.14.1"], f"{PYTORCH_INDEX}/cu130"),
    ("2.9.1+rocm6.4", ["torchvision==0.24.1", "torch==2.9.1"], f"{PYTORCH_INDEX}/rocm6.4"),
    ("2.6.0", ["torchvision==0.21.0", "torch==2.6.0"], None),  # PyPI's own build: PyPI's torchvision
])
def test_the_matching_release_and_the_index_of_the_build_variant(torch_version, wanted, index):
    assert plan(torch_version) == (wanted, index)
    assert plan(torch_version, "https://mirror.example/whl") == (wanted, "https://mirror.example/whl")


@pytest.mark.parametrize("torch_version, message", [
    ("2.15.0.dev20261101+cpu", "is not a release build"),
    ("2.4.1", "older than automodel supports"),
])
def test_builds_without_a_published_match_are_refused(torch_version, message):
    with pytest.raises(Refused, match=message):
        plan(torch_version)


def test_an_index_without_the_build_is_one_line_exit_2_and_installs_nothing(tmp_path):
    import importlib.util

    import torch

    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed here: nothing would be attempted")
    dry = subprocess.run([sys.executable, "-m", "automodel.install_torchvision", "--dry-run"], capture_output=True,
                         text=True)
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.split()[3:5] == ["install", "--disable-pip-version-check"]
    assert f"torch=={torch.__version__.split('+')[0]}" in dry.stdout
    done = subprocess.run([sys.executable, "-m", "automodel.install_torchvision", "--index", tmp_path.as_uri()],
                          capture_output=True, text=True, env={"PIP_NO_INDEX": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("automodel: pip could not install torchvision=="), lines
    assert "Traceback" not in done.stderr
    assert importlib.util.find_spec("torchvision") is None
