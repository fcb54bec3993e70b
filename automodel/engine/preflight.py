"""Checks that need only the config and the world size: run before any rank starts, and in every rank.

Keeping them free of torch and of model building lets `launcher.nproc_per_node=N` refuse a layout or a
batch split in the launching process, with one line, instead of in N ranks at once.
"""

from __future__ import annotations

from automodel.config import TrainConfig
from automodel.errors import UserError


def micro_batch_size(t: TrainConfig, dp: int) -> int:
    """train.micro_batch_size, or (null) this rank's whole share of the global batch: no accumulation."""
    if t.micro_batch_size is not None:
        return t.micro_batch_size
    if t.global_batch_size % dp:
        raise UserError(f"train.global_batch_size={t.global_batch_size} is not divisible by the {dp} "
                        f"data-parallel ranks; pick a multiple of {dp}")
    return t.global_batch_size // dp


def accumulation_steps(t: TrainConfig, dp: int) -> int:
    micro = micro_batch_size(t, dp)
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
    return dims, micro_batch_size(checked.train, dims.dp), accumulation_steps(checked.train, dims.dp)
