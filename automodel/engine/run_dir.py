"""What the run directory holds besides the model: the resolved config, and clean-up after a refusal."""

from __future__ import annotations

import os
import shutil

HYDRA_FILES = (".hydra", ".lock")  # what Hydra writes at start-up, and the job's lock (launch/lifetime.py)


def resolved_config_yaml(cfg) -> str:
    """The config as this run resolved it, secrets masked (a resolved ${oc.env:...} among them): what config.yaml
    and every checkpoint keep."""
    from omegaconf import OmegaConf

    from automodel.secrets import redact_config

    return OmegaConf.to_yaml(OmegaConf.create(redact_config(OmegaConf.to_container(cfg, resolve=True))))


def write_resolved_config(cfg, out_dir: str) -> str:
    path = os.path.join(out_dir, "config.yaml")
    with open(path, "w") as f:
        f.write(resolved_config_yaml(cfg))
    return path


def mask_hydra_record(out_dir: str, sweep_dir: str | None = None) -> None:
    """Hydra records the command line as typed (.hydra/*.yaml, a sweep's multirun.yaml): mask the secrets in it
    (a URL's password, a credential variable's value) as in everything automodel writes itself."""
    from automodel.secrets import redact_text

    folder = os.path.join(out_dir, ".hydra")
    paths = [os.path.join(folder, f) for f in sorted(os.listdir(folder))] if os.path.isdir(folder) else []
    if sweep_dir:
        paths.append(os.path.join(sweep_dir, "multirun.yaml"))
    for path in paths:
        if not (path.endswith(".yaml") and os.path.isfile(path)):
            continue
        with open(path, encoding="utf-8") as f:
            text = f.read()
        masked = redact_text(text)
        if masked != text:
            with open(path, "w", encoding="utf-8") as f:
                f.write(masked)


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
