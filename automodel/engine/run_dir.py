"""What the run directory holds besides the model: the resolved config and Hydra's record of the command line.

Both are written when the run begins (`begin`), after every refusal could have happened: until then the folder
holds what the invocation found there and its log (automodel.fs.claim). Hydra would write its record
(`.hydra/`) at start-up, over the record of the run that owns the folder, even when this one is then refused;
automodel starts Hydra with `hydra.output_subdir=null` and writes the same files here instead.
"""

from __future__ import annotations

import os

from automodel.fs import RESOLVED_CONFIG


def resolved_config_yaml(cfg) -> str:
    """The config as this run resolved it, secrets masked (a resolved ${oc.env:...} among them): what config.yaml
    and every checkpoint keep."""
    from omegaconf import OmegaConf

    from automodel.secrets import redact_config

    return OmegaConf.to_yaml(OmegaConf.create(redact_config(OmegaConf.to_container(cfg, resolve=True))))


def begin(cfg, out_dir: str) -> str:
    """The run begins: write Hydra's record of the command line (masked) and the resolved config.yaml, last
    (its write is what marks the run as begun). Rank 0 only."""
    _write_hydra_record(cfg, out_dir)
    path = os.path.join(out_dir, RESOLVED_CONFIG)
    with open(path, "w") as f:
        f.write(resolved_config_yaml(cfg))
    return path


def _write_hydra_record(cfg, out_dir: str) -> None:
    """What Hydra writes into `<run dir>/<hydra.output_subdir>/` at start-up (automodel asks it not to: see the
    module docstring): the job's config as composed, Hydra's own config and the overrides, secrets masked."""
    from omegaconf import OmegaConf

    from automodel.secrets import redact_text

    try:
        from hydra.core.hydra_config import HydraConfig

        hydra_cfg = HydraConfig.get()
    except ValueError:  # called outside a Hydra job (tests, library use): there is no command line to record
        return
    if hydra_cfg.output_subdir is not None:  # the user chose a folder for it: Hydra wrote it there at start-up
        for name in ("config.yaml", "hydra.yaml", "overrides.yaml"):
            _mask_file(os.path.join(out_dir, str(hydra_cfg.output_subdir), name))
        return
    folder = os.path.join(out_dir, ".hydra")
    os.makedirs(folder, exist_ok=True)
    for name, node in (("config.yaml", cfg), ("hydra.yaml", OmegaConf.create({"hydra": hydra_cfg})),
                       ("overrides.yaml", hydra_cfg.overrides.task)):
        with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
            f.write(redact_text(OmegaConf.to_yaml(node)))


def mask_sweep_record(sweep_dir: str) -> None:
    """Hydra writes a sweep's `multirun.yaml` itself, with the command line as typed: mask the secrets in it (a
    URL's password, a credential variable's value) as in everything automodel writes itself."""
    _mask_file(os.path.join(sweep_dir, "multirun.yaml"))


def _mask_file(path: str) -> None:
    from automodel.secrets import redact_text

    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        text = f.read()
    masked = redact_text(text)
    if masked != text:
        with open(path, "w", encoding="utf-8") as f:
            f.write(masked)
