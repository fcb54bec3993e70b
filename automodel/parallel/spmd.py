"""Parallel plugin `spmd`: DTensor SPMD layouts on a named DeviceMesh.

One plugin serves every preset in conf/parallel/ (fsdp2, hsdp, tp, fsdp2_tp, ...): the presets differ
only in sizes. The order the layers are applied in is fixed here, once (torchtitan's order):

    EP -> TP/SP -> CP -> activation checkpointing -> torch.compile -> FSDP2/HSDP

- TP/SP: tensor_parallel.py, from the HF model's own tensor-parallel plan.
- activation checkpointing and compile: activation_checkpoint.py, per decoder block.
- FSDP2: `fully_shard` on every decoder block, then on the root, over the data-parallel mesh
  (dp_shard, or dp_replicate x dp_shard = HSDP); the precision plugin's MixedPrecisionPolicy applies.
- CP: context_parallel.py, all-gathered K/V with causal load balancing (every device, CPU included).
  FSDP then shards over dp_shard x cp (the cp ranks' gradients are summed through it).
- EP: automodel/moe/expert_parallel.py, before everything else (on the meta model): every MoE layer's
  experts split over `ep` (carved out of dp_shard), tokens exchanged by all-to-all. FSDP then shards each
  rank's experts over the data-parallel ranks holding the same experts (gradients scaled so that one
  process and N ranks compute the same update).
- PP: pipeline.py. The model is first cut into this rank's stages (gpipe, 1f1b, or interleaved_1f1b
  with several stages per rank); every stage then gets the order above (TP -> ... -> FSDP, the stage
  as FSDP's root). The engine runs the step through `pipeline(...)`'s schedule. At set-up (`check_model`) a
  small twin of the model, cut by the same code, must compute the whole model's logits, or pp is refused.
"""

from __future__ import annotations

import dataclasses
import logging

from automodel.distributed.parallel_dims import ParallelDims, ParallelHints
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
    ep: int = 1  # expert parallel (MoE models): experts split over this many of the dp_shard ranks
    sequence_parallel: bool = True  # with tp > 1: norms and the residual stream split along the sequence
    loss_parallel: bool = False  # with tp > 1: vocab-sharded logits, the loss computed without gathering them
    activation_checkpointing: str = "none"  # none | full | selective (per decoder block)
    compile: bool = False  # torch.compile each decoder block
    reshard_after_forward: bool = True  # ZeRO-3 style; false keeps layers gathered from forward to backward
    pp_schedule: str = "1f1b"  # with pp > 1: gpipe | 1f1b | interleaved_1f1b
    pp_virtual_stages: int = 1  # stages per rank (interleaved_1f1b: 2 or more)


class SPMDParallel:
    Config = SPMDConfig

    def __init__(self, config: SPMDConfig):
        self.cfg = config
        from automodel.parallel.activation_checkpoint import AC_MODES

        if config.activation_checkpointing not in AC_MODES:
            raise UserError(f"parallel.activation_checkpointing={config.activation_checkpointing!r}: choose one of "
                            f"{', '.join(AC_MODES)}")
        from automodel.parallel.pipeline import SCHEDULES

        if config.pp_schedule not in SCHEDULES:
            raise UserError(f"parallel.pp_schedule={config.pp_schedule!r}: choose one of {', '.join(SCHEDULES)}")
        self._cp = None
        self._experts = []  # this rank's expert-parallel experts modules, under ep > 1
        # under pp > 1: [(stage index, stage module)] of this rank, by the id of the rank model `apply` returned
        # (a distillation teacher is laid out too, and pipelined apart from the student)
        self._stages: dict[int, list] = {}

    def dims(self, world_size: int) -> ParallelDims:
        c = self.cfg
        dims = ParallelDims.infer(world_size, dp_replicate=c.dp_replicate, dp_shard=c.dp_shard, cp=c.cp, tp=c.tp, pp=c.pp,
                                  ep=c.ep)
        if dims.pp > 1:
            from automodel.parallel.pipeline import check_schedule

            check_schedule(c.pp_schedule, dims.pp, c.pp_virtual_stages, None, tied=False)
        return dims

    def _sp(self, dims: ParallelDims) -> bool:
        return dims.tp > 1 and self.cfg.sequence_parallel

    def check_model(self, dims: ParallelDims, hf_config) -> None:
        if _own_positions(hf_config):  # tensor parallel splits its language model; the vision side is replicated
            split = [f"{d}={getattr(dims, d)}" for d in ("cp", "pp", "ep") if getattr(dims, d) > 1]
            if split:
                raise UserError(f"{', '.join(split)}: {getattr(hf_config, 'model_type', 'this')} is an image-text "
                                "model, which trains here under FSDP2/HSDP and tensor parallel only; use "
                                "parallel=fsdp2, hsdp or tp")
        if dims.ep > 1:
            from automodel.moe.experts import num_routed_experts

            n = num_routed_experts(hf_config)
            kind = getattr(hf_config, "model_type", "this model")
            if n is None:
                raise UserError(f"parallel.ep={dims.ep}: {kind} is a dense model (no routed experts to split); "
                                "use parallel.ep=1")
            if n % dims.ep:
                raise UserError(f"parallel.ep={dims.ep} does not divide the {n} experts of {kind}; pick an ep "
                                f"that divides {n}")
        if dims.tp > 1:
            from automodel.parallel.tensor_parallel import check_tensor_parallel

            check_tensor_parallel(dims.tp, hf_config)
        if dims.pp > 1:
            from automodel.parallel.pipeline import check_schedule
            from automodel.parallel.pipeline_selfcheck import check_split

            check_schedule(self.cfg.pp_schedule, dims.pp, self.cfg.pp_virtual_stages,
                           getattr(hf_config, "num_hidden_layers", None),
                           tied=bool(getattr(hf_config, "tie_word_embeddings", False)))
            check_split(hf_config, dims.pp, self.cfg.pp_virtual_stages)  # the stages compute the whole model

    def hints(self, dims: ParallelDims, hf_config=None) -> ParallelHints:
        """What the training step must do for this layout (see ParallelHints) and model (`hf_config`)."""
        sp = self._sp(dims)
        parts = ([f"2 x cp={dims.cp} (causal load balancing)"] if dims.cp > 1 else []) + (
            [f"tp={dims.tp} (sequence parallel)"] if sp else [])
        loss_context = None
        if dims.tp > 1 and self.cfg.loss_parallel:
            from torch.distributed.tensor.parallel import loss_parallel

            loss_context = loss_parallel
        cp = dims.cp > 1
        min_micro = 1
        if dims.pp > 1:
            from automodel.parallel.pipeline import min_microbatches

            min_micro = min_microbatches(self.cfg.pp_schedule, dims.pp)
        return ParallelHints(global_position_ids=(sp and not _own_positions(hf_config)) or cp,
                             seq_multiple=(2 * dims.cp if cp else 1) * (dims.tp if sp else 1),
                             seq_multiple_reason=" x ".join(parts), loss_context=loss_context,
                             shard_sequence=(lambda inputs, labels: self._cp.shard_sequence(inputs, labels)) if cp else None,
                             reduce_loss=(lambda loss: self._cp.reduce_loss(loss)) if cp else None,
                             pipeline=dims.pp > 1, min_microbatches=min_micro,
                             packing_refused_by=" and ".join(name for name, on in (("parallel.cp>1", cp),
                                                                                   ("parallel.pp>1", dims.pp > 1)) if on),
                             min_microbatches_reason=f"parallel.pp_schedule={self.cfg.pp_schedule} with pp={dims.pp}",
                             recompute=(f"parallel.activation_checkpointing={self.cfg.activation_checkpointing}"
                                        if self.cfg.activation_checkpointing != "none" else ""))

    def _position_ids(self, n: int, device):
        """Global positions of a pipeline stage's micro-batch of n tokens per row on this rank."""
        import torch

        if self._cp is not None:
            return self._cp.q_index.unsqueeze(0)
        return torch.arange(n, device=device).unsqueeze(0)

    def apply(self, model, mesh, dims: ParallelDims, mp_policy):
        if dims.cp > 1 and self._cp is None:  # one per run: a distillation teacher shares the step's split
            from automodel.parallel.context_parallel import ContextParallel

            self._cp = ContextParallel(mesh["cp"])
        if dims.pp == 1:
            self._lay_out(model, model, mesh, dims, mp_policy)
            return model
        # 0. pipeline: this rank's stages, each laid out below as a model of its own
        from automodel.parallel.pipeline import split

        model, stages = split(model, mesh["pp"].get_local_rank(), dims.pp, self.cfg.pp_virtual_stages,
                              self._position_ids)
        for _, stage in stages:
            self._lay_out(stage.shell, stage, mesh, dims, mp_policy)
        self._stages[id(model)] = stages
        return model  # this rank's part of the model, under the model's own parameter names

    def _lay_out(self, model, root, mesh, dims: ParallelDims, mp_policy) -> None:
        """EP -> TP -> CP -> AC -> compile -> FSDP on `model`; `root` (the model itself, or the pipeline stage
        that runs it) is FSDP's root."""
        from automodel.parallel.activation_checkpoint import apply_activation_checkpointing, compile_blocks

        # 0. expert parallel
        experts = []
        if dims.ep > 1:
            from automodel.moe.expert_parallel import apply_expert_parallel

            experts = apply_expert_parallel(model, mesh["ep"], type(model).__name__)

        # 1. tensor (+ sequence) parallel
        if dims.tp > 1:
            from automodel.parallel.tensor_parallel import apply_tensor_parallel

            apply_tensor_parallel(model, mesh["tp"], sequence_parallel=self._sp(dims),
                                  loss_parallel=self.cfg.loss_parallel)
        # 2. context parallel
        if self._cp is not None:
            self._cp.apply(model)
        # 3. activation checkpointing, 4. compile (per block)
        blocks = decoder_layers(model)
        blocks = apply_activation_checkpointing(model, blocks, self.cfg.activation_checkpointing)
        if self.cfg.compile:
            blocks = compile_blocks(blocks)
        # 5. FSDP2 / HSDP
        if dims.dp * dims.cp > 1 or (dims.tp == 1 and dims.pp == 1):
            self._fully_shard(root, blocks, mesh, dims, mp_policy, shell=model, experts=experts)
        elif mp_policy is not None:
            log.info("no data parallelism: the precision plugin's FSDP policy is unused (autocast still applies)")

    def pipeline(self, mesh, dims: ParallelDims, device, n_microbatches: int, loss_fn, model,
                 defer_last_stage: bool = False):
        """Under pp > 1, after `apply` returned `model`: this rank's stages of it and their schedule
        (automodel.parallel.pipeline.Pipeline; `defer_last_stage`: forward-only, see there)."""
        from automodel.parallel.pipeline import Pipeline

        return Pipeline(self._stages[id(model)], dims.pp * self.cfg.pp_virtual_stages, mesh["pp"].get_group(), device,
                        self.cfg.pp_schedule, n_microbatches, loss_fn, defer_last_stage=defer_last_stage)

    def _fully_shard(self, model, blocks, mesh, dims: ParallelDims, mp_policy, shell=None, experts=()) -> None:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        shard = [n for n in ("dp_shard", "cp") if getattr(dims, n) > 1]
        if len(shard) == 2:
            if dims.ep == 1:  # under ep, ParallelDims.build_mesh flattened it from the base dimensions
                mesh[tuple(shard)]._flatten("dp_shard_cp")
            shard = ["dp_shard_cp"]
        fsdp_names = tuple(["dp_replicate"] if dims.dp_replicate > 1 else []) + tuple(shard)
        fsdp_names = fsdp_names or ("dp_shard",)
        fsdp_mesh = mesh[fsdp_names]
        kwargs = {"mesh": fsdp_mesh, "mp_policy": mp_policy or MixedPrecisionPolicy()}
        if experts:
            self._fully_shard_experts(experts, mesh, dims, kwargs["mp_policy"])
        for i, block in enumerate(blocks):
            # The last block's parameters are needed again first in backward: keeping them saves a gather.
            reshard = self.cfg.reshard_after_forward and i < len(blocks) - 1
            fully_shard(block, reshard_after_forward=reshard, **kwargs)
        # The embedding and the output head are the largest tensors (vocab x hidden): units of their own, so
        # they are gathered one at a time, not together with the root. Tied ones share one tensor: root.
        ends = _embedding_and_head(shell, model)
        for i, end in enumerate(ends):
            fully_shard(end, reshard_after_forward=self.cfg.reshard_after_forward and i == 0, **kwargs)
        fully_shard(model, reshard_after_forward=self.cfg.reshard_after_forward, **kwargs)
        log.info("FSDP2 over %s: %d blocks%s + root", "x".join(fsdp_names), len(blocks),
                 f", {len(ends)} embedding/head" if ends else "")


    def _fully_shard_experts(self, experts, mesh, dims: ParallelDims, mp_policy) -> None:
        """Each experts module its own FSDP unit over the ranks that hold the same experts (FSDP averages
        their gradients over those ranks; expert_parallel.py scales them for the rest). The expert dimension
        is sharded by ep; FSDP shards the next one, so a rank's part is a plain block of the stacked tensor."""
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import Shard

        names = dims.expert_fsdp_names()
        for module in experts:
            fully_shard(module, mesh=mesh[names], mp_policy=mp_policy, reshard_after_forward=self.cfg.reshard_after_forward,
                        shard_placement_fn=lambda p: Shard(1))
        self._experts = list(experts)


def _own_positions(hf_config) -> bool:
    """An image-text model derives its own positions (e.g. Qwen-VL's M-RoPE over image rows and columns) from the
    whole sequence, which sequence parallel leaves replicated up to the first language block."""
    return getattr(hf_config, "vision_config", None) is not None


def _embedding_and_head(shell, root) -> list:
    """The untied input embedding and output head of the HF model in `shell` that sit inside `root`
    (a pipeline stage holds at most one of them), in forward order."""
    from automodel.modules import hf_base

    base = hf_base(shell if shell is not None else root)
    emb, head = base.get_input_embeddings(), base.get_output_embeddings()
    if emb is not None and head is not None and emb.weight is head.weight:
        return []
    inside = {id(m) for m in root.modules()}
    return [m for m in (emb, head) if m is not None and id(m) in inside and any(True for _ in m.parameters())]
