"""Validation every train.val_every steps: the mean token loss over the held-out data, as `val_loss`.

The data plugin's optional `val_batches(tokenizer, *, seq_len, dp_rank, dp_size, micro_batch_size)` returns
this rank's share of the held-out data as a list of StepBatch (every rank the same number of forward
passes, so sharded layouts stay in step), or None when the data has no held-out part. The loss is summed
over tokens on each rank and divided by the global target count (one all-reduce), like the training loss.
"""

from __future__ import annotations

import contextlib

from automodel.errors import UserError


def batches(data, tokenizer, t, dp_rank: int, dp_size: int, micro_batch_size: int):
    """The held-out StepBatches for this rank, or None when validation is off."""
    if not t.val_every:
        return None
    val = data.val_batches(tokenizer, seq_len=t.seq_len, dp_rank=dp_rank, dp_size=dp_size,
                           micro_batch_size=micro_batch_size) if hasattr(data, "val_batches") else None
    if not val:
        raise UserError(f"train.val_every={t.val_every} but the data has no validation set; set data.val_path, "
                        f"data.val_split or data.val_size (or train.val_every=0)")
    return val


def evaluator(step_runner, val):
    """() -> val_loss (a float, the same on every rank), or None when validation is off."""
    if val is None:
        return None
    return lambda: evaluate(step_runner, val)


def evaluate(s, val) -> float:
    import torch
    import torch.distributed as dist

    from automodel.engine import loop
    from automodel.loss import token_sum_cross_entropy

    hints = getattr(s, "hints", None)
    prepare = getattr(loop, "_for_layout", None)
    was_training = s.model.training
    s.model.eval()
    loss_sum = torch.zeros((), device=s.device)
    count = 0
    try:
        with torch.no_grad():
            for sb in val:
                count += sb.num_target_tokens
                for micro in sb.micro_batches:
                    inputs = {k: v.to(s.device) for k, v in micro.items() if k != "labels"}
                    labels = micro["labels"].to(s.device)
                    if prepare is not None and hints is not None:
                        inputs, labels = prepare(inputs, labels, hints)
                    with s.autocast():
                        logits = s.model(**inputs).logits
                    ctx = hints.loss_context() if getattr(hints, "loss_context", None) else contextlib.nullcontext()
                    with ctx:
                        loss = token_sum_cross_entropy(logits, labels)
                        if getattr(hints, "reduce_loss", None):  # context parallel: sum over the sequence split
                            loss = hints.reduce_loss(loss)
                    loss_sum += (loss.full_tensor() if hasattr(loss, "full_tensor") else loss).float()
    finally:
        s.model.train(was_training)
    stats = torch.stack([loss_sum, torch.tensor(float(count), device=s.device)])
    if s.dp_size > 1:
        dist.all_reduce(stats, group=s.dp_group)
    total, n = stats.tolist()
    return total / max(n, 1.0)
