"""Activation checkpointing and torch.compile, applied per decoder block.

- `full`: every block's activations are recomputed in backward (torch's non-reentrant checkpoint).
- `selective`: op-level selective checkpointing: the outputs of matmuls and attention are saved, the
  cheap element-wise ops between them are recomputed (torchtitan's "selective op" policy).
- compile: `module.compile()` on every block, in place, so FSDP2 can still wrap the block afterwards.

Each wrapper replaces the block in its parent container; the returned list is the blocks FSDP wraps.
"""

from __future__ import annotations

import logging

from torch import nn

from automodel.errors import UserError
from automodel.modules import parent_of

log = logging.getLogger(__name__)

AC_MODES = ("none", "full", "selective")


def _save_matmuls_policy():
    import torch
    from torch.utils.checkpoint import CheckpointPolicy

    aten = torch.ops.aten
    save = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.linear.default,
            aten._scaled_dot_product_flash_attention.default, aten._scaled_dot_product_efficient_attention.default,
            aten._scaled_dot_product_flash_attention_for_cpu.default}

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in save else CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def apply_activation_checkpointing(model: nn.Module, blocks: list[nn.Module], mode: str) -> list[nn.Module]:
    if mode not in AC_MODES:
        raise UserError(f"parallel.activation_checkpointing={mode!r}: choose one of {', '.join(AC_MODES)}")
    if mode == "none":
        return blocks
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    kwargs = {}
    if mode == "selective":
        import functools

        from torch.utils.checkpoint import create_selective_checkpoint_contexts

        kwargs["context_fn"] = functools.partial(create_selective_checkpoint_contexts, _save_matmuls_policy())
    wrapped = []
    for block in blocks:
        parent, name = parent_of(model, block)
        w = checkpoint_wrapper(block, preserve_rng_state=False, **kwargs)
        parent.register_module(name, w)
        wrapped.append(w)
    log.info("activation checkpointing (%s) on %d blocks", mode, len(wrapped))
    return wrapped


def compile_blocks(blocks: list[nn.Module]) -> list[nn.Module]:
    """`module.compile()` on every block, each call traced with side effects kept out of the recompute.

    A checkpointed block is one checkpoint region in Dynamo's graph, and Dynamo refuses a region whose forward
    changes Python state outside it: it then runs the whole block eagerly, without a word (fullgraph=False).
    transformers 5 does that in every attention forward (the `kernels` package sets and resets a context
    variable), so `parallel.compile=true` with activation checkpointing compiled nothing. That state is
    bookkeeping to do once per forward, not again in the backward's recompute, which is what this Dynamo
    setting says; it applies to these blocks' calls only, not to the process."""
    import torch._dynamo.config

    side_effects = "skip_fwd_side_effects_in_bwd_under_checkpoint"
    for block in blocks:
        block.compile(fullgraph=False)
        if hasattr(torch._dynamo.config, side_effects):  # torch >= 2.5
            patch = torch._dynamo.config.patch(**{side_effects: True})
            block._compiled_call_impl = patch(block._compiled_call_impl)
    log.info("torch.compile on %d blocks", len(blocks))
    return blocks
