"""Parallel plugin `checkpointed`: one process, with activation checkpointing on the decoder blocks.

A parallel plugin decides the layout: `dims(world_size)` sizes the mesh (the engine builds the DeviceMesh
from it), `check_model` refuses model/layout combinations before any weights exist, and `apply` lays the
meta-device model out (here: wraps blocks so their activations are recomputed in backward, trading compute
for memory). `mp_policy` (the precision plugin's FSDP2 MixedPrecisionPolicy) matters only to plugins that
shard with FSDP2; one process has nothing to shard.
"""

from __future__ import annotations

import dataclasses
import logging

from automodel.distributed.parallel_dims import ParallelDims
from automodel.errors import UserError

log = logging.getLogger(__name__)


@dataclasses.dataclass
class CheckpointedConfig:
    every: int = 1  # checkpoint every n-th decoder block, from the first (1: all of them)


class Checkpointed:
    Config = CheckpointedConfig

    def __init__(self, config: CheckpointedConfig):
        if config.every < 1:
            raise UserError(f"parallel.every={config.every} must be at least 1")
        self.cfg = config

    def dims(self, world_size: int) -> ParallelDims:
        if world_size != 1:
            raise UserError(f"parallel=checkpointed runs one process but {world_size} were launched; "
                            "use parallel=fsdp2 with parallel.activation_checkpointing=full")
        return ParallelDims.infer(1)

    def check_model(self, dims: ParallelDims, hf_config) -> None:
        if not getattr(hf_config, "num_hidden_layers", 0):
            raise UserError("parallel=checkpointed needs a model with decoder blocks (num_hidden_layers)")

    def apply(self, model, mesh, dims, mp_policy):
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        from automodel.modules import decoder_layers, parent_of

        blocks = decoder_layers(model)  # found through the model's own _no_split_modules, no name switches
        chosen = blocks[:: self.cfg.every]
        for block in chosen:
            parent, name = parent_of(model, block)
            parent.register_module(name, checkpoint_wrapper(block))  # state-dict names stay the model's own
        log.info("parallel=checkpointed: activation checkpointing on %d of %d decoder blocks", len(chosen), len(blocks))
        return model
