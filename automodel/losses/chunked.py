"""`loss=chunked_ce`: the output head and the cross-entropy together, chunk by chunk over the tokens, so the
full `[tokens, vocab]` logits never exist (automodel/head_loss.py). Same loss and gradients as `ce` (fp32:
within 1e-5), with a step's peak memory no longer growing with vocab x tokens.

With a distillation teacher the KL term is computed in the same chunks (the teacher's head hands back its hidden
states, and its logits are formed here a chunk at a time): neither model's logits exist whole.

Not with pipeline parallelism (its last stage takes logits from a schedule) nor tensor parallelism (the head's
vocabulary is split over ranks: `ce` with `parallel.loss_parallel=true` keeps the logits sharded there).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from automodel import head_loss
from automodel.errors import UserError


@dataclasses.dataclass
class ChunkedCrossEntropyConfig:
    chunk_tokens: Optional[int] = None  # tokens per chunk; null: a chunk's fp32 logits ~256 MiB
    recompute: bool = False  # true: backward recomputes each chunk (+1/3 head FLOPs), holding no gradients from forward


class ChunkedCrossEntropy:
    Config = ChunkedCrossEntropyConfig
    option = "chunked_ce"
    returns_logits = False  # the model hands back the loss
    distills_in_head = True  # with a teacher: the KL term too, chunk by chunk (targets(labels, teacher))

    def __init__(self, config: ChunkedCrossEntropyConfig):
        if config.chunk_tokens is not None and config.chunk_tokens < 1:
            raise UserError(f"loss.chunk_tokens={config.chunk_tokens}: give a positive number of tokens per chunk, "
                            "or null to size chunks by the vocabulary")
        self.cfg = config
        self.head = None
        self.model_name = "the model"

    def check_layout(self, dims, hints) -> None:
        if hints.pipeline:
            raise UserError(f"loss={self.option} does not work under pipeline parallelism (its last stage computes the "
                            "loss from logits); use loss=ce")
        if dims.tp > 1:
            raise UserError(f"loss={self.option} does not work under tensor parallelism (tp={dims.tp} splits the head's "
                            "vocabulary over ranks); use loss=ce with parallel.loss_parallel=true, which keeps the "
                            "logits sharded")

    def prepare(self, model, model_name: str) -> None:
        self.model_name = model_name
        self.head = head_loss.install(model, self.cfg.chunk_tokens, self.cfg.recompute, option=self.option)

    def targets(self, labels, teacher=None):
        return self.head.targets(labels, teacher)

    def distill_parts(self):
        """(CE, KD) token sums of the last forward with a teacher (no gradient)."""
        return self.head.parts

    def token_loss(self, logits, labels):
        return self.head.loss_of(logits, self.model_name)
