"""Which optimizer steps reach the weights: a non-finite loss or gradient norm never does, nor (opt-in) a spike.

A skipped step leaves parameters, optimizer state and LR schedule exactly as they were (the update is simply
not applied) and consumes its batch, so batches stay a pure function of (seed, step) and a resumed run makes the
same decisions. The guard's memory (recent losses, the current run of bad steps, the steps skipped so far) goes
into every checkpoint for that reason.

The spike guard compares a step's loss, computed on the weights of the step before, with the median of the last
`train.spike_window` applied steps. Rolling back to the last checkpoint and replaying the same batches would
rebuild those very weights, bitwise, so discarding the step's update *is* that roll-back, without reading a
checkpoint; the offending batch is skipped. After `train.max_bad_steps` bad steps in a row the weights
themselves are the problem (an LR far too high, a broken model): the run stops in one line, its last good
checkpoint kept.
"""

from __future__ import annotations

import math
import statistics

import torch
import torch.distributed as dist

from automodel.errors import UserError


class BadSteps(UserError):
    """Training stopped after too many consecutive skipped steps (every rank raises it at the same step)."""


class StepGuard:
    def __init__(self, max_bad_steps: int = 3, spike_factor: float | None = None, spike_window: int = 20,
                 loss_scale=None):
        self.max_bad_steps = max_bad_steps
        self.spike_factor = spike_factor
        self.spike_window = spike_window
        self.history: list[float] = []  # global losses of the last applied steps (spike guard only)
        self.bad_run: list[tuple[int, str]] = []  # (step, why) of the current run of consecutive skipped steps
        self.skipped: list[int] = []  # every skipped step of this run, for the record (and checkpoints)
        self.loss_scale = loss_scale  # automodel.loss_scale.DynamicLossScale under fp16, else None

    def judge(self, step: int, loss_share: torch.Tensor, grad_norm: torch.Tensor, dp_group=None,
              dp_size: int = 1) -> str | None:
        """Collective over dp when the spike guard is on. Why step `step` must not be applied, or None.

        `grad_norm` is already global (the same on every rank); the loss share is this rank's part of the
        global loss. One host sync per step: the price of never stepping on a NaN."""
        if hasattr(grad_norm, "full_tensor"):  # FSDP/TP: the norm is a DTensor; its full value is the global one
            grad_norm = grad_norm.full_tensor()
        values = [grad_norm.float().reshape(())]
        if self.spike_factor or self.loss_scale is not None:  # fp16: an overflow has a finite loss
            loss = loss_share.float().detach().clone()
            if dp_size > 1:
                dist.all_reduce(loss, group=dp_group)
            values.append(loss)
        read = torch.stack(values).tolist()
        norm, loss = read[0], (read[1] if len(read) > 1 else None)
        why = None
        if not math.isfinite(norm) and self.loss_scale is not None and math.isfinite(loss):
            self.skipped.append(step)  # the scale was too high for float16, not the step bad: not in bad_run
            return self.loss_scale.overflowed()
        if not math.isfinite(norm):
            why = f"gradient norm {norm}"
        elif loss is not None and not math.isfinite(loss):
            why = f"loss {loss}"
        elif self.spike_factor and len(self.history) >= self.spike_window:
            median = statistics.median(self.history)
            if loss > self.spike_factor * median:
                why = f"loss spike {loss:.4g} > {self.spike_factor:g} x median {median:.4g} of the last " \
                      f"{self.spike_window} steps"
        if why is None:
            self.bad_run = []
            if self.loss_scale is not None:
                self.loss_scale.applied()
            if self.spike_factor:  # (fp16 reads the loss too, for overflows: the spike guard may still be off)
                self.history = (self.history + [loss])[-self.spike_window:]
            return None
        self.bad_run.append((step, why))
        self.skipped.append(step)
        return why

    def check(self) -> None:
        """Raise BadSteps once `max_bad_steps` steps in a row were skipped (every rank at the same step)."""
        if self.max_bad_steps and len(self.bad_run) >= self.max_bad_steps:
            first, last = self.bad_run[0][0], self.bad_run[-1][0]
            raise BadSteps(f"stopped at step {last}: steps {first}-{last} were all skipped ({self.bad_run[-1][1]}); "
                           f"the weights never took them and the last checkpoint is kept. Lower optim.lr, check the "
                           f"data of those steps, or raise train.max_bad_steps")

    def state_dict(self) -> dict:
        state = {"history": self.history, "bad_run": [list(b) for b in self.bad_run], "skipped": self.skipped}
        if self.loss_scale is not None:
            state["loss_scale"] = self.loss_scale.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.history = [float(x) for x in state.get("history", [])]
        self.bad_run = [(int(s), str(w)) for s, w in state.get("bad_run", [])]
        self.skipped = [int(s) for s in state.get("skipped", [])]
        if self.loss_scale is not None and "loss_scale" in state:  # (a bf16/fp32 checkpoint resumed in fp16: fresh)
            self.loss_scale.load_state_dict(state["loss_scale"])
