"""`automodel export CHECKPOINT OUT`: a DCP checkpoint -> an HF folder, offline, on one process.

CHECKPOINT is a checkpoints/step_N folder (or a run directory: its latest valid checkpoint). The model
is rebuilt from the config stored in the checkpoint (architecture, tokenizer, PEFT), its saved weights
are read with DCP (whatever mesh wrote them), and OUT is written exactly as a run's final/ folder.
"""

from __future__ import annotations

import argparse
import os

from automodel.errors import UserError


def export(checkpoint: str, out: str) -> str:
    import torch
    from omegaconf import OmegaConf
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from automodel import registry
    from automodel.checkpoint.dcp import find_checkpoint, load_model_state, read_meta
    from automodel.config import register_resolvers
    from automodel.engine.export import preprocessor, write_hf_folder
    from automodel.engine.materialize import finished

    path = find_checkpoint(checkpoint)
    meta = read_meta(path)
    if not meta.get("config_yaml"):
        raise UserError(f"checkpoint '{path}' holds no config; it cannot be exported offline")
    register_resolvers()
    cfg = OmegaConf.create(meta["config_yaml"])
    plugins = {g: registry.instantiate(g, cfg.get(g)) for g in ("model", "peft", "checkpoint")}
    skeleton = finished(plugins["peft"].apply(plugins["model"].build("meta")), plugins["peft"])  # as checkpointed
    template = {k: torch.empty(v.shape, dtype=v.dtype) for k, v in get_model_state_dict(skeleton).items()}
    full = load_model_state(path, template)
    out = os.path.abspath(os.path.expanduser(out))
    if os.path.abspath(path).startswith(out + os.sep) or os.path.abspath(path) == out:
        raise UserError(f"the output folder '{out}' contains the checkpoint; pick another folder")
    write_hf_folder(full, preprocessor(plugins["model"]), plugins, out)
    return out


def main(argv: list[str]) -> None:
    from automodel.generate import ArgumentParser  # argparse errors as one line, exit code 2

    parser = ArgumentParser(prog="automodel export", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", metavar="CHECKPOINT",
                        help="a <run>/checkpoints/step_N folder, or a run directory (its latest)")
    parser.add_argument("out", metavar="OUT", help="the HF folder to write (replaced atomically if it exists)")
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    out = export(args.checkpoint, args.out)
    print(f"exported {args.checkpoint} to {out}")
