"""What the run directory holds besides the model: the resolved config, and clean-up after a refusal."""

from __future__ import annotations

import os
import shutil

HYDRA_FILES = (".hydra", ".lock")  # what Hydra writes at start-up, and the job's lock (launch/lifetime.py)


def write_resolved_config(cfg, out_dir: str) -> str:
    from omegaconf import OmegaConf

    path = os.path.join(out_dir, "config.yaml")
    with open(path, "w") as f:
        f.write(OmegaConf.to_yaml(cfg, resolve=True))
    return path


def discard_if_untouched(out_dir: str) -> None:
    """Remove a run dir that holds only what Hydra wrote at start-up (a run refused before it began).

    A directory with anything else in it (an earlier run's results, a user's files) is left alone.
    """
    if not os.path.isdir(out_dir):
        return
    ours = set(HYDRA_FILES) | {f for f in os.listdir(out_dir) if f.endswith(".log")}
    if set(os.listdir(out_dir)) - ours:
        return
    shutil.rmtree(out_dir, ignore_errors=True)
    parent = os.path.dirname(os.path.abspath(out_dir))
    cwd = os.getcwd()
    while parent.startswith(cwd + os.sep) and not os.listdir(parent):  # empty date/sweep folders above it
        os.rmdir(parent)
        parent = os.path.dirname(parent)
