"""PEFT plugin `top_layers`: train only the top decoder blocks (and the LM head); freeze the rest.

`apply(model)` runs on the meta-device model before the layout and before any weights exist: it may freeze
parameters or add modules (new modules are initialized by the model's `_init_weights`, or by the plugin's
optional `init_module(name, module) -> bool`). `export(model, full_state_dict, out_dir)` runs on rank 0 at
export time with an unsharded copy of the trained model: it may write files of its own to `out_dir` and
returns the plain transformers model the checkpoint plugin then writes.
"""

from __future__ import annotations

import dataclasses
import json
import os

from automodel.errors import UserError


@dataclasses.dataclass
class TopLayersConfig:
    train_last: int = 1  # decoder blocks that train, counted from the top
    train_head: bool = True  # the output projection (LM head) trains too


class TopLayers:
    Config = TopLayersConfig

    def __init__(self, config: TopLayersConfig):
        if config.train_last < 0 or (config.train_last == 0 and not config.train_head):
            raise UserError(f"peft.train_last={config.train_last}, peft.train_head={config.train_head}: nothing would "
                            "train; train at least one block or the head")
        self.cfg = config

    def apply(self, model):
        from automodel.modules import decoder_layers

        blocks = decoder_layers(model)
        if self.cfg.train_last > len(blocks):
            raise UserError(f"peft.train_last={self.cfg.train_last} but the model has {len(blocks)} decoder blocks")
        for p in model.parameters():
            p.requires_grad_(False)
        for block in blocks[len(blocks) - self.cfg.train_last :]:
            for p in block.parameters():
                p.requires_grad_(True)
        head = model.get_output_embeddings() if self.cfg.train_head else None
        if head is not None:
            for p in head.parameters():
                p.requires_grad_(True)
        return model

    def export(self, model, full_state_dict, out_dir):
        trained = sorted(n for n, p in model.named_parameters() if p.requires_grad)
        with open(os.path.join(out_dir, "top_layers.json"), "w") as f:
            json.dump({"train_last": self.cfg.train_last, "train_head": self.cfg.train_head,
                       "trained_parameters": trained}, f, indent=1)
        return model  # every weight is in the model itself: it is exported as it is
