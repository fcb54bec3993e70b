"""Validation every train.val_every steps: the mean token loss over the held-out data, as `val_loss`.

The data plugin's optional `val_batches(tokenizer, *, seq_len, dp_rank, dp_size, micro_batch_size)` returns
this rank's share of the held-out data as a list of StepBatch (every rank the same number of forward
passes, so sharded layouts stay in step), or None when the data has no held-out part. The loss is summed
over tokens on each rank and divided by the global target count (one all-reduce), like the training loss.
"""

from __future__ import annotations

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

    was_training = s.model.training
    s.model.eval()
    try:
        with torch.no_grad():
            loss_sum = s.eval_loss_sum(val)
    finally:
        s.model.train(was_training)
    count = sum(sb.num_target_tokens for sb in val)
    stats = torch.stack([loss_sum.float(), torch.tensor(float(count), device=s.device)])
    if s.dp_size > 1:
        dist.all_reduce(stats, group=s.dp_group)
    total, n = stats.tolist()
    return total / max(n, 1.0)
