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


# ---------------------------------------------------------------- sequence packing
def pack(lengths: list[int], capacity: int) -> list[list[int]]:
    """Group example indices into rows of at most `capacity` tokens (best-fit decreasing; deterministic).

    Each row is later laid out as its examples one after another, with position_ids restarting at 0 at
    every example, so no token attends across examples (see `collate_packed`).
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: dict[int, list[int]] = {}  # free space -> rows with exactly that much room left
    for i in order:
        need = lengths[i]
        for room in range(need, capacity + 1):  # the fullest row it still fits in
            if free.get(room):
                r = free[room].pop()
                break
        else:
            rows.append([])
            r, room = len(rows) - 1, capacity
        rows[r].append(i)
        free.setdefault(room - need, []).append(r)
    for row in rows:
        row.sort()  # examples in their data-set order inside a row
    return rows


def collate_packed(rows: list[list[tuple[list[int], list[int]]]], pad_id: int, multiple: int = 8) -> dict[str, torch.Tensor]:
    """Lay out each row's examples back to back, with position_ids restarting at 0 at each example.

    transformers (v5 `create_causal_mask`) reads restarting position_ids with no attention mask as packed
    sequences: SDPA and eager attention get a block-diagonal causal mask (works on CPU), flash-attention
    takes its varlen path. Padding at the end of a row is a segment of its own, with IGNORE_INDEX labels.
    """
    import torch

    longest = max(sum(len(ids) for ids, _ in row) for row in rows)
    width = -(-longest // multiple) * multiple
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for ids, lab in row:
            n = len(ids)
            input_ids[r, at : at + n] = torch.tensor(ids, dtype=torch.long)
            labels[r, at : at + n] = torch.tensor(lab, dtype=torch.long)
            position_ids[r, at : at + n] = torch.arange(n)
            at += n
        position_ids[r, at:] = torch.arange(width - at)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


def packed_step_batch(rows: list[list[tuple[list[int], list[int]]]], micro_batch_size: int, pad_id: int) -> StepBatch:
    """Like `step_batch`, for packed rows (each a list of examples)."""
    micro = [collate_packed(rows[i : i + micro_batch_size], pad_id) for i in range(0, len(rows), micro_batch_size)]
    targets = sum(sum(1 for t in lab if t != IGNORE_INDEX) for row in rows for _, lab in row)
    tokens = sum(len(ids) for row in rows for ids, _ in row)
    return StepBatch(micro, targets, tokens)
