"""Deterministic global-batch sampling: which examples every data-parallel rank reads at every step.

The order is a seeded permutation per epoch, consumed one whole global batch per step (an epoch's
remainder is dropped, so no batch holds an example twice); rank r of dp takes the r-th contiguous slice. The position is a pure function of (seed, step), so a resumed run sees exactly the
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

    def rank_indices(self, step: int, dp_rank: int, dp_size: int) -> list[int]:
        per_rank = self.global_batch_size // dp_size
        return self.global_indices(step)[dp_rank * per_rank : (dp_rank + 1) * per_rank]
