"""`ParallelDims`: the sizes of the mesh dimensions, their inference and validation, and the mesh.

Order of the mesh (outermost first) follows torchtitan: pp, dp_replicate, dp_shard, cp, tp. tp is
innermost so its heavy collectives stay within a node; `dp` is the flattened data-parallel view
(dp_replicate x dp_shard) that data loading and the loss use.

Expert parallel (`ep`) uses no ranks of its own: it is carved out of dp_shard, as torchtitan does. With
ep > 1 the mesh holds dp_shard as two dimensions, `dp_shard_mod_ep` x `ep` (flattened back into
`dp_shard` for everything that is not an expert). Experts are split over `ep`; FSDP shards each rank's
experts over what remains of the data-parallel ranks (`expert_fsdp_names`).
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
    ep: int = 1  # expert parallel: a divisor of dp_shard (its ranks), not a dimension of the world

    @classmethod
    def infer(cls, world_size: int, *, dp_replicate=1, dp_shard=-1, cp=1, tp=1, pp=1, ep=1) -> "ParallelDims":
        """Fill the one `-1` from the world size and check that the product is the world size; ep must
        divide dp_shard."""
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
        if ep < 1:
            raise UserError(f"parallel.ep={ep}: the expert-parallel size is a positive integer (1: off)")
        if sizes["dp_shard"] % ep:
            raise UserError(
                f"parallel.ep={ep} does not divide dp_shard={sizes['dp_shard']} (world {world_size} with "
                f"{layout or 'no other sizes'}): expert parallel is carved out of the dp_shard ranks; pick an ep "
                f"that divides {sizes['dp_shard']}, or launch a multiple of {ep} x the other sizes")
        return cls(world_size=world_size, ep=ep, **sizes)

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    def describe(self) -> str:
        parts = [f"{n}={getattr(self, n)}" for n in DIM_NAMES if getattr(self, n) > 1]
        if self.ep > 1:
            parts.append(f"ep={self.ep} (of dp_shard)")
        return " x ".join(parts) or "single process"

    def build_mesh(self, device_type: str):
        """The DeviceMesh with every dimension > 1 named, plus the flattened views the layouts use: `dp`
        (dp_replicate x dp_shard); under ep > 1 also `dp_shard` itself (dp_shard_mod_ep x ep), and
        `dp_shard_cp` / `expert_fsdp` when cp > 1 (flattened from the base dimensions: a flattened
        dimension cannot be flattened again)."""
        import warnings

        from torch.distributed.device_mesh import init_device_mesh

        base = [n for n in DIM_NAMES if getattr(self, n) > 1] or ["dp_shard"]
        if self.ep > 1:  # dp_shard as dp_shard_mod_ep x ep (both kept even when one is 1), ep after cp:
            at = base.index("dp_shard")  # the experts' FSDP dimensions (dp_shard_mod_ep, cp) then precede ep
            data = ["dp_shard_mod_ep", *(["cp"] if self.cp > 1 else []), "ep"]
            base = base[:at] + data + [n for n in base[at + 1 :] if n != "cp"]
        size = {"dp_shard_mod_ep": self.dp_shard // self.ep, **{n: getattr(self, n) for n in (*DIM_NAMES, "ep")}}
        mesh = init_device_mesh(device_type, tuple(size[n] for n in base), mesh_dim_names=tuple(base))

        def flatten(names, as_name):
            mesh[tuple(sorted(names, key=base.index))]._flatten(as_name)

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*flattened dim.*")
            shard = ["dp_shard_mod_ep", "ep"] if self.ep > 1 else (["dp_shard"] if "dp_shard" in base else [])
            if self.ep > 1:
                flatten(shard, "dp_shard")
                if self.cp > 1:
                    flatten([*shard, "cp"], "dp_shard_cp")
                    flatten(["dp_shard_mod_ep", "cp"], "expert_fsdp")
            dp_names = (["dp_replicate"] if "dp_replicate" in base else []) + shard
            if len(dp_names) > 1:
                flatten(dp_names, "dp")
            if dp_names and self.cp > 1:
                flatten([*dp_names, "cp"], "dp_cp")
        return mesh

    def token_mesh(self, mesh):
        """The 1-D mesh over the ranks that see different tokens of the same layers (data x context parallel;
        None when there is one such rank): statistics over a global batch are summed over it."""
        if self.cp > 1:
            return mesh["dp_cp"] if self.dp > 1 else mesh["cp"]
        return self.dp_mesh(mesh)

    def expert_fsdp_names(self) -> tuple[str, ...]:
        """The mesh dimensions FSDP shards expert parameters over under ep > 1: the data-parallel ranks
        that hold the same experts (dp_replicate for HSDP, then dp_shard / ep, times cp)."""
        shard = "expert_fsdp" if self.cp > 1 else "dp_shard_mod_ep"
        return (("dp_replicate",) if self.dp_replicate > 1 else ()) + (shard,)

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
    recompute: str = ""  # e.g. "parallel.activation_checkpointing=full": blocks run their forward again in backward
