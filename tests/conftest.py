"""Shared fixtures: a very small model so every test trains in seconds on two CPU cores."""

import os
import sys
import warnings

import pytest

sys.path.insert(0, os.path.dirname(__file__))
warnings.filterwarnings("ignore", message=r".*torchao.*")
os.environ.setdefault("AUTOMODEL_NO_PROGRESS", "1")


@pytest.fixture
def run_dir(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    return str(d)
