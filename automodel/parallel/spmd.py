"""Parallel plugin `spmd`: DTensor SPMD layouts on a named DeviceMesh.

One plugin serves every preset in conf/parallel/ (fsdp2, fsdp2_tp, ...): the presets differ only in
sizes, and the order the layers are applied in is fixed here, once:

    TP/SP -> CP -> activation checkpointing -> torch.compile -> FSDP2/HSDP

This version implements FSDP2 (and HSDP when dp_replicate > 1): `fully_shard` on every decoder layer,
then on the root, so each layer's parameters are all-gathered just before it runs and freed after.
"""

from __future__ import annotations

import dataclasses
import logging

from automodel.distributed.parallel_dims import ParallelDims
from automodel.errors import UserError
from automodel.modules import decoder_layers

log = logging.getLogger(__name__)


@dataclasses.dataclass
class SPMDConfig:
    dp_replicate: int = 1
    dp_shard: int = -1  # -1: whatever the world size leaves
    tp: int = 1
    cp: int = 1
    pp: int = 1
    sequence_parallel: bool = True  # with tp > 1
    reshard_after_forward: bool = True  # ZeRO-3 style; false keeps layers gathered from forward to backward


class SPMDParallel:
    Config = SPMDConfig

    def __init__(self, config: SPMDConfig):
        self.cfg = config

    def dims(self, world_size: int) -> ParallelDims:
        c = self.cfg
        dims = ParallelDims.infer(world_size, dp_replicate=c.dp_replicate, dp_shard=c.dp_shard, cp=c.cp, tp=c.tp, pp=c.pp)
        unsupported = [f"{n}={getattr(dims, n)}" for n in ("tp", "cp", "pp") if getattr(dims, n) > 1]
        if unsupported:
            raise UserError(
                f"parallel: {', '.join(unsupported)} is not available in this version (FSDP2 and HSDP are); "
                "use parallel=fsdp2"
            )
        return dims

    def check_model(self, dims: ParallelDims, hf_config) -> None:
        layers = getattr(hf_config, "num_hidden_layers", None)
        if dims.pp > 1 and layers is not None and layers < dims.pp:
            raise UserError(f"parallel.pp={dims.pp} needs at least {dims.pp} layers; the model has {layers}")

    def apply(self, model, mesh, dims: ParallelDims, mp_policy):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        fsdp_names = tuple(n for n in ("dp_replicate", "dp_shard") if getattr(dims, n) > 1) or ("dp_shard",)
        fsdp_mesh = mesh[fsdp_names]
        kwargs = {"mesh": fsdp_mesh, "mp_policy": mp_policy or MixedPrecisionPolicy()}
        layers = decoder_layers(model)
        for i, layer in enumerate(layers):
            # The last layer's parameters are needed again first in backward: keeping them saves a gather.
            reshard = self.cfg.reshard_after_forward and i < len(layers) - 1
            fully_shard(layer, reshard_after_forward=reshard, **kwargs)
        fully_shard(model, reshard_after_forward=self.cfg.reshard_after_forward, **kwargs)
        log.info("FSDP2 over %s: %d decoder layers + root", "x".join(fsdp_names), len(layers))
        return model
