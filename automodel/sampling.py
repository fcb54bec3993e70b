"""Deterministic global-batch sampling: which examples every data-parallel rank reads at every step.

The order is a seeded permutation per epoch, consumed one whole global batch per step (an epoch's
remainder is dropped, so no batch holds an example twice). Ranks take their shares micro-batch-major
(`rank_share`): the m-th micro-batches of all dp ranks together are the m-th block of consecutive examples,
so a "global micro-batch" holds the same examples on every layout with the same micro_batch_size x dp (what
per-micro-batch statistics see, such as an MoE router's balancing loss). The position is a pure function of (seed, step), so a resumed run sees exactly the
batches it would have seen, and a 1-process run sees the same global batches as an N-rank run.
"""

from __future__ import annotations

from automodel.errors import UserError


class GlobalBatchSampler:
    def __init__(self, num_examples: int, global_batch_size: int, seed: int):
        if num_examples < global_batch_size:
            raise UserError(
                f"the data set has {num_examples} usable examples, fewer than one global batch of "
                f"{global_batch_size}; lower train.global_batch_size or add data"
            )
        self.n, self.global_batch_size, self.seed = num_examples, global_batch_size, seed
        self.steps_per_epoch = num_examples // global_batch_size
        self._epoch, self._perm = -1, None

    def _order(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            import torch

            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g).tolist()
        return self._perm

    def global_indices(self, step: int) -> list[int]:
        epoch, k = divmod(step, self.steps_per_epoch)
        return self._order(epoch)[k * self.global_batch_size : (k + 1) * self.global_batch_size]

    def rank_indices(self, step: int, dp_rank: int, dp_size: int, micro_batch_size: int | None = None) -> list[int]:
        return rank_share(self.global_indices(step), dp_rank, dp_size, micro_batch_size)


def rank_share(items: list, dp_rank: int, dp_size: int, micro_batch_size: int | None = None) -> list:
    """Rank dp_rank's share of one global batch: from each block of micro_batch_size x dp_size consecutive
    items, its micro_batch_size (None: one contiguous slice, i.e. one micro-batch per rank)."""
    per_rank = len(items) // dp_size
    micro = min(micro_batch_size or per_rank, per_rank)
    block = micro * dp_size
    return [x for start in range(0, per_rank * dp_size, block)
            for x in items[start + dp_rank * micro : start + (dp_rank + 1) * micro]]
