"""Tensor parallel (+ sequence parallel) for HF decoder models, derived from the model itself.

The plan comes from transformers: `model._tp_plan` (the whole model's, with `lm_head` and the embedding)
or else `config.base_model_tp_plan` (the base model's, prefixed with `base_model_prefix`). Each HF style
name maps to a torch `ParallelStyle` below; nothing here knows a model name. Sequence parallel (SP) is
added structurally:

- the residual stream is split along the sequence (`Shard(1)`) across tp ranks from the first decoder
  block on (the embedding's output stays replicated: HF builds positions and the attention mask from
  its length, so they stay global, for SDPA and eager attention alike); every row-wise layer's output
  is reduce-scattered back to that split;
- modules that own only 1-D weights of size `hidden_size` (the norms of a decoder layer and the final
  norm) run `SequenceParallel` on that split stream;
- the modules that hold column-wise layers (attention, MLP) all-gather their input first;
- the LM head takes the split stream and returns replicated logits, or vocab-sharded logits when
  `loss_parallel` is on (the loss must then run under `torch.distributed.tensor.parallel.loss_parallel`).

Adapters (peft's LoRA, or anything else by the same convention): a planned module that is not a Linear
but wraps one as `base_layer` is laid out structurally (`_adapter_styles`): the base Linear gets the
planned style, and the Linears beside it (down- and up-projections, told apart by their shapes) are laid
out so the wrapper's sum `base(x) + up(down(x))` adds tensors of one layout. Frozen or not, every weight
is a DTensor on the tp mesh; replicated adapter weights get gradients summed over tp ranks where their
input is split, identical ones where it is not, and count once in the grad norm.

Mixture-of-experts blocks (the parent of a routed-experts module, see automodel/moe/experts.py) are not
split over tp: HF's plan entries inside them (`moe_tp_experts`, shared experts) are dropped, the block takes
the whole sequence (all-gathered under SP) and hands back this rank's part. Every tp rank then routes and
computes the same tokens, so the router's and experts' gradients are already the same on every tp rank;
experts are split by expert parallel (parallel.ep) instead. The same holds for any other part of a block
the plan leaves alone (DeepSeek-V3's plan has no attention entries): it runs whole on every tp rank.

The engine still passes global `position_ids` under SP (see `ParallelHints`); with the replicated
embedding output HF would derive the same ones.
"""

from __future__ import annotations

import logging
import re

import torch
from torch import nn

from automodel.errors import UserError
from automodel.modules import hf_base, language_layers, language_model

log = logging.getLogger(__name__)


def resolve_plan(model: nn.Module) -> dict[str, str]:
    """{module name in the HF model: HF style name}, with `*` expanded against the model's modules."""
    base = hf_base(model)
    plan = dict(getattr(base, "_tp_plan", None) or {})
    if not plan:
        prefix = getattr(base, "base_model_prefix", "model")
        plan = {f"{prefix}.{k}": v for k, v in (getattr(base.config, "base_model_tp_plan", None) or {}).items()}
    if not plan:
        raise UserError(
            f"parallel.tp>1: {type(base).__name__} has no tensor-parallel plan (neither `_tp_plan` nor "
            "`config.base_model_tp_plan`); use parallel.tp=1"
        )
    patterns = [(re.compile("^" + re.escape(k).replace(r"\*", r"\d+") + "$"), v) for k, v in plan.items()]
    resolved = {}
    for name, _ in base.named_modules():
        for pattern, style in patterns:
            if pattern.match(name):
                resolved[name] = style
                break
    return resolved


def _style(kind: str, module: nn.Module, sp: bool, loss_parallel: bool, is_output: bool):
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    seq = Shard(1) if sp else Replicate()
    if is_output:  # the LM head: colwise over the vocabulary
        return ColwiseParallel(input_layouts=seq, output_layouts=Shard(-1) if loss_parallel else Replicate(),
                               use_local_output=not loss_parallel)
    if kind == "embedding_rowwise" or (kind == "rowwise" and isinstance(module, nn.Embedding)):
        # replicated output: HF builds the attention mask from the embeddings' sequence length
        return RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
    if kind == "colwise":
        return ColwiseParallel()
    if kind in ("colwise_rep", "colwise_gather_output"):  # fused projections: gather so the split stays right
        return ColwiseParallel(output_layouts=Replicate())
    if kind == "rowwise":
        return RowwiseParallel(output_layouts=seq)
    if kind in ("rowwise_rep", "rowwise_split_input"):
        return RowwiseParallel(input_layouts=Replicate(), output_layouts=seq)
    if kind in ("replicated_with_grad_allreduce", "local_replicated"):
        return _HeadShardedReplicate()
    return None


from torch.distributed.tensor.parallel import ParallelStyle  # noqa: E402


class _ReplicatedWeights(ParallelStyle):
    """A module whose weights stay whole on every tp rank while its input is laid out: the input (a local
    tensor) is marked with `input_layout`, the weights are replicated DTensors, and the output is
    returned local (or as a DTensor). With a sharded input (`Shard(1)`: the sequence-split stream) the
    weight's gradient is Partial and summed over tp ranks; with a replicated input it is the same on every
    rank. No communication in forward."""

    def __init__(self, input_layout=None, use_local_output: bool = True):
        super().__init__()
        self.input_layout = input_layout
        self.use_local_output = use_local_output

    def _input_placement(self, x: torch.Tensor):
        return self.input_layout

    def _apply(self, module: nn.Module, mesh):
        from torch.distributed.tensor import DTensor, Replicate, distribute_module

        def input_fn(mod, inputs, device_mesh):
            x = inputs[0]
            if not isinstance(x, DTensor):
                x = DTensor.from_local(x, device_mesh, (self._input_placement(x),), run_check=False)
            return (x, *inputs[1:])

        def output_fn(mod, outputs, device_mesh):
            return outputs.to_local() if self.use_local_output and isinstance(outputs, DTensor) else outputs

        def partition_fn(name, mod, device_mesh):
            for pname, p in list(mod.named_parameters(recurse=False)):
                mod.register_parameter(pname, nn.Parameter(
                    DTensor.from_local(p.data, device_mesh, (Replicate(),), run_check=False), p.requires_grad))

        return distribute_module(module, mesh, partition_fn, input_fn, output_fn)


class _HeadShardedReplicate(_ReplicatedWeights):
    """A module inside the tensor-parallel region (e.g. a per-head q/k norm) that sees only this rank's
    heads: its weight is replicated and its input is marked as sharded over the heads dimension (-2), so
    the weight's gradient is summed over tp ranks."""

    def _input_placement(self, x: torch.Tensor):
        from torch.distributed.tensor import Shard

        return Shard(x.dim() - 2)


def _wrapped_linear(module: nn.Module) -> tuple[str, nn.Linear] | None:
    """(attribute, the nn.Linear) of a module that wraps one as `base_layer` (peft's convention), else None."""
    base = getattr(module, "base_layer", None)
    attr = next((n for n, c in module.named_children() if c is base), None)
    return (attr, base) if attr is not None and isinstance(base, nn.Linear) else None


def _adapter_styles(name: str, wrapper: nn.Module, attr: str, base: nn.Linear, style) -> dict:
    """Styles for a planned module that wraps a Linear (an adapter): the base gets the planned `style`, and
    every Linear beside it is laid out to match, classified by its shape against the base:

    - column-wise base (output features sharded): the down-projection (in_features == base's) keeps
      replicated weights and takes the base's input as it comes; the up-projection (out_features ==
      base's) is column-wise from that input, its output laid out like the base's;
    - row-wise base (input features sharded): the down-projection is row-wise on the base's input, its
      output laid out like the base's (sequence-split under SP, else replicated); the up-projection keeps
      replicated weights and takes that output (so, under SP, its weight gradient is summed over tp ranks).

    Anything else with parameters inside the wrapper is refused."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    colwise = isinstance(style, ColwiseParallel)
    if not colwise and not isinstance(style, RowwiseParallel):
        raise UserError(f"parallel.tp>1: {name} wraps its Linear in {type(wrapper).__name__}, which tensor parallel "
                        f"lays out only column-wise or row-wise, not as {type(style).__name__}; use parallel.tp=1")
    layout = "column-wise" if colwise else "row-wise"
    in_layout, out_layout, local = style.input_layouts[0], style.output_layouts[0], style.use_local_output
    styles = {f"{name}.{attr}": style}
    for sub, m in wrapper.named_modules():
        if m is base or sub.startswith(attr + ".") or not list(m.parameters(recurse=False)):
            continue
        linear = isinstance(m, nn.Linear)
        down = linear and m.in_features == base.in_features and m.out_features != base.out_features
        up = linear and m.out_features == base.out_features and m.in_features != base.in_features
        if not (down or up):
            what = f"{name}.{sub}" if sub else name
            raise UserError(f"parallel.tp>1: {what} ({type(m).__name__} in the adapter {type(wrapper).__name__}) "
                            f"cannot be laid out to match its {layout} base layer (neither an [in, r] down- nor an "
                            f"[r, out] up-projection Linear); use parallel.tp=1")
        if colwise:
            styles[f"{name}.{sub}"] = (_ReplicatedWeights(in_layout) if down else
                                       ColwiseParallel(input_layouts=in_layout, output_layouts=out_layout,
                                                       use_local_output=local))
        else:
            styles[f"{name}.{sub}"] = (RowwiseParallel(input_layouts=in_layout, output_layouts=out_layout)
                                       if down else _ReplicatedWeights(out_layout, use_local_output=local))
    return styles


def _sequence_hook(mesh, gather_: bool):
    """Forward pre-hook on the hidden states: all-gather the sequence (before attention/MLP), or split it
    (before the first decoder block, which receives the replicated embeddings)."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    src, dst = ((Shard(1),), (Replicate(),)) if gather_ else ((Replicate(),), (Shard(1),))

    def gather(x):
        return DTensor.from_local(x, mesh, src, run_check=False).redistribute(mesh, dst).to_local()

    def hook(module, args, kwargs):
        if args and isinstance(args[0], torch.Tensor):
            return (gather(args[0]), *args[1:]), kwargs
        if isinstance(kwargs.get("hidden_states"), torch.Tensor):
            return args, {**kwargs, "hidden_states": gather(kwargs["hidden_states"])}
        raise UserError(f"sequence parallel: cannot find the hidden states passed to {type(module).__name__}; "
                        "set parallel.sequence_parallel=false")

    return hook


def _gathered_output_hook(mesh):
    """Forward hook: a block's sequence-split output, all-gathered along the sequence."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    def gather(x):
        return DTensor.from_local(x, mesh, (Shard(1),), run_check=False).redistribute(mesh, (Replicate(),)).to_local()

    def hook(module, args, output):
        return (gather(output[0]), *output[1:]) if isinstance(output, tuple) else gather(output)

    return hook


def _split_output_hook(mesh):
    """Forward hook: a block's whole-sequence output (the same on every tp rank), cut to this rank's part of the
    sequence; in backward each rank gets the gradient of the whole output (all-gathered)."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    def split(x):
        return DTensor.from_local(x, mesh, (Replicate(),), run_check=False).redistribute(mesh, (Shard(1),)).to_local()

    def hook(module, args, output):
        return (split(output[0]), *output[1:]) if isinstance(output, tuple) else split(output)

    return hook


def _whole_per_rank(model: nn.Module, modules: dict, laid_out: set, hidden: int) -> set[str]:
    """Under SP: the parts of a decoder block the plan leaves alone (no planned layer inside, not a norm), e.g.
    MoE blocks, or attention where the HF plan covers only the MLPs (DeepSeek-V3's). Each runs whole on every
    tp rank, on the gathered sequence, and hands back this rank's part of its output."""
    blocks = {id(b) for b in language_layers(model)}
    whole = set()
    for block_name, block in modules.items():
        if id(block) not in blocks:
            continue
        for child_name, child in block.named_children():
            name = f"{block_name}.{child_name}"
            if not any(True for _ in child.parameters()) or _is_hidden_norm(child, hidden):
                continue
            if any(p == name or p.startswith(name + ".") for p in laid_out):
                continue
            whole.add(name)
    return whole


def _moe_blocks(base: nn.Module) -> list[str]:
    """Names of the modules that hold a routed-experts module (MoE blocks), in `base`'s naming."""
    from automodel.moe.experts import experts_modules

    return sorted({name.rpartition(".")[0] for name, _ in experts_modules(base)})


def _is_hidden_norm(module: nn.Module, hidden: int) -> bool:
    params = list(module.parameters(recurse=True))
    return bool(params) and all(p.dim() == 1 and p.shape[0] == hidden for p in params)


def apply_tensor_parallel(model: nn.Module, tp_mesh, *, sequence_parallel: bool, loss_parallel: bool) -> nn.Module:
    from torch.distributed.tensor.parallel import SequenceParallel, parallelize_module

    base = hf_base(model)
    plan = resolve_plan(model)
    modules = dict(base.named_modules())
    moe_blocks = _moe_blocks(base)
    plan = {n: k for n, k in plan.items() if not any(n == b or n.startswith(b + ".") for b in moe_blocks)}
    out_emb, in_emb = base.get_output_embeddings(), base.get_input_embeddings()
    tied = out_emb is not None and in_emb is not None and out_emb.weight is in_emb.weight
    hidden = base.config.get_text_config().hidden_size

    styles, unknown = {}, set()

    def lay_out(name: str, module: nn.Module, kind: str) -> None:
        """The style(s) of one planned module; a module wrapping a Linear (an adapter) gets one per Linear."""
        replicated = kind in ("replicated_with_grad_allreduce", "local_replicated")
        wrapped = None
        if not replicated and not isinstance(module, (nn.Linear, nn.Embedding)):
            wrapped = _wrapped_linear(module)
            if wrapped is None and isinstance(getattr(module, "base_layer", None), nn.Module):
                raise UserError(f"parallel.tp>1: {name} is an adapter ({type(module).__name__}) around "
                                f"{type(module.base_layer).__name__}, planned '{kind}': tensor parallel lays out "
                                "adapters only around Linear layers; leave it out of the adapter or use parallel.tp=1")
            if wrapped is None:
                raise UserError(f"parallel.tp>1: {name} ({type(module).__name__}) cannot follow the HF plan style "
                                f"'{kind}'; use parallel.tp=1")
        inner = wrapped[1] if wrapped else module
        style = _style(kind, inner, sequence_parallel, loss_parallel, is_output=module is out_emb)
        if style is None:
            unknown.add(kind)
        elif wrapped:
            styles.update(_adapter_styles(name, module, *wrapped, style))
        else:
            styles[name] = style

    for name, kind in plan.items():
        lay_out(name, modules[name], kind)
    if unknown:
        raise UserError(f"parallel.tp>1: HF tensor-parallel styles {sorted(unknown)} of {type(base).__name__} are "
                        "not supported here; use parallel.tp=1")
    if in_emb is not None and not any(modules[n] is in_emb for n in plan):  # plans without the embedding
        name = next(n for n, m in modules.items() if m is in_emb)
        lay_out(name, in_emb, "embedding_rowwise")

    _refuse_plans_outside_the_blocks(model, base, plan, modules)
    gathered, whole = set(), set()
    if sequence_parallel:
        planned = set(styles) | set(plan)
        # modules holding column-wise layers take the gathered sequence
        for name, kind in plan.items():
            parent = name.rpartition(".")[0]
            if kind.startswith("colwise") and modules[name] is not out_emb and parent:
                gathered.add(parent)
        whole = _whole_per_rank(model, modules, planned | gathered, hidden)
        language = {id(m) for m in language_model(model).modules()}  # an image-text model's vision side stays whole
        for name, module in modules.items():
            if name in planned or name in gathered or name in whole or not name or id(module) not in language:
                continue
            if any(name.startswith(p + ".") for p in gathered | planned | whole):
                continue  # inside attention/MLP/MoE: runs on the gathered sequence
            if _is_hidden_norm(module, hidden) and not any(
                    m is not module and _is_hidden_norm(m, hidden) for m in module.children()):
                styles[name] = SequenceParallel(use_local_output=True)

    frozen = {n for n, p in base.named_parameters() if not p.requires_grad}
    parallelize_module(base, tp_mesh, styles)
    for n, p in base.named_parameters():  # torch's SequenceParallel makes every parameter it replaces trainable
        if n in frozen:
            p.requires_grad_(False)
    for name in gathered | whole:
        modules[name].register_forward_pre_hook(_sequence_hook(tp_mesh, gather_=True), with_kwargs=True)
    for name in whole:
        modules[name].register_forward_hook(_split_output_hook(tp_mesh))
    if sequence_parallel:
        blocks = language_layers(model)
        blocks[0].register_forward_pre_hook(_sequence_hook(tp_mesh, gather_=False), with_kwargs=True)
        if out_emb is None:  # a pipeline stage before the last: it hands the next one the whole sequence
            blocks[-1].register_forward_hook(_gathered_output_hook(tp_mesh))
    if tied:
        base.get_output_embeddings().weight = base.get_input_embeddings().weight  # both Shard(0) over vocab
    n_sp = sum(isinstance(s, SequenceParallel) for s in styles.values())
    log.info("tensor parallel over tp=%d: %d modules from the HF plan%s", tp_mesh.size(), len(plan),
             f", sequence parallel on {n_sp} norms" if sequence_parallel else "")
    return model


def _refuse_plans_outside_the_blocks(model: nn.Module, base: nn.Module, plan: dict, modules: dict) -> None:
    """A plan that shards nothing inside the decoder blocks (e.g. only the embedding and the head) would
    leave every block whole on every tp rank: no memory saved, and sequence parallel would feed the blocks
    a split sequence that nothing gathers again. Refused in one line."""
    blocks = {id(b) for b in language_layers(model)}
    inside = set()
    for name, module in modules.items():
        if id(module) in blocks:
            inside.update(id(m) for m in module.modules())
    if not any(id(modules[n]) in inside for n in plan):
        raise UserError(f"parallel.tp>1: the tensor-parallel plan of {type(base).__name__} shards no layer inside its "
                        f"decoder blocks (only {', '.join(sorted(plan)) or 'nothing'}); tensor parallel would keep "
                        "every block whole on every rank: use parallel.tp=1 (fsdp2 shards it)")


def check_tensor_parallel(tp: int, hf_config) -> None:
    """Refuse model/tp combinations that cannot shard evenly (the language model's: tp splits only that)."""
    text_config = hf_config.get_text_config()
    for key in ("num_attention_heads", "num_key_value_heads", "vocab_size"):
        n = getattr(text_config, key, None)
        if n is not None and n % tp:
            raise UserError(f"parallel.tp={tp} does not divide the model's {key}={n}; pick a tp that divides it")

