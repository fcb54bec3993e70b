"""Learning-rate shapes shared by optimizer plugins (a helper of the optim group, not a plugin)."""

from __future__ import annotations

import math


def warmup_cosine(step: int, *, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak LR: linear warmup from ~0, then cosine decay to `min_lr_ratio`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine_scheduler(optimizer, *, warmup_steps: int, max_steps: int, min_lr_ratio: float):
    """A LambdaLR over `warmup_cosine`, stepped once per optimizer step (what optim plugins return)."""
    import functools

    import torch

    shape = functools.partial(warmup_cosine, warmup_steps=warmup_steps, max_steps=max_steps, min_lr_ratio=min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, shape)
