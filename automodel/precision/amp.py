"""Precision plugins `fp32`, `bf16` and `fp16`.

bf16 keeps fp32 master weights and optimizer state. Unsharded models run under autocast; under FSDP2 the
`MixedPrecisionPolicy` all-gathers parameters in bf16 and reduces gradients in fp32, and autocast still
covers the ops FSDP does not own (the loss is always computed in fp32). `reduce_dtype` is checked when
the config is validated: FSDP2 would otherwise meet a bad name only once the model is laid out.

fp16 is bf16's arrangement in float16 plus dynamic loss scaling (automodel/loss_scale.py): float16 has 5
exponent bits, so small gradients underflow unless the loss is scaled up; overflowing steps are skipped and
counted, and the scale adapts. For GPUs without bf16 (V100, T4); on anything newer prefer bf16.
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


@dataclasses.dataclass
class FP16Config:
    reduce_dtype: str = "float32"  # gradient reduce-scatter dtype under FSDP2
    init_scale: float = 65536.0  # the first loss scale (2^16)
    growth_interval: int = 2000  # applied steps in a row before the scale doubles


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
    dtype = "bfloat16"  # of the forward's matmuls and of FSDP2's gathered parameters

    def __init__(self, config: BF16Config):
        if config.reduce_dtype not in REDUCE_DTYPES:
            raise UserError(f"precision.reduce_dtype={config.reduce_dtype!r}: choose one of {', '.join(REDUCE_DTYPES)} "
                            "(the dtype gradients are reduced in under FSDP2)")
        self.cfg = config

    def autocast(self, device_type: str):
        import torch

        return torch.autocast(device_type, dtype=getattr(torch, self.dtype))

    def mixed_precision_policy(self):
        import torch
        from torch.distributed.fsdp import MixedPrecisionPolicy

        return MixedPrecisionPolicy(param_dtype=getattr(torch, self.dtype),
                                    reduce_dtype=getattr(torch, self.cfg.reduce_dtype))


class FP16(BF16):
    Config = FP16Config
    dtype = "float16"

    def __init__(self, config: FP16Config):
        super().__init__(config)
        if not config.init_scale >= 1:
            raise UserError(f"precision.init_scale={config.init_scale} must be >= 1 (e.g. 65536)")
        if config.growth_interval < 1:
            raise UserError(f"precision.growth_interval={config.growth_interval} must be >= 1 (e.g. 2000)")

    def loss_scale(self):
        """A fresh dynamic loss scale for the run (the step guard checkpoints it)."""
        from automodel.loss_scale import DynamicLossScale

        return DynamicLossScale(init_scale=self.cfg.init_scale, growth_interval=self.cfg.growth_interval)
