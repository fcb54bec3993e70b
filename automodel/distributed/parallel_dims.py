"""`ParallelDims`: the sizes of the five mesh dimensions, their inference and validation, and the mesh.

Order of the mesh (outermost first) follows torchtitan: pp, dp_replicate, dp_shard, cp, tp. tp is
innermost so its heavy collectives stay within a node; `dp` is the flattened data-parallel view
(dp_replicate x dp_shard) that data loading and the loss use.
"""

from __future__ import annotations

import dataclasses
import math

from automodel.errors import UserError

DIM_NAMES = ("pp", "dp_replicate", "dp_shard", "cp", "tp")


@dataclasses.dataclass(frozen=True)
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    cp: int
    tp: int
    pp: int
    world_size: int

    @classmethod
    def infer(cls, world_size: int, *, dp_replicate=1, dp_shard=-1, cp=1, tp=1, pp=1) -> "ParallelDims":
        """Fill the one `-1` from the world size and check that the product is the world size."""
        sizes = dict(dp_replicate=dp_replicate, dp_shard=dp_shard, cp=cp, tp=tp, pp=pp)
        for name, size in sizes.items():
            if size == 0 or size < -1:
                raise UserError(f"parallel.{name}={size}: sizes are positive integers, or -1 to infer")
        free = [n for n, s in sizes.items() if s == -1]
        if len(free) > 1:
            raise UserError(f"parallel: only one size may be -1 (inferred), got -1 for {', '.join(free)}")
        fixed = math.prod(s for s in sizes.values() if s != -1)
        layout = " x ".join(f"{n}={s}" for n, s in sizes.items() if s not in (1, -1))
        if free:
            if world_size % fixed:
                raise UserError(
                    f"parallel: world size {world_size} is not divisible by {layout or 'the fixed sizes'} "
                    f"(product {fixed}); launch a multiple of {fixed} processes or change the sizes"
                )
            sizes[free[0]] = world_size // fixed
        elif fixed != world_size:
            raise UserError(
                f"parallel: {layout} uses {fixed} processes but the world size is {world_size}; "
                f"launch {fixed} processes or set one size to -1"
            )
        return cls(world_size=world_size, **sizes)

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    def describe(self) -> str:
        parts = [f"{n}={getattr(self, n)}" for n in DIM_NAMES if getattr(self, n) > 1]
        return " x ".join(parts) or "single process"

    def build_mesh(self, device_type: str):
        """The DeviceMesh with every dimension > 1 named, plus the flattened `dp` view."""
        from torch.distributed.device_mesh import init_device_mesh

        names = [n for n in DIM_NAMES if getattr(self, n) > 1] or ["dp_shard"]
        shape = [getattr(self, n) for n in names]
        mesh = init_device_mesh(device_type, tuple(shape), mesh_dim_names=tuple(names))
        dp_names = [n for n in ("dp_replicate", "dp_shard") if n in names]
        if len(dp_names) > 1:
            mesh[tuple(dp_names)]._flatten("dp")
        return mesh

    def dp_mesh(self, mesh):
        """The 1-D mesh over data-parallel ranks (None when dp is 1): ranks that differ only in tp/cp/pp
        are not in it, they share data."""
        if self.dp_replicate > 1 and self.dp_shard > 1:
            return mesh["dp"]
        for name in ("dp_shard", "dp_replicate"):
            if getattr(self, name) > 1:
                return mesh[name]
        return None

    def dp_coordinate(self, mesh) -> tuple[int, int]:
        """(this rank's data-parallel index, dp size)."""
        dp = self.dp_mesh(mesh)
        return (dp.get_local_rank(), self.dp) if dp is not None else (0, 1)


@dataclasses.dataclass(frozen=True)
class ParallelHints:
    """What the training step must do for a layout, told by the parallel plugin (`hints(dims)`).

    global_position_ids: pass `position_ids` 0..S-1 when the batch has none (HF derives positions and masks
        from the local sequence length under sequence/context parallel).
    seq_multiple: right-pad every micro-batch to a multiple of this (labels ignored there) so the sequence
        splits evenly across tp (with SP) x cp ranks.
    loss_context: a zero-argument callable returning the context the loss and its backward run under
        (e.g. `loss_parallel` for vocab-sharded logits), or None.
    """

    global_position_ids: bool = False
    seq_multiple: int = 1
    seq_multiple_reason: str = ""  # e.g. "tp=2 (sequence parallel)", for the refusal of train.seq_len
    loss_context: object = None
    shard_sequence: object = None  # (inputs, labels) -> this rank's part of the sequence (context parallel)
    reduce_loss: object = None  # token-sum loss -> summed over the ranks that split the sequence (autograd-aware)
    pipeline: bool = False  # the step runs through the parallel plugin's `pipeline(...)` schedule
    packing_refused_by: str = ""  # e.g. "parallel.pp>1": the layout cannot train packed rows (checked up front)
    min_microbatches: int = 1  # micro-batches per step the layout needs (a pipeline schedule's)
    min_microbatches_reason: str = ""
