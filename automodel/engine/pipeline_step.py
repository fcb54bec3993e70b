"""The training step under pipeline parallel: the parallel plugin's schedule runs forward and backward.

The contract is StepRunner's (loop.py): one call per optimizer step, returning (loss share, grad norm),
with the same loss normalization (token sum / global target count x dp), applied here in the schedule's
loss function on the last stage. The step's micro-batches become the schedule's micro-batches: each is
padded to one width (the stages exchange buffers of one shape) and they are stacked. The last stage's
loss is summed over the pp group so every rank logs it, and the grad norm is taken over every stage.

With a distillation teacher (automodel/engine/teacher.py), its own forward-only schedule runs the step's
micro-batches first; the loss function blends each micro-batch's CE with the KL from the teacher's logits of
that micro-batch, formed right there, and keeps the two parts for the log.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import torch
import torch.distributed as dist

from automodel.batch import IGNORE_INDEX, StepBatch
from automodel.engine.loop import StepRunner, _for_layout, _full
from automodel.errors import UserError
from automodel.modules import in_shape_only_forward


@dataclasses.dataclass
class PipelineStepRunner(StepRunner):
    seq_len: int = 0  # train.seq_len: every micro-batch is padded to (a multiple of) it
    micro_batch_size: int = 1  # rows per schedule micro-batch
    pp_group: object = None
    pipeline: object = None  # automodel.parallel.pipeline.Pipeline, set once this runner's loss exists

    def __post_init__(self):
        multiple = math.lcm(8, self.hints.seq_multiple)  # collated widths are multiples of 8
        self.width = -(-self.seq_len // multiple) * multiple
        self._scale = torch.ones((), device=self.device)
        self._distilling = False  # a training pass with a teacher (held-out losses are the CE alone)
        self._part_sums = torch.zeros(2, device=self.device)  # (CE, KD) of this pass, as the losses are scaled

    def micro_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The schedule's loss function: one micro-batch's token-sum loss, normalized for the global batch."""
        loss = self.token_loss(logits, labels)
        if self._distilling and not in_shape_only_forward():  # (the schedule's shape inference: placeholders)
            taught = self.teacher.next_logits(logits)
            kd = self._reduce(self.teacher.token_loss(logits, taught, labels))
            self._part_sums += torch.stack([_full(loss.detach()), _full(kd.detach())]).float() * self._scale
            loss = (1 - self.teacher.kd_ratio) * loss + self.teacher.kd_ratio * kd
        return loss * self._scale

    def _stack(self, micro_batches: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, targets, real_rows = [], [], []
        for micro in micro_batches:
            if "position_ids" in micro:
                raise UserError("parallel.pp>1 does not support packed sequences; turn packing off (data.packing=false)")
            x, y = micro["input_ids"], micro["labels"]
            rows, pad = self.micro_batch_size - y.shape[0], self.width - y.shape[1]
            x = torch.nn.functional.pad(x, (0, pad, 0, rows))
            y = torch.nn.functional.pad(y, (0, pad, 0, rows), value=IGNORE_INDEX)
            inputs, y, real = _for_layout({"input_ids": x.to(self.device)}, y.to(self.device), self.hints)
            ids.append(inputs["input_ids"])
            targets.append(y)
            real_rows.append(real)
        self._rows = real_rows  # each schedule micro-batch's real positions, in the order the stages run them
        return torch.cat(ids), torch.cat(targets)

    def _run(self, micro_batches: list[dict], train: bool) -> torch.Tensor:
        """(the summed micro-batch losses of the whole pipeline, and of a teacher's CE and KD parts), on every rank
        of the pp group."""
        ids, labels = self._stack(micro_batches)
        if train and self.router is not None:
            self.router.begin_step(len(self._rows), self._loss_scale() if train else 1.0)
            for rows in self._rows:
                self.router.add_rows(rows)
        self._distilling = train and self.teacher is not None
        if self._distilling:
            self._part_sums.zero_()
            self.teacher.forward_stages(ids)
        loss_context = self.hints.loss_context() if self.hints.loss_context else contextlib.nullcontext()
        with self.autocast(), loss_context:
            losses = self.pipeline.run(ids, labels, train=train)
        total = torch.zeros(3, device=self.device)  # the loss, and a teacher's CE and KD parts
        for loss in losses:
            total[0] += _full(loss.detach()).float()
        if self._distilling:
            total[1:] = self._part_sums
        if train and self.router is not None:  # this stage's layers' part (every dp rank logs 1/dp of it)
            total[0] += self.router.weighted_step_value().to(total)
        dist.all_reduce(total, group=self.pp_group)
        return total

    def __call__(self, batch: StepBatch) -> tuple[torch.Tensor, torch.Tensor]:
        self._scale = self.dp_size / self._global_count(batch.num_target_tokens).clamp(min=1.0) * self._loss_scale()
        share, ce, kd = self._run(batch.micro_batches, train=True) / (self.dp_size * self._loss_scale())
        if self.teacher is not None:
            self.parts = {"ce_loss": ce, "kd_loss": kd}
        return share, self.clip_and_step(across=self.pp_group, loss_share=share)

    def eval_loss_sum(self, val: list[StepBatch]) -> torch.Tensor:
        """Held-out micro-batches through the schedule, forward only, in groups of its micro-batch count
        (a short last group is topped up with target-free micro-batches)."""
        micro = [m for sb in val for m in sb.micro_batches]
        n = self.pipeline.n_microbatches
        blank = {"input_ids": torch.zeros((1, 8), dtype=torch.long),
                 "labels": torch.full((1, 8), IGNORE_INDEX, dtype=torch.long)}
        micro += [blank] * (-len(micro) % n)
        self._scale = torch.ones((), device=self.device)
        total = torch.zeros((), device=self.device)
        for i in range(0, len(micro), n):
            total += self._run(micro[i : i + n], train=False)[0]
        return total
