"""PEFT plugin `none`: full fine-tuning; every parameter trains and the export is the model itself."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class NoPeftConfig:
    pass


class NoPeft:
    Config = NoPeftConfig

    def __init__(self, config: NoPeftConfig):
        self.cfg = config

    def apply(self, model):
        return model

    def export(self, model, full_state_dict, out_dir):
        return model
