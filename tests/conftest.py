"""Shared fixtures: a very small model so every test trains in seconds on two CPU cores."""

import os
import sys
import warnings

import pytest

sys.path.insert(0, os.path.dirname(__file__))
warnings.filterwarnings("ignore", message=r".*torchao.*")
os.environ.setdefault("AUTOMODEL_NO_PROGRESS", "1")
os.environ["WANDB_MODE"] = "offline"  # a test never reaches wandb's servers (test_loggers unsets it to test that)


@pytest.fixture
def run_dir(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    return str(d)


@pytest.fixture(scope="session")
def zoo(pytestconfig, tmp_path_factory):
    """(family -> tiny HF checkpoint folder, the tasks file): tests/model_zoo.py, built under $AUTOMODEL_MODEL_ZOO,
    else pytest's cache directory, else (no cache plugin) a temporary one; rebuilt per family only on a change."""
    import matrix_runs as mr
    import model_zoo as mz

    cache = getattr(pytestconfig, "cache", None)
    root = os.environ.get("AUTOMODEL_MODEL_ZOO") or (str(cache.mkdir("model_zoo")) if cache is not None
                                                     else str(tmp_path_factory.mktemp("model_zoo")))
    return mz.build_zoo(root), mr.write_tasks(root)
