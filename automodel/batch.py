"""What a data plugin hands the engine for one optimizer step, and the padding collator they share."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where tensors are made: config-only commands stay fast
    import torch

IGNORE_INDEX = -100  # label value that the loss skips (prompt tokens, padding)


@dataclasses.dataclass
class StepBatch:
    """This rank's share of one global batch.

    Counts are host integers computed while collating, so the loop never has to read them back from
    the device: `num_target_tokens` feeds the global loss normalization, `num_tokens` the throughput.
    """

    micro_batches: list[dict[str, torch.Tensor]]  # each: input_ids, labels (already shifted) [, position_ids]
    num_target_tokens: int
    num_tokens: int


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int, multiple: int = 8) -> dict[str, torch.Tensor]:
    """Right-pad (input_ids, labels) pairs to the longest in the micro-batch, rounded up to `multiple`.

    Right padding under a causal mask cannot influence earlier positions, so no attention mask is needed
    and the fused causal attention kernels stay usable.
    """
    import torch

    longest = max(len(ids) for ids, _ in examples)
    width = -(-longest // multiple) * multiple
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, lab) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        labels[row, : len(lab)] = torch.tensor(lab, dtype=torch.long)
    return {"input_ids": input_ids, "labels": labels}


def step_batch(examples: list[tuple[list[int], list[int]]], micro_batch_size: int, pad_id: int) -> StepBatch:
    """Split this rank's examples for one step into micro-batches and count their tokens."""
    micro = [collate(examples[i : i + micro_batch_size], pad_id) for i in range(0, len(examples), micro_batch_size)]
    targets = sum(sum(1 for t in lab if t != IGNORE_INDEX) for _, lab in examples)
    tokens = sum(len(ids) for ids, _ in examples)
    return StepBatch(micro, targets, tokens)
