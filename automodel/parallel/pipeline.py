"""Pipeline parallel: an HF decoder cut into stages along the `pp` mesh dimension, run by torch's pipelining.

How a model is cut, without knowing its name:

- the decoder blocks (`decoder_layers`: HF's `_no_split_modules`) are split into `pp x virtual_stages`
  contiguous runs; rank r holds stages r, r + pp, r + 2 pp, ... (one stage each unless the schedule is
  interleaved);
- the first stage also holds the input embedding, the last one the final norm and the output head;
  stage s holds nothing else of the model;
- each stage runs the model's own HF forward on its part: the base model with `input_ids` (first stage)
  or `inputs_embeds` (the hidden states received), and the CausalLM forward on the last stage, so
  model-specific pieces (embedding scales, per-layer attention types, logit soft-capping) stay the
  model's own code. Hooks make the received hidden states enter the stage's first block unchanged and
  hand on exactly what its last block produced (see PipelineStageModule);
- at set-up (`pipeline_selfcheck.check_split`, before any real weights exist) a small twin of the model, cut
  by the same code, must compute the whole model's logits, or the layout is refused: no silent wrong numbers.

Parameter names do not change: a kept block stays under its original index (`model.layers.5.mlp...`,
see `_SparseLayers`). The *rank model*, the original model pruned in place to what this rank holds,
is what the optimizer, checkpoints and the export see, so a DCP checkpoint written under pp reshards
onto any other layout and back. Each stage is a thin shell sharing the rank model's modules (no weight
is copied); TP, CP, activation checkpointing, compile and FSDP are applied to the stage shells.

Micro-batches all have train.seq_len tokens (the stages' buffers have one shape), and packed rows
(position_ids that restart) are refused. Tied input/output embeddings cannot be split across stages.
"""

from __future__ import annotations

import functools

import copy
import logging
from collections.abc import Callable

import torch
from torch import nn

from automodel.errors import UserError
from automodel.modules import decoder_layers, hf_base, parent_of

log = logging.getLogger(__name__)

SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")


def stage_layer_ranges(num_layers: int, num_stages: int) -> list[range]:
    """Contiguous, balanced runs of block indices, one per stage (the first stages get one more)."""
    base, extra = divmod(num_layers, num_stages)
    ranges, start = [], 0
    for s in range(num_stages):
        n = base + (s < extra)
        ranges.append(range(start, start + n))
        start += n
    return ranges


def check_schedule(schedule: str, pp: int, virtual_stages: int, num_layers: int | None, tied: bool) -> None:
    """Refuse, before any model is built, pipeline settings that cannot work."""
    if schedule not in SCHEDULES:
        raise UserError(f"parallel.pp_schedule={schedule!r}: choose one of {', '.join(SCHEDULES)}")
    if virtual_stages < 1:
        raise UserError(f"parallel.pp_virtual_stages={virtual_stages} must be at least 1")
    if schedule == "interleaved_1f1b" and virtual_stages < 2:
        raise UserError("parallel.pp_schedule=interleaved_1f1b needs parallel.pp_virtual_stages >= 2 (stages per rank)")
    if schedule != "interleaved_1f1b" and virtual_stages > 1:
        raise UserError(f"parallel.pp_virtual_stages={virtual_stages} needs parallel.pp_schedule=interleaved_1f1b; "
                        f"{schedule} runs one stage per rank")
    stages = pp * virtual_stages
    if num_layers is not None and num_layers < stages:
        raise UserError(f"parallel.pp={pp} x pp_virtual_stages={virtual_stages} = {stages} stages need at least "
                        f"{stages} layers; the model has {num_layers}")
    if tied:
        raise UserError("parallel.pp>1: the model ties its input embedding to its output head "
                        "(tie_word_embeddings=true), which would sit on different stages; use a layout without pp")


def min_microbatches(schedule: str, pp: int) -> int:
    """Micro-batches per step that the schedule needs (1F1B fills the pipeline with one per stage)."""
    return pp if schedule in ("1f1b", "interleaved_1f1b") else 1


class _SparseLayers(nn.ModuleList):
    """Some of a model's blocks, kept under their original indices (so parameter names do not change);
    iterating, slicing and integer indexing behave as over the kept blocks in order."""

    def __init__(self, modules=None):
        super().__init__()
        if isinstance(modules, dict):
            for index, module in modules.items():
                self.add_module(str(index), module)
        elif modules is not None:
            self.extend(modules)

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            return _SparseLayers(list(self._modules.values())[idx])
        return list(self._modules.values())[idx]


class _Anatomy:
    """Where the pieces of an HF causal LM are, found structurally."""

    def __init__(self, model: nn.Module):
        self.causal = hf_base(model)
        self.inner = self.causal.base_model
        blocks = decoder_layers(model)
        container, _ = parent_of(self.inner, blocks[0])
        self.container_owner, self.container_name = parent_of(self.inner, container)
        if not isinstance(container, nn.ModuleList) or len(container) != len(blocks) or any(
                a is not b for a, b in zip(container, blocks)):
            raise UserError(f"parallel.pp>1: the decoder blocks of {type(self.causal).__name__} are not one "
                            "ModuleList; it cannot be split into stages here")
        # block by its original index: a pruned model keeps the original indices as names
        self.blocks = {int(name): block for name, block in container.named_children()}
        emb = self.causal.get_input_embeddings()
        head = self.causal.get_output_embeddings()
        self.embedding = parent_of(self.inner, emb) if emb is not None else None
        self.head = parent_of(self.causal, head) if head is not None else None
        # the final norm (and anything else with weights) that sits after the blocks in the base model
        self.finals = [n for n, c in self.inner.named_children()
                       if c is not emb and c is not container and any(True for _ in c.parameters())]


def _prune(model: nn.Module, keep: list[int], first: bool, last: bool) -> None:
    """Keep only blocks `keep` (original indices), the embedding if `first`, the norm and head if `last`."""
    a = _Anatomy(model)
    setattr(a.container_owner, a.container_name, _SparseLayers({i: a.blocks[i] for i in keep}))
    if not first and a.embedding:
        setattr(a.embedding[0], a.embedding[1], None)
    if not last:
        if a.head:
            setattr(a.head[0], a.head[1], None)
        for name in a.finals:
            setattr(a.inner, name, nn.Identity())


def _spine(model: nn.Module) -> set[int]:
    """ids of the modules from the root down to the blocks' container: the only ones a stage shell copies."""
    a = _Anatomy(model)
    container = getattr(a.container_owner, a.container_name)
    spine = {id(container)}
    for module in model.modules():
        if any(m is container for m in module.modules()):
            spine.add(id(module))
    return spine


def _stage_shell(rank_model: nn.Module, keep: list[int], first: bool, last: bool) -> nn.Module:
    """A copy of the rank model's skeleton that shares every block, embedding, norm and head with it."""
    spine = _spine(rank_model)
    memo = {id(m): m for m in rank_model.modules() if id(m) not in spine}
    memo.update({id(t): t for t in (*rank_model.parameters(), *rank_model.buffers())})
    config = hf_base(rank_model).config
    memo[id(config)] = config
    shell = copy.deepcopy(rank_model, memo)
    _prune(shell, keep, first, last)
    inner = hf_base(shell).base_model
    # The base model's forward reads per-layer settings by the position in its (now shorter) block list.
    view = copy.copy(inner.config)
    if isinstance(getattr(view, "layer_types", None), (list, tuple)):
        view.layer_types = [view.layer_types[i] for i in keep]
    inner.config = view
    return shell


class PipelineStageModule(nn.Module):
    """One stage: hidden states (or token ids on the first stage) in; hidden states, or logits on the last.

    `position_ids(n)` gives the global positions of a micro-batch of n tokens per row on this rank.

    The stage runs the model's own HF forward, but whatever the base model does to `inputs_embeds` before
    its blocks (e.g. a scale such as Granite's `embedding_multiplier`) was done already, on the first
    stage. So on a later stage a forward pre-hook on the first block replaces the block's hidden-state
    input with exactly the received tensor, and a stage that is not last hands on what its last block
    returned (a forward hook), not `last_hidden_state` (which could hold more than the blocks did).
    Positions and masks come from the shapes and the position ids, so they stay right.

    The hooks go on the objects the base model calls, on the first forward: by then tensor parallel,
    activation checkpointing, compile and FSDP have hooked or wrapped the blocks (checkpointing replaces
    them in their container). So the substitution runs before every other pre-hook (sequence parallel's
    split, FSDP's input cast) and outside any checkpoint (a recompute in backward must not see a later
    micro-batch's tensor); the capture runs after every other forward hook (sequence parallel's gather).
    Outside this stage's forward (the rank model shares these blocks) the hooks do nothing."""

    def __init__(self, shell: nn.Module, first: bool, last: bool, position_ids: Callable[[int, torch.device], torch.Tensor]):
        super().__init__()
        self.shell = shell
        self.first, self.last = first, last
        self._position_ids = position_ids
        a = _Anatomy(shell)
        self._layers = (getattr(a.container_owner, a.container_name),)  # a tuple: not registered twice
        self._hooked = False
        self._received = self._produced = None
        self._running = False

    def _hook_blocks(self) -> None:
        layers = self._layers[0]
        if not self.first:
            layers[0].register_forward_pre_hook(self._substitute, prepend=True, with_kwargs=True)
        if not self.last:
            layers[-1].register_forward_hook(self._capture)
        self._hooked = True

    def _substitute(self, module, args, kwargs):
        if self._received is None:
            return None
        x, self._received = self._received, None
        if args and isinstance(args[0], torch.Tensor):
            return (x, *args[1:]), kwargs
        if isinstance(kwargs.get("hidden_states"), torch.Tensor):
            return args, {**kwargs, "hidden_states": x}
        raise UserError(f"parallel.pp>1: cannot find the hidden states passed to {type(module).__name__}; "
                        "use a layout without pp")

    def _capture(self, module, args, output):
        if self._running:
            self._produced = output[0] if isinstance(output, tuple) else output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._hooked:
            self._hook_blocks()
        causal = hf_base(self.shell)
        kwargs = {"position_ids": self._position_ids(x.shape[1], x.device), "use_cache": False,
                  "input_ids" if self.first else "inputs_embeds": x}
        self._received, self._running = (None if self.first else x), True
        try:
            if self.last:
                return causal(**kwargs).logits
            causal.base_model(**kwargs)
            out = self._produced
        finally:
            self._received = self._produced = None
            self._running = False
        return out


def _stages(model: nn.Module, pp_rank: int, pp: int, virtual_stages: int, position_ids) -> list:
    """Prune `model` in place to rank `pp_rank`'s part; [(stage index, PipelineStageModule), ...] of that rank."""
    num_stages = pp * virtual_stages
    ranges = stage_layer_ranges(len(decoder_layers(model)), num_stages)
    mine = list(range(pp_rank, num_stages, pp))
    _prune(model, [i for s in mine for i in ranges[s]], first=0 in mine, last=num_stages - 1 in mine)
    stages = []
    for s in mine:
        first, last = s == 0, s == num_stages - 1
        stages.append((s, PipelineStageModule(_stage_shell(model, list(ranges[s]), first, last), first, last,
                                              position_ids)))
    return stages


def split(model: nn.Module, pp_rank: int, pp: int, virtual_stages: int, position_ids) -> tuple[nn.Module, list]:
    """Prune `model` in place to this rank's part (the rank model) and build its stage modules.

    Returns (rank model, [(stage index, PipelineStageModule), ...])."""
    num_stages = pp * virtual_stages
    ranges = stage_layer_ranges(len(decoder_layers(model)), num_stages)
    stages = _stages(model, pp_rank, pp, virtual_stages, position_ids)
    log.info("pipeline: %d stages over pp=%d; this rank holds stage(s) %s (layers %s)", num_stages, pp,
             ", ".join(str(s) for s, _ in stages),
             ", ".join(f"{ranges[s].start}-{ranges[s].stop - 1}" for s, _ in stages))
    return model, stages


@functools.cache
def _stage_class():
    from torch.distributed import pipelining

    from automodel.modules import shape_only_forward

    class Stage(pipelining.PipelineStage):
        """torch's stage, whose first-step metadata inference (a forward and a backward on placeholder
        tensors) runs under `shape_only_forward`: statistics hooks (MoE routers') must not count it."""

        def _forward_metadata_inference(self, *args, **kwargs):
            with shape_only_forward():
                return super()._forward_metadata_inference(*args, **kwargs)

        def _backward_metadata_inference(self, *args, **kwargs):
            with shape_only_forward():
                return super()._backward_metadata_inference(*args, **kwargs)

    return Stage


class _Recorder(nn.Module):
    """Stands in for the last stage in a forward-only pass: keeps what the stage would have received (one
    micro-batch's hidden states, not `[tokens, vocab]` logits) and hands on a placeholder."""

    def __init__(self):
        super().__init__()
        self.received: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from automodel.modules import in_shape_only_forward

        if not in_shape_only_forward():  # not the schedule's first-step shape inference, on placeholders
            self.received.append(x.detach().clone())  # the schedule may reuse its receive buffers
        return x.new_zeros((x.shape[0], 1))


class Pipeline:
    """This rank's stages and the schedule that runs them; what the engine's pipeline step calls.

    `defer_last_stage`: a forward-only pipeline (a frozen distillation teacher) whose last stage does not run in
    the schedule: `forward_to_last` passes the batch through the other stages and hands back, on the rank that
    holds the last stage, what that stage received for each micro-batch; `run_last` runs the stage on one of
    them when its output is wanted. So a micro-batch's logits exist only while they are used, never all of a
    step's at once."""

    def __init__(self, stages: list[tuple[int, nn.Module]], num_stages: int, pp_group, device, schedule: str,
                 n_microbatches: int, loss_fn: Callable | None, defer_last_stage: bool = False):
        from torch.distributed import pipelining

        self.pp_group = pp_group
        self.has_last_stage = any(s == num_stages - 1 for s, _ in stages)
        self._last_module = self._recorder = None
        if defer_last_stage and self.has_last_stage:
            self._recorder = _Recorder()
            self._last_module = next(m for s, m in stages if s == num_stages - 1)
            stages = [(s, self._recorder if s == num_stages - 1 else m) for s, m in stages]
        built = [_stage_class()(m, s, num_stages, device, group=pp_group) for s, m in stages]
        cls = {"gpipe": pipelining.ScheduleGPipe, "1f1b": pipelining.Schedule1F1B,
               "interleaved_1f1b": pipelining.ScheduleInterleaved1F1B}[schedule]
        try:
            self.schedule = cls(built if schedule == "interleaved_1f1b" else built[0], n_microbatches=n_microbatches,
                                loss_fn=loss_fn, scale_grads=False)
        except ValueError as e:  # the schedule's own rules on micro-batch counts
            raise UserError(f"parallel.pp_schedule={schedule}: {' '.join(str(e).split())}") from None
        self._first = any(s == 0 for s, _ in stages)
        self.n_microbatches = n_microbatches

    def run(self, input_ids: torch.Tensor, labels: torch.Tensor, train: bool = True) -> list[torch.Tensor]:
        """One pass over the whole local batch (split into the schedule's micro-batches). Returns the
        micro-batch losses on the rank holding the last stage, [] elsewhere."""
        losses: list[torch.Tensor] = []
        args = (input_ids,) if self._first else ()
        target = labels if self.has_last_stage else None
        run = self.schedule.step if train else self.schedule.eval
        run(*args, target=target, losses=losses if self.has_last_stage else None)
        return losses

    @torch.no_grad()
    def forward_to_last(self, input_ids: torch.Tensor) -> list[torch.Tensor]:
        """(defer_last_stage) Forward only, up to the last stage's input: what it received per micro-batch, in
        order, on the rank that holds it; [] elsewhere. Collective over the pp group."""
        self.schedule.eval(*((input_ids,) if self._first else ()))
        if self._recorder is None:
            return []
        received, self._recorder.received = self._recorder.received, []
        return received

    def run_last(self, received: torch.Tensor) -> torch.Tensor:
        """(defer_last_stage) The last stage's output (logits) for what `forward_to_last` handed back."""
        return self._last_module(received)
