"""What `automodel eval` was pointed at, as an HF folder to load: an exported folder as it is; a checkpoint, or a
run whose newest state is a checkpoint, exported first (the same path as `automodel export`) into a folder that
is removed afterwards. Locating reads only small files, so the settings are checked before any export."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile

from automodel.errors import UserError


@dataclasses.dataclass
class Target:
    path: str  # an HF folder, or a checkpoint folder to export first
    label: str  # "final", "step_00000300", or the folder's own name: the results file's name
    run_dir: str | None  # results go to <run>/eval/<label>.json; None for a folder outside a run
    config_yaml: str | None  # the run's resolved config (its eval section is the default), when there is one
    is_checkpoint: bool = False


def locate(path: str) -> Target:
    from automodel.checkpoint.files import META, checkpoint_dirs, find_checkpoint, read_meta

    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(path):
        raise UserError(f"'{path}' is not a folder; pass a run directory, a checkpoints/step_N folder or an exported "
                        "model folder")
    if os.path.isfile(os.path.join(path, "config.json")):
        run = _run_of(path)
        return Target(path, os.path.basename(path), run, _read(os.path.join(run, "config.yaml")) if run else None)
    if os.path.isfile(os.path.join(path, "adapter_config.json")):
        raise UserError(f"'{path}' holds a PEFT adapter, not a model; evaluate the merged model (the run's final/ "
                        "folder), or export the run's checkpoint: automodel export <run> OUT")
    if os.path.isfile(os.path.join(path, META)):
        return _checkpoint(path, read_meta(path), os.path.dirname(os.path.dirname(path)))
    newest = checkpoint_dirs(os.path.join(path, "checkpoints"))
    final = _final_of(path)
    if final and (not newest or os.path.getmtime(final) >= os.path.getmtime(newest[-1][1])):
        return Target(final, os.path.basename(final), path, _read(os.path.join(path, "config.yaml")))
    if newest:
        checkpoint = find_checkpoint(path)  # the newest complete one
        return _checkpoint(checkpoint, read_meta(checkpoint), path)
    raise UserError(f"'{path}' holds no model: no config.json (an exported folder), no final/ export and no "
                    "checkpoints/step_N; pass a run directory, a checkpoint or an exported model folder")


@contextlib.contextmanager
def model_folder(target: Target):
    """The HF folder to load; a checkpoint's export lives in <run>/eval/ only while it is being evaluated."""
    if not target.is_checkpoint:
        yield target.path
        return
    from automodel.cli_export import export

    parent = os.path.join(target.run_dir, "eval")
    os.makedirs(parent, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{target.label}-model-", dir=parent) as scratch:
        yield export(target.path, os.path.join(scratch, "model"))


def _checkpoint(path: str, meta: dict, run: str) -> Target:
    return Target(path, os.path.basename(path), run, meta.get("config_yaml"), is_checkpoint=True)


def _final_of(run: str) -> str | None:
    """The run's export (final/, or the folder its checkpoint.dirname names), when it holds a model."""
    name = "final"
    config = _read(os.path.join(run, "config.yaml"))
    if config:
        from omegaconf import OmegaConf

        name = OmegaConf.create(config).get("checkpoint", {}).get("dirname") or name
    folder = os.path.join(run, name)
    return folder if os.path.isfile(os.path.join(folder, "config.json")) else None


def _run_of(folder: str) -> str | None:
    parent = os.path.dirname(folder)
    return parent if os.path.isfile(os.path.join(parent, "config.yaml")) else None


def _read(path: str) -> str | None:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return f.read()
