"""One optimizer step, and the loop around it.

The step touches the host only through the data it is handed: token counts come from the collator as
Python ints, the loss and grad-norm stay on the device, and the loop reads them back (one collective,
one sync) only on the steps it logs.

Loss normalization: each rank's micro-batch loss is a token *sum* divided by the number of target tokens
in the whole global batch (all ranks, all micro-batches), then multiplied by the dp size because
data-parallel gradient reduction averages over ranks. The resulting gradient is exactly that of the mean
token loss over the global batch, however it is split.

Auxiliary objectives inside the model (a mixture-of-experts model's router losses, `router`: see
automodel/moe/router.py) add their own gradients during backward; the step only tells them which rows of each
micro-batch are real and how backward is scaled, and adds their value to the logged loss.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time

import torch
import torch.distributed as dist

from automodel.batch import IGNORE_INDEX, StepBatch
from automodel.distributed.grad_norm import clip_grad_norm
from automodel.distributed.parallel_dims import ParallelHints


@dataclasses.dataclass
class StepRunner:
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    autocast: object  # () -> context manager
    device: torch.device
    max_grad_norm: float
    dp_group: object = None  # process group over data-parallel ranks (None: dp size 1)
    dp_size: int = 1
    hints: ParallelHints = dataclasses.field(default_factory=ParallelHints)  # what the layout needs of the step
    router: object = None  # automodel.moe.router.RouterLosses of an MoE model, else None
    guard: object = None  # automodel.engine.step_guard.StepGuard: which steps may reach the weights
    loss: object = None  # the loss plugin (protocols.LossPlugin): required
    teacher: object = None  # automodel.engine.teacher.Teacher when distilling, else None
    loss_scale: object = None  # automodel.loss_scale.DynamicLossScale under fp16 (the guard owns its decisions)
    parts: dict = dataclasses.field(default_factory=dict)  # the last step's loss components (local shares), logged
    lr: float = 0.0
    step: int = 0  # the step being run (the loop sets it; the guard names it)
    skipped: str | None = None  # why the last step was not applied, or None

    def __post_init__(self):
        if self.loss is None:
            raise TypeError("StepRunner needs loss=<a loss plugin>, e.g. automodel.losses.ce.CrossEntropy")

    def _global_count(self, local: int) -> torch.Tensor:
        count = torch.tensor(float(local), device=self.device)
        if self.dp_size > 1:
            dist.all_reduce(count, group=self.dp_group)
        return count

    def __call__(self, batch: StepBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Run forward/backward over this rank's micro-batches and step; return (local loss share, grad norm)."""
        scale = self.dp_size / self._global_count(batch.num_target_tokens).clamp(min=1.0)
        backward_scale = scale * self._loss_scale()
        loss_sum = torch.zeros((), device=self.device)
        ce_sum = kd_sum = torch.zeros((), device=self.device) if self.teacher is not None else None
        if self.router is not None:
            self.router.begin_step(len(batch.micro_batches), self._loss_scale())
        for micro in batch.micro_batches:
            # every key but labels is a model input (input_ids, and e.g. position_ids for packed rows)
            inputs = {k: v.to(self.device, non_blocking=True) for k, v in micro.items() if k != "labels"}
            labels = micro["labels"].to(self.device, non_blocking=True)
            inputs, labels, rows = _for_layout(inputs, labels, self.hints)
            if self.router is not None:
                self.router.add_rows(rows)
            taught = self.teacher.logits(inputs) if self.teacher is not None else None
            with self.autocast(), self._targets(labels, taught):
                logits = self.model(**inputs).logits
            with self.hints.loss_context() if self.hints.loss_context else contextlib.nullcontext():
                loss = self.token_loss(logits, labels)
                if taught is not None:  # the objective trained: the blend; its parts are logged beside it
                    if self.teacher.in_head:  # the loss plugin blended them chunk by chunk
                        ce, kd = (self._reduce(part) for part in self.loss.distill_parts())
                    else:
                        ce, kd = loss, self._reduce(self.teacher.token_loss(logits, taught, labels))
                        loss = (1 - self.teacher.kd_ratio) * loss + self.teacher.kd_ratio * kd
                    ce_sum, kd_sum = ce_sum + _full(ce.detach()), kd_sum + _full(kd.detach())
                (loss * backward_scale).backward()
            loss_sum += _full(loss.detach())
        share = loss_sum * (scale / self.dp_size)
        if self.teacher is not None:
            self.parts = {"ce_loss": ce_sum * (scale / self.dp_size), "kd_loss": kd_sum * (scale / self.dp_size)}
        if self.router is not None:  # the same on every data-parallel rank: each logs its 1/dp
            share = share + self.router.weighted_step_value().to(share) / self.dp_size
        grad_norm = self.clip_and_step(loss_share=share)
        return share, grad_norm

    def token_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The token-sum loss of one micro-batch, summed over the ranks that split its sequence (CP)."""
        return self._reduce(self.loss.token_loss(logits, labels))

    def _reduce(self, loss: torch.Tensor) -> torch.Tensor:
        """A token-sum summed over the ranks that split the sequence (CP), where the layout does."""
        return self.hints.reduce_loss(loss) if self.hints.reduce_loss else loss

    def _loss_scale(self) -> float:
        """The fp16 loss scale backward runs at (1 without one); clip_and_step divides the gradients by it."""
        return self.loss_scale.value if self.loss_scale is not None else 1.0

    def _targets(self, labels: torch.Tensor, taught: torch.Tensor | None = None):
        """The loss plugin's context for a forward pass (its head may compute the loss of `labels`, and distill
        from the teacher's output `taught` there)."""
        if taught is not None and self.teacher.in_head:
            return self.loss.targets(labels, self.teacher.chunks(taught))
        return self.loss.targets(labels)

    def clip_and_step(self, across=None, loss_share=None) -> torch.Tensor:
        """Clip (the norm over `across` too: pipeline stages), then step optimizer and schedule unless the
        guard refuses the step (a non-finite norm or loss, a spike); the grad norm. With max_grad_norm=0 the
        norm is still taken (a NaN must be seen), only not clipped to."""
        if self.loss_scale is not None:
            self.loss_scale.unscale_(self._params())
        grad_norm = clip_grad_norm(self._params(), self.max_grad_norm if self.max_grad_norm > 0 else math.inf,
                                   across=across)
        self.lr = self.optimizer.param_groups[0]["lr"]  # the LR this step used (a Python float)
        self.skipped = None
        if self.guard is not None:
            share = loss_share if loss_share is not None else torch.zeros((), device=self.device)
            self.skipped = self.guard.judge(self.step, share, grad_norm, self.dp_group, self.dp_size)
        if self.skipped is None:
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.router is not None:
            self.router.end_step(applied=self.skipped is None)
        return grad_norm

    def _params(self):
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def eval_loss_sum(self, val: list[StepBatch]) -> torch.Tensor:
        """The token-loss sum over this rank's share of the held-out batches (no gradients)."""
        loss_sum = torch.zeros((), device=self.device)
        for sb in val:
            for micro in sb.micro_batches:
                inputs = {k: v.to(self.device) for k, v in micro.items() if k != "labels"}
                labels = micro["labels"].to(self.device)
                inputs, labels, _ = _for_layout(inputs, labels, self.hints)
                with self.autocast(), self._targets(labels):
                    logits = self.model(**inputs).logits
                with self.hints.loss_context() if self.hints.loss_context else contextlib.nullcontext():
                    loss = self.token_loss(logits, labels)
                loss_sum += _full(loss).float()
        return loss_sum


def _for_layout(inputs: dict, labels: torch.Tensor, hints: ParallelHints) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Right-pad to the layout's sequence multiple (padding is ignored by the loss) and add global
    position ids where the layout needs them (sequence/context parallel). Also the rows' real positions
    ([batch, seq] bool, laid out like the labels; see automodel.moe.router.valid_rows)."""
    from automodel.moe.router import valid_rows

    pad = -labels.shape[1] % hints.seq_multiple
    if pad:
        # per-token tensors ([batch, seq], as the labels) only: an image-text model's pixel tensors keep their shape
        inputs = {k: torch.nn.functional.pad(v, (0, pad)) if v.shape[:2] == labels.shape else v
                  for k, v in inputs.items()}
        labels = torch.nn.functional.pad(labels, (0, pad), value=IGNORE_INDEX)
    if hints.global_position_ids and "position_ids" not in inputs:
        inputs["position_ids"] = torch.arange(labels.shape[1], device=labels.device).unsqueeze(0)
    rows = valid_rows(labels, IGNORE_INDEX)
    if hints.shard_sequence:
        inputs, labels = hints.shard_sequence({**inputs, "_rows": rows}, labels)
        rows = inputs.pop("_rows")
    return inputs, labels, rows


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def run_loop(step_fn: StepRunner, batches, max_steps: int, log_every: int, on_step, on_log,
             start_step: int = 0, periodic=(), stop=None) -> list[dict]:
    """Train steps start_step+1 .. max_steps; call on_step(step) after each and on_log(record) every
    `log_every` (and the last). A resumed run passes the checkpoint's step as start_step. `stop(step)`,
    asked after on_step, ends the loop early when it returns True (a preemption). `periodic`: (every, fn)
    pairs, e.g. validation; fn(step) -> a dict merged into that step's record, called (collectively) every
    `every` steps and at the last."""
    records = []
    tokens_since = 0
    t_last = time.perf_counter()
    for step in range(start_step + 1, max_steps + 1):
        batch = next(batches)
        step_fn.step = step
        loss_share, grad_norm = step_fn(batch)
        tokens_since += batch.num_tokens
        due = [fn for every, fn in periodic if step % every == 0 or step == max_steps]
        skipped = getattr(step_fn, "skipped", None)
        if step % log_every == 0 or step == max_steps or due or skipped:
            parts = getattr(step_fn, "parts", {})  # loss components (the CE and KD of a distilled run)
            stats = torch.stack([loss_share.float(), torch.tensor(float(tokens_since), device=loss_share.device),
                                 *(v.float() for v in parts.values())])
            if step_fn.dp_size > 1:
                dist.all_reduce(stats, group=step_fn.dp_group)
            loss, tokens, *part_values = stats.tolist()  # the one host sync of a logged step
            now = time.perf_counter()
            record = {
                "step": step, "loss": loss, "lr": step_fn.lr,
                "grad_norm": float(_full(grad_norm)), "tokens_per_s": tokens / max(now - t_last, 1e-9),
                "tokens": int(tokens), **dict(zip(parts, part_values)),
            }
            if step_fn.router is not None:
                record.update(step_fn.router.log_values(across=getattr(step_fn, "pp_group", None)))
            if skipped:
                record["skipped"] = skipped
            if getattr(step_fn, "loss_scale", None) is not None:
                record["loss_scale"] = step_fn.loss_scale.value
            for fn in due:  # collective: every rank takes part
                record.update(fn(step))
            records.append(record)
            on_log(record)
            tokens_since, t_last = 0, time.perf_counter() if due else now  # evaluation time is not training time
        if step_fn.guard is not None:
            step_fn.guard.check()  # every rank at the same step: the decision was global
        on_step(step)
        if stop is not None and stop(step):
            break
    return records
