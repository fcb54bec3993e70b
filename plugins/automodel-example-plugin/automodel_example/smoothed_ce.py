"""Loss plugin `smoothed_ce`: cross-entropy with label smoothing, as a token sum (the engine normalizes it)."""

from __future__ import annotations

import contextlib
import dataclasses

import torch.nn.functional as F

from automodel.batch import IGNORE_INDEX
from automodel.errors import UserError


@dataclasses.dataclass
class SmoothedCEConfig:
    smoothing: float = 0.1  # probability mass spread evenly over the vocabulary


class SmoothedCE:
    Config = SmoothedCEConfig

    def __init__(self, config: SmoothedCEConfig):
        if not 0 <= config.smoothing < 1:
            raise UserError(f"loss.smoothing={config.smoothing} must be in [0, 1), e.g. 0.1")
        self.cfg = config

    def targets(self, labels):
        return contextlib.nullcontext()  # the model returns full logits: nothing to hand its forward

    def token_loss(self, logits, labels):
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="sum", label_smoothing=self.cfg.smoothing)
