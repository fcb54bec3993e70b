"""Precision plugin `autocast`: the forward pass under torch.autocast to bfloat16 or float16.

`autocast(device_type)` is the context every forward pass (and the loss) runs under; fp32 master weights
and optimizer state stay as they are. `mixed_precision_policy()` is what a sharding (FSDP2) parallel plugin
hands to `fully_shard`: parameters all-gathered in `dtype`, gradients reduced in `reduce_dtype`.
"""

from __future__ import annotations

import dataclasses
import logging

from automodel.errors import UserError

log = logging.getLogger(__name__)

DTYPES = ("bfloat16", "float16")


@dataclasses.dataclass
class AutocastConfig:
    dtype: str = "bfloat16"  # float16 has no loss scaling here: gradients can underflow; prefer bfloat16
    reduce_dtype: str = "float32"  # gradient reduction dtype under FSDP2


class Autocast:
    Config = AutocastConfig

    def __init__(self, config: AutocastConfig):
        if config.dtype not in DTYPES:
            raise UserError(f"precision.dtype={config.dtype!r}: choose one of {', '.join(DTYPES)}")
        if config.reduce_dtype not in (*DTYPES, "float32"):
            raise UserError(f"precision.reduce_dtype={config.reduce_dtype!r}: choose float32, bfloat16 or float16")
        self.cfg = config
        self._told = False

    def autocast(self, device_type: str):
        import torch

        if not self._told:
            log.info("precision=autocast: %s autocast on %s", self.cfg.dtype, device_type)
            self._told = True
        return torch.autocast(device_type, dtype=getattr(torch, self.cfg.dtype))

    def mixed_precision_policy(self):
        import torch
        from torch.distributed.fsdp import MixedPrecisionPolicy

        return MixedPrecisionPolicy(param_dtype=getattr(torch, self.cfg.dtype),
                                    reduce_dtype=getattr(torch, self.cfg.reduce_dtype))
