"""Precision plugins `fp32` and `bf16`.

bf16 keeps fp32 master weights and optimizer state. Unsharded models run under autocast; under FSDP2 the
`MixedPrecisionPolicy` all-gathers parameters in bf16 and reduces gradients in fp32, and autocast still
covers the ops FSDP does not own (the loss is always computed in fp32).
"""

from __future__ import annotations

import contextlib
import dataclasses


@dataclasses.dataclass
class FP32Config:
    pass


@dataclasses.dataclass
class BF16Config:
    reduce_dtype: str = "float32"  # gradient reduce-scatter dtype under FSDP2


class FP32:
    Config = FP32Config

    def __init__(self, config: FP32Config):
        self.cfg = config

    def autocast(self, device_type: str):
        return contextlib.nullcontext()

    def mixed_precision_policy(self):
        return None


class BF16:
    Config = BF16Config

    def __init__(self, config: BF16Config):
        self.cfg = config

    def autocast(self, device_type: str):
        import torch

        return torch.autocast(device_type, dtype=torch.bfloat16)

    def mixed_precision_policy(self):
        import torch
        from torch.distributed.fsdp import MixedPrecisionPolicy

        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=getattr(torch, self.cfg.reduce_dtype))
