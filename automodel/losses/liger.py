"""`loss=liger`: Liger Kernel's fused linear cross-entropy (Triton, CUDA only), inside the output head like
`chunked_ce` (automodel/head_loss.py): the head's matmul, the cross-entropy and their gradients in one kernel
per chunk. An optional extra: `pip install automodel[liger]`, imported only when chosen. Refused before
anything is built where it cannot run (no CUDA device, package missing), naming what would work.
"""

from __future__ import annotations

import dataclasses
import importlib.util

from automodel import head_loss
from automodel.batch import IGNORE_INDEX
from automodel.errors import UserError


@dataclasses.dataclass
class LigerCrossEntropyConfig:
    pass


class LigerCrossEntropy:
    Config = LigerCrossEntropyConfig
    option = "liger"
    returns_logits = False

    def __init__(self, config: LigerCrossEntropyConfig):
        self.cfg = config
        self.head = None
        self.model_name = "the model"

    def check_layout(self, dims, hints) -> None:
        import torch

        if not torch.cuda.is_available():
            raise UserError("loss=liger runs Triton kernels on CUDA GPUs and none is available here; use "
                            "loss=chunked_ce (the same memory saving, on any device)")
        if importlib.util.find_spec("liger_kernel") is None:
            raise UserError("loss=liger needs the liger-kernel package: pip install 'automodel[liger]' "
                            "(or use loss=chunked_ce)")
        if hints.pipeline or dims.tp > 1:
            raise UserError("loss=liger does not work under pipeline or tensor parallelism; use loss=ce")

    def prepare(self, model, model_name: str) -> None:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

        fused = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum")

        def loss(hidden, weight, bias, labels):
            out = fused(weight, hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1), bias)
            return out[0] if isinstance(out, tuple) else out  # versions with z-loss return (loss, z_loss)

        self.model_name = model_name
        self.head = head_loss.install(model, None, False, fused=loss, option=self.option)

    def targets(self, labels):
        return self.head.targets(labels)

    def token_loss(self, logits, labels):
        return self.head.loss_of(logits, self.model_name)
