"""Checks that need only the config and the world size: run before any rank starts, and in every rank.

Keeping them free of torch and of model building lets `launcher.nproc_per_node=N` refuse a layout or a
batch split in the launching process, with one line, instead of in N ranks at once.
"""

from __future__ import annotations

from automodel.config import TrainConfig
from automodel.errors import UserError


def micro_batch_size(t: TrainConfig, dp: int, pp: int = 1) -> int:
    """train.micro_batch_size, or (null) this rank's whole share of the global batch: no accumulation.
    Under pipeline parallel (pp > 1) null splits the share into pp micro-batches, one per stage in flight."""
    if t.micro_batch_size is not None:
        return t.micro_batch_size
    if t.global_batch_size % (dp * pp):
        what = f"the {dp} data-parallel ranks" + (f" x {pp} pipeline micro-batches" if pp > 1 else "")
        how = " (or set train.micro_batch_size)" if pp > 1 else ""
        raise UserError(f"train.global_batch_size={t.global_batch_size} is not divisible by {what}; pick a multiple "
                        f"of {dp * pp}{how}")
    return t.global_batch_size // (dp * pp)


def accumulation_steps(t: TrainConfig, dp: int, pp: int = 1) -> int:
    micro = micro_batch_size(t, dp, pp)
    per_step = micro * dp
    if t.global_batch_size % per_step:
        raise UserError(
            f"train.global_batch_size={t.global_batch_size} is not divisible by train.micro_batch_size="
            f"{micro} x {dp} data-parallel rank(s) = {per_step}; pick a multiple of {per_step}"
        )
    return t.global_batch_size // per_step


def preflight(checked, world_size: int):
    """(ParallelDims, micro-batch size, accumulation steps) for this world size, or a UserError."""
    dims = checked.plugins["parallel"].dims(world_size)
    t = checked.train
    return dims, micro_batch_size(t, dims.dp, dims.pp), accumulation_steps(t, dims.dp, dims.pp)
