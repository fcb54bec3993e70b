"""The example third-party package under plugins/: pip-installed, its plugin and option appear; gone, they vanish.

It is installed with pip into a target folder that only the "installed" subprocesses see on PYTHONPATH,
so the test environment itself is never modified.
"""

import json
import os
import subprocess
import sys

import pytest
from helpers import MICRO, cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "plugins", "automodel-example-plugin")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    target = str(tmp_path_factory.mktemp("site"))
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--target", target,
         PACKAGE], capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"PYTHONPATH": target}


def test_installed_plugin_is_listed_with_its_package(tmp_path, installed):
    proc = cli("list", cwd=str(tmp_path), env=installed)
    assert proc.returncode == 0, proc.stderr
    row = next(ln for ln in proc.stdout.splitlines() if "lion" in ln)
    assert "optim" in row and "automodel-exa" in row  # rich may abbreviate long cells


def test_installed_option_trains(tmp_path, installed):
    run = tmp_path / "run"
    proc = cli(*MICRO, "optim=lion", "optim.lr=1e-3", "train.max_steps=10", "train.log_every=5",
               "checkpoint.export_final=false", f"hydra.run.dir={run}", cwd=str(tmp_path), env=installed)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "plugin: lion" in (run / "config.yaml").read_text()
    records = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["loss"] < records[0]["loss"]


def test_uninstalled_plugin_is_gone(tmp_path):
    proc = cli("list", cwd=str(tmp_path))
    assert "lion" not in proc.stdout
    proc = cli("optim=lion", cwd=str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.strip().endswith("optim=lion: no such option; choose one of: adamw")
