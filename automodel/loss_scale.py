"""Dynamic loss scaling for fp16: gradients of small losses underflow in float16, so backward runs on the loss
times a scale S, the gradients are divided by S before clipping, and S adapts: halved at every step whose
gradients overflowed (that step is skipped: the weights, optimizer state and LR schedule stay as they were),
doubled after `growth_interval` applied steps in a row (torch.amp.GradScaler's policy).

Overflow is read from the global gradient norm the step already computes (one number, the same on every rank
of every layout), so the decision needs no collective of its own and is the same everywhere, sharded or not.
"""

from __future__ import annotations

import torch


class DynamicLossScale:
    def __init__(self, init_scale: float = 2.0**16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000):
        self.value = float(init_scale)
        self.growth_factor = growth_factor
        self.backoff_factor = backoff_factor
        self.growth_interval = growth_interval
        self.good_steps = 0  # applied steps since the last change of scale
        self.overflows = 0  # steps skipped for overflow so far (this run, resumes included)

    def unscale_(self, params) -> None:
        """Divide every gradient by the scale, in place (DTensor shards too)."""
        inverse = 1.0 / self.value
        with torch.no_grad():
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(inverse)

    def overflowed(self) -> str:
        before = self.value
        self.value *= self.backoff_factor
        self.good_steps = 0
        self.overflows += 1
        return f"fp16 gradient overflow (loss scale {before:g} -> {self.value:g})"

    def applied(self) -> None:
        self.good_steps += 1
        if self.good_steps >= self.growth_interval:
            self.value *= self.growth_factor
            self.good_steps = 0

    def state_dict(self) -> dict:
        return {"value": self.value, "good_steps": self.good_steps, "overflows": self.overflows}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])
        self.good_steps = int(state["good_steps"])
        self.overflows = int(state.get("overflows", 0))
