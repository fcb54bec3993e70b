"""The Lion optimizer as an automodel `optim` plugin.

A plugin is a class with a dataclass `Config` and `__init__(config)`; an optim plugin's `build` returns
(optimizer, LR scheduler). It may use automodel's public helpers (the warmup-cosine shape here), never
another plugin.
"""

from __future__ import annotations

import dataclasses

import torch

from automodel.errors import UserError
from automodel.optim.schedule import warmup_cosine_scheduler


@dataclasses.dataclass
class LionConfig:
    lr: float = 3e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1


class LionOptimizer(torch.optim.Optimizer):
    """update = sign(beta1 * m + (1 - beta1) * g); m <- beta2 * m + (1 - beta2) * g. Elementwise only, so
    it works unchanged on FSDP2's sharded DTensor parameters."""

    def __init__(self, params, lr: float, betas: tuple[float, float], weight_decay: float):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(p)
                exp_avg = state["exp_avg"]
                p.mul_(1 - group["lr"] * group["weight_decay"])
                update = exp_avg.mul(beta1).add_(p.grad, alpha=1 - beta1).sign_()
                p.add_(update, alpha=-group["lr"])
                exp_avg.mul_(beta2).add_(p.grad, alpha=1 - beta2)


class Lion:
    Config = LionConfig

    def __init__(self, config: LionConfig):
        if config.lr <= 0:
            raise UserError(f"optim.lr={config.lr} must be positive")
        self.cfg = config

    def build(self, params, max_steps: int):
        if not params:
            raise UserError("no parameter requires a gradient: nothing to train")
        opt = LionOptimizer(params, lr=self.cfg.lr, betas=(self.cfg.beta1, self.cfg.beta2),
                            weight_decay=self.cfg.weight_decay)
        return opt, warmup_cosine_scheduler(opt, warmup_steps=self.cfg.warmup_steps, max_steps=max_steps,
                                            min_lr_ratio=self.cfg.min_lr_ratio)
