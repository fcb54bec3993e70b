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
        raise _no_validation(data, t.val_every)
    return val


def _no_validation(data, val_every: int) -> UserError:
    """What to set: the held-out keys the data plugin's config has (the built-in plugins' val_path, val_split,
    val_size); a third-party plugin without them is named as offering no validation set."""
    import dataclasses

    config = getattr(type(data), "Config", None)
    fields = {f.name for f in dataclasses.fields(config)} if dataclasses.is_dataclass(config) else set()
    keys = [f"data.{k}" for k in ("val_path", "val_split", "val_size") if k in fields]
    if keys:
        which = keys[0] if len(keys) == 1 else f"{', '.join(keys[:-1])} or {keys[-1]}"
        return UserError(f"train.val_every={val_every} but the data has no validation set; set {which} "
                         f"(or train.val_every=0)")
    plugin = type(data).__name__
    if not hasattr(data, "val_batches"):
        return UserError(f"train.val_every={val_every} but the data plugin ({plugin}) offers no validation "
                         f"(it has no `val_batches`); set train.val_every=0")
    return UserError(f"train.val_every={val_every} but the data plugin ({plugin}) gave no validation set "
                     f"(`val_batches` returned none); enable its held-out data (see its options) or set "
                     f"train.val_every=0")


def periodic(step_runner, val, every: int) -> list:
    """run_loop's (every, step -> {"val_loss": the same float on every rank}) pair; none when validation is off."""
    if val is None:
        return []
    return [(every, lambda step: {"val_loss": evaluate(step_runner, val)})]


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
