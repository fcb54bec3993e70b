"""`loss=ce`: cross-entropy over the model's full logits, upcast to fp32.

The simplest and most compatible choice (every model, every layout, tensor-parallel `loss_parallel` on
vocab-sharded logits), at the cost of one `[tokens, vocab]` fp32 tensor and its gradient per micro-batch.
"""

from __future__ import annotations

import contextlib
import dataclasses

from automodel.loss import token_sum_cross_entropy


@dataclasses.dataclass
class CrossEntropyConfig:
    pass


class CrossEntropy:
    Config = CrossEntropyConfig

    def __init__(self, config: CrossEntropyConfig):
        self.cfg = config

    def targets(self, labels):
        return contextlib.nullcontext()

    def token_loss(self, logits, labels):
        return token_sum_cross_entropy(logits, labels)
