"""Optimizer plugin `adamw`: torch AdamW with linear warmup and cosine decay.

Weight decay skips biases, norms and embeddings-free 1-D parameters, as is standard for transformers.
Every hyper-parameter is checked when the config is validated, before a run directory or a model exists:
torch would refuse some of them only after the model is built (with a traceback), and accept others
(lr=inf, eps=0) that turn the first steps into NaNs.
"""

from __future__ import annotations

import dataclasses
import math

from automodel.errors import UserError
from automodel.optim.schedule import warmup_cosine_scheduler


@dataclasses.dataclass
class AdamWConfig:
    lr: float = 3e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # final LR as a fraction of optim.lr
    fused: bool = False  # torch's fused kernel (CUDA)


class AdamW:
    Config = AdamWConfig

    def __init__(self, config: AdamWConfig):
        check(config)
        self.cfg = config

    def build(self, params, max_steps: int):
        import torch

        if not params:
            raise UserError("no parameter requires a gradient: nothing to train")
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": self.cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        opt = torch.optim.AdamW(
            [g for g in groups if g["params"]], lr=self.cfg.lr, betas=(self.cfg.beta1, self.cfg.beta2),
            eps=self.cfg.eps, fused=self.cfg.fused or None,
        )
        return opt, warmup_cosine_scheduler(opt, warmup_steps=self.cfg.warmup_steps, max_steps=max_steps,
                                            min_lr_ratio=self.cfg.min_lr_ratio)


def check(c: AdamWConfig) -> None:
    """One line naming the first hyper-parameter outside its range (NaN fails every comparison: refused too)."""
    rules = (
        ("lr", c.lr > 0 and math.isfinite(c.lr), "a finite positive number, e.g. 3e-4"),
        ("weight_decay", c.weight_decay >= 0 and math.isfinite(c.weight_decay), "a finite number >= 0 (0: off)"),
        ("beta1", 0 <= c.beta1 < 1, "in [0, 1), e.g. 0.9"),
        ("beta2", 0 <= c.beta2 < 1, "in [0, 1), e.g. 0.95"),
        ("eps", c.eps > 0 and math.isfinite(c.eps), "a finite positive number, e.g. 1e-8"),
        ("warmup_steps", c.warmup_steps >= 0, ">= 0 (0: no warmup)"),
        ("min_lr_ratio", 0 <= c.min_lr_ratio <= 1, "in [0, 1] (the final LR as a fraction of optim.lr)"),
    )
    for key, ok, valid in rules:
        if not ok:
            raise UserError(f"optim.{key}={getattr(c, key)} must be {valid}")
