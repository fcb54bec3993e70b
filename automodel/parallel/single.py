"""Parallel plugin `none`: one process, the model as it is."""

from __future__ import annotations

import dataclasses

from automodel.distributed.parallel_dims import ParallelDims
from automodel.errors import UserError


@dataclasses.dataclass
class SingleConfig:
    pass


class SingleProcess:
    Config = SingleConfig

    def __init__(self, config: SingleConfig):
        self.cfg = config

    def dims(self, world_size: int) -> ParallelDims:
        if world_size != 1:
            raise UserError(
                f"parallel=none runs one process but {world_size} were launched; use parallel=fsdp2 (or another layout)"
            )
        return ParallelDims.infer(1)

    def check_model(self, dims, hf_config) -> None:
        pass

    def apply(self, model, mesh, dims, mp_policy):
        return model
