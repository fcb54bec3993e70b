"""Precision plugins `fp32` and `bf16`.

bf16 keeps fp32 master weights and optimizer state. Unsharded models run under autocast; under FSDP2 the
`MixedPrecisionPolicy` all-gathers parameters in bf16 and reduces gradients in fp32, and autocast still
covers the ops FSDP does not own (the loss is always computed in fp32). `reduce_dtype` is checked when
the config is validated: FSDP2 would otherwise meet a bad name only once the model is laid out.
"""

from __future__ import annotations

import contextlib
import dataclasses

from automodel.errors import UserError

REDUCE_DTYPES = ("float32", "bfloat16", "float16")  # fp32: exact sums; the others halve the traffic, lossier


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
        if config.reduce_dtype not in REDUCE_DTYPES:
            raise UserError(f"precision.reduce_dtype={config.reduce_dtype!r}: choose one of {', '.join(REDUCE_DTYPES)} "
                            "(the dtype gradients are reduced in under FSDP2)")
        self.cfg = config

    def autocast(self, device_type: str):
        import torch

        return torch.autocast(device_type, dtype=torch.bfloat16)

    def mixed_precision_policy(self):
        import torch
        from torch.distributed.fsdp import MixedPrecisionPolicy

        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=getattr(torch, self.cfg.reduce_dtype))
