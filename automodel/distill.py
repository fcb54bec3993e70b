"""Knowledge distillation's loss term: KL(teacher || student) over target tokens, as a token *sum* (the engine
normalizes it by the global target count, like the cross-entropy).

Both distributions are softened by the temperature T and the sum is scaled by T^2, so the term's gradients keep
their size as T changes (Hinton et al., 2015). It is a true KL (the teacher's entropy included), so a teacher
equal to the student gives exactly 0. The fp32 softmaxes are taken a chunk of tokens at a time and recomputed in
backward, so beyond the two logits tensors themselves nothing `[tokens, vocab]` is held.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from automodel.batch import IGNORE_INDEX
from automodel.head_loss import chunk_tokens


def _log_softmax(x: torch.Tensor) -> torch.Tensor:
    """log_softmax from max, exp and sum. Not F.log_softmax: under tensor parallelism's `loss_parallel` (vocab-
    sharded logits) its backward is overridden to be fused with nll_loss's, which gives wrong gradients for
    any other use; these plain ops are exact on vocab-sharded DTensors and on ordinary tensors alike."""
    shifted = x - x.detach().amax(dim=-1, keepdim=True)
    return shifted - shifted.exp().sum(dim=-1, keepdim=True).log()


def _kl_rows(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, temperature: float) -> torch.Tensor:
    log_s = _log_softmax(student.float() / temperature)
    log_t = _log_softmax(teacher.float() / temperature)
    per_row = (log_t.exp() * (log_t - log_s)).sum(-1)
    if hasattr(per_row, "device_mesh"):  # vocab-sharded logits (tp loss_parallel): a partial sum per rank
        from torch.distributed.tensor import DTensor, Replicate

        mask = DTensor.from_local(mask, per_row.device_mesh, [Replicate()] * per_row.device_mesh.ndim, run_check=False)
    return (per_row * mask).sum()


def token_sum_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                 temperature: float = 1.0) -> torch.Tensor:
    vocab = student_logits.shape[-1]
    s = student_logits.reshape(-1, vocab)
    t = teacher_logits.reshape(-1, vocab).detach()
    mask = (labels.reshape(-1) != IGNORE_INDEX).to(torch.float32)
    rows = chunk_tokens(vocab, None)
    total = None
    for start in range(0, s.shape[0], rows):
        part = slice(start, start + rows)
        if torch.is_grad_enabled() and s.requires_grad:
            value = checkpoint(_kl_rows, s[part], t[part], mask[part], temperature, use_reentrant=False)
        else:
            value = _kl_rows(s[part], t[part], mask[part], temperature)
        total = value if total is None else total + value
    return total * (temperature * temperature)
