"""Causal-LM loss as a token *sum*; the engine divides by the global target-token count of the step.

Summing locally and normalizing once by the global count makes the loss independent of how the global
batch is split across ranks and micro-batches (a mean per micro-batch would weight short ones up).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from automodel.batch import IGNORE_INDEX


def token_sum_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
