"""Context parallel: the sequence split across cp ranks, attention over all-gathered keys and values.

torch's `context_parallel` (ring attention) has no CPU SDPA strategy, so this path works everywhere:

- the step's sequence is cut into 2 x cp chunks and rank r keeps chunks r and 2cp-1-r (causal load
  balancing: every rank gets one early and one late chunk, so equal attention work);
- position_ids are the tokens' global positions, so RoPE is unchanged;
- each attention call all-gathers K and V over the cp group (autograd-aware: backward reduce-scatters
  their gradients) and calls the model's own attention function (SDPA, eager, ...) with an explicit
  mask built from the global token indices (causal, and the sliding window where the layer has one);
- each rank's token-sum loss is summed over the cp group (autograd-aware), so every cp rank holds the
  whole sequence's loss and the engine's normalization (global target count x dp) is unchanged.
  FSDP then shards and averages over dp_shard x cp; the math: grad = (1/(dp cp)) sum_ranks cp (dp/N)
  grad(local) = grad(total)/N.

Packed sequences (position_ids that restart inside a row) are refused under cp > 1.
"""

from __future__ import annotations

import logging

import torch

from automodel.errors import UserError
from automodel.modules import hf_base

log = logging.getLogger(__name__)


class ContextParallel:
    def __init__(self, cp_mesh):
        self.mesh = cp_mesh
        self.size = cp_mesh.size()
        self.rank = cp_mesh.get_local_rank()
        self.q_index = self.k_index = None

    # ---- data ---------------------------------------------------------------------------------
    def indices(self, seq: int, rank: int) -> torch.Tensor:
        n = 2 * self.size
        c = seq // n
        return torch.cat([torch.arange(rank * c, (rank + 1) * c), torch.arange((n - 1 - rank) * c, (n - rank) * c)])

    def shard_sequence(self, inputs: dict, labels: torch.Tensor) -> tuple[dict, torch.Tensor]:
        """This rank's load-balanced part of every [batch, seq] tensor (called by the step, per micro-batch)."""
        seq = labels.shape[1]
        pos = inputs.get("position_ids")
        if pos is not None and not torch.equal(pos.expand(labels.shape[0], -1)[0].cpu(), torch.arange(seq)):
            raise UserError("parallel.cp>1 does not support packed sequences (position_ids that restart within a "
                            "row); turn packing off (data.packing=false)")
        q = self.indices(seq, self.rank).to(labels.device)
        self.q_index = q
        self.k_index = torch.cat([self.indices(seq, r) for r in range(self.size)]).to(labels.device)
        sharded = {k: (v[:, q] if v.dim() == 2 and v.shape[1] == seq else v) for k, v in inputs.items()}
        sharded["position_ids"] = q.unsqueeze(0)
        return sharded, labels[:, q]

    def reduce_loss(self, loss: torch.Tensor) -> torch.Tensor:
        import torch.distributed._functional_collectives as funcol

        if hasattr(loss, "to_local"):  # a loss_parallel loss: replicated over tp
            loss = loss.to_local()
        # all-gather (backward: reduce-scatter) and sum = an all-reduce whose backward sums gradients too
        return funcol.all_gather_single_autograd(loss.reshape(1), gather_dim=0, group=self.mesh).sum()

    # ---- attention ----------------------------------------------------------------------------
    def apply(self, model) -> None:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        base = hf_base(model)
        configs = {id(m.config): m.config for m in base.modules() if hasattr(m, "config")}
        # pipeline stages share their blocks (and those blocks' config): switched by an earlier stage already
        configs = {k: c for k, c in configs.items() if not c._attn_implementation.startswith("automodel_cp_")}
        if not configs:
            return
        originals = {c._attn_implementation for c in configs.values()}
        if len(originals) != 1:
            raise UserError(f"parallel.cp>1: the model mixes attention implementations {sorted(originals)}")
        original = originals.pop()
        if original.startswith("flash") or original == "flex_attention":
            raise UserError(f"parallel.cp>1 works with model.attn_implementation=sdpa or eager, not {original}")
        orig_fn = AttentionInterface()[original] if original != "eager" else None
        name = f"automodel_cp_{original}"
        AttentionInterface.register(name, self._attention(orig_fn))
        AttentionMaskInterface.register(name, lambda *args, **kwargs: None)  # the mask is built per call here
        for c in configs.values():
            c._attn_implementation = name
        log.info("context parallel over cp=%d: all-gather K/V around %s attention, causal load balancing",
                 self.size, original)

    def _attention(self, orig_fn):
        import torch.distributed._functional_collectives as funcol

        cp = self

        def attention(module, query, key, value, attention_mask, **kwargs):
            k = funcol.all_gather_single_autograd(key.contiguous(), gather_dim=2, group=cp.mesh)
            v = funcol.all_gather_single_autograd(value.contiguous(), gather_dim=2, group=cp.mesh)
            qi, ki = cp.q_index[:, None], cp.k_index[None, :]
            allowed = qi >= ki
            window = getattr(module, "sliding_window", None) or kwargs.get("sliding_window")
            if window:
                allowed &= (qi - ki) < window
            mask = torch.zeros(allowed.shape, dtype=query.dtype, device=query.device)
            mask = mask.masked_fill(~allowed, torch.finfo(query.dtype).min)[None, None]
            kwargs.pop("is_causal", None)
            fn = orig_fn or _eager_attention(module)
            return fn(module, query, k, v, mask, is_causal=False, **kwargs)

        return attention


def _eager_attention(module):
    """The eager attention function of the module's own modeling file (models define their own)."""
    import sys

    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if fn is None:
        raise UserError(f"parallel.cp>1: cannot find the eager attention of {type(module).__name__}; use sdpa")

    def call(module, q, k, v, mask, is_causal=False, **kwargs):
        return fn(module, q, k, v, mask, **kwargs)

    return call
