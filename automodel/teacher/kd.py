"""Teacher plugin `kd`: knowledge distillation from a frozen teacher model.

The objective is (1 - kd_ratio) x CE + kd_ratio x KL(teacher || student) over target tokens at temperature T
(automodel/distill.py). The teacher is any model a `model` plugin can build: `teacher.model` is a model node
with the same keys as the `model` group's (the `hf` option: a folder or hub id in `teacher.model.path`). The
engine lays it out with the run's parallel plugin, loads its weights shard by shard, and keeps it frozen in
eval mode; it is never checkpointed or exported.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from automodel import registry
from automodel.distill import token_sum_kl
from automodel.errors import UserError


@dataclasses.dataclass
class KDConfig:
    kd_ratio: float = 0.5  # weight of the KL term; 1 - kd_ratio weighs the cross-entropy on the labels
    temperature: float = 1.0  # softens both distributions; the KL is scaled by temperature^2
    model: Any = None  # the teacher's model node (a `model` plugin and its keys)


class KnowledgeDistillation:
    Config = KDConfig
    enabled = True

    def __init__(self, config: KDConfig):
        if not 0 <= config.kd_ratio <= 1:
            raise UserError(f"teacher.kd_ratio={config.kd_ratio} must be in [0, 1] (the weight of the KL term)")
        if not (config.temperature > 0 and math.isfinite(config.temperature)):
            raise UserError(f"teacher.temperature={config.temperature} must be a positive number, e.g. 1.0 or 2.0")
        if config.model is None:
            raise UserError("teacher.model is missing: give the teacher's model node, e.g. teacher=hf "
                            "teacher.model.path=<folder or hub id>")
        self.cfg = config
        try:  # validated now, built by the engine
            self.model = registry.instantiate("model", config.model)
        except UserError as e:  # the model plugin names its keys model.*: here they are teacher.model.*
            message = str(e)
            raise UserError("teacher." + message if message.startswith("model.") else f"teacher.model: {message}") from None
        self.kd_ratio = config.kd_ratio

    def token_loss(self, student_logits, teacher_logits, labels):
        """The KL term's sum over target tokens."""
        return token_sum_kl(student_logits, teacher_logits, labels, self.cfg.temperature)
