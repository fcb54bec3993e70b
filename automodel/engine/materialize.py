"""Weights for a model laid out on the meta device: every rank materializes only its own shards.

Why one tensor at a time: no rank may ever hold the whole model (a 70B model is 280 GB in fp32). The
model is built on the meta device, adapted (PEFT) and laid out (TP, FSDP, PP) with no storage at all;
then `materialize` allocates this rank's local shards and fills them module by module:

- random init runs the module's own initializer (HF's `_init_weights`, or the PEFT plugin's for its
  adapters) on a full-size *shadow* of that one module, with the RNG seeded from (train.seed, the
  module's name), and each rank keeps its slice. The values depend only on the seed and the name, never
  on the layout, the world size or the order the ranks visit modules in: one process and any layout
  start from bitwise the same weights. Names are taken as the plain HF model names them (no PEFT
  prefix, no `.base_layer`), so LoRA and full fine-tuning start from the same base weights;
- pretrained weights come from a `source` (the checkpoint plugin's reader of an HF folder): each tensor
  read whole, converted as transformers would (fused experts, renamed keys) and sliced.

Host memory during set-up is therefore this rank's shards + the largest single module's tensors + a
fixed overhead, whatever the model size.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterable

import torch
from torch import nn

from automodel.errors import UserError
from automodel.modules import hf_base

log = logging.getLogger("automodel")

# wrappers that layout code puts around modules: not part of a module's name
_WRAPPER_SEGMENTS = ("_checkpoint_wrapped_module", "_orig_mod", "_fsdp_wrapped_module", "base_layer")

ModuleInit = Callable[[str, nn.Module], bool]  # (canonical module name, full-size shadow) -> handled?


def canonical_names(model: nn.Module) -> dict[int, str]:
    """{id(module): its name in the plain HF model}, taken before the layout wraps or prunes anything."""
    base = hf_base(model)
    names = {}
    for name, module in base.named_modules(remove_duplicate=False):
        names.setdefault(id(module), ".".join(s for s in name.split(".") if s not in _WRAPPER_SEGMENTS))
    return names


def seed_for(seed: int, name: str) -> int:
    """A 63-bit seed from the run's seed and a module's name (stable across processes and versions)."""
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def hf_init(model: nn.Module) -> ModuleInit:
    """The model's own transformers initializer, applied to one module: that of the innermost transformers model
    holding it, as transformers itself dispatches (an image-text model's vision tower is a model of its own, whose
    initializer alone knows its buffers, e.g. SigLIP's position ids)."""
    from transformers import PreTrainedModel

    names = canonical_names(model)
    owners = sorted(((names.get(id(m), n), m._init_weights) for n, m in hf_base(model).named_modules()
                     if isinstance(m, PreTrainedModel) and hasattr(m, "_init_weights")), key=lambda o: -len(o[0]))

    def run(name: str, shadow: nn.Module) -> bool:
        module_name = name.split("#")[0]  # an expert's shadow: "<experts>#<e>"
        for prefix, init in owners:
            if not prefix or module_name == prefix or module_name.startswith(prefix + "."):
                init(shadow)
                return True
        return False

    return run


def zero_init(name: str, shadow: nn.Module) -> bool:
    """Zeros for every tensor: a rehearsal's weights mean nothing, and drawing billions of random numbers
    would only make it slow (the memory held is the same)."""
    for t in [*shadow._parameters.values(), *shadow._buffers.values()]:
        if t is not None:
            t.zero_()
    return True


class _Stats:
    def __init__(self):
        self.tensors = self.initialized = self.loaded = 0
        self.largest = 0  # bytes of the largest full-size module shadow / source tensor held at once


def materialize(model: nn.Module, names: dict[int, str], device, *, seed: int, inits: Iterable[ModuleInit],
                source=None, base_keys: set[str] | None = None,
                finish: Callable[[str, nn.Module], None] | None = None) -> None:
    """Allocate this rank's shards of `model` (laid out on meta) on `device` and fill them.

    `inits`: module initializers tried in order (the first that returns True wins). `source`: an object
    with `keys()` (the canonical tensor names it holds) and `get(name)` (that full tensor), read into
    every tensor it holds. `base_keys`: canonical names the source must provide (the plain model's
    parameters); anything else (adapters) keeps its random init. `finish(name, module)`: called once a module's
    own tensors hold their values, e.g. to quantize a frozen layer (QLoRA). With it, an unsharded model is
    allocated one module at a time, so a layer that shrinks once finished is never held whole beside the rest."""
    t0 = time.perf_counter()
    inits = list(inits)
    provided = set(source.keys()) if source is not None else set()
    if source is not None and base_keys:
        _check_complete(model, names, provided, base_keys, source)
    lazy = finish is not None and not any(hasattr(t, "device_mesh") for t in model.parameters())
    owners = _owners(model) if lazy else None
    if not lazy:
        model.to_empty(device=device)
    stats, done = _Stats(), set()
    with torch.no_grad():
        for module in list(model.modules()):
            name = names.get(id(module))
            own = _own_tensors(module, done)
            if not own:
                continue
            if lazy:
                own = _allocate(module, own, owners, device)
            if name is None:
                raise RuntimeError(f"materialize: {type(module).__name__} holds tensors but was not named before the "
                                   "layout (a module created by the layout?)")
            full_names = {k: f"{name}.{k}" if name else k for k in own}
            if not all(full_names[k] in provided for k, (_, persistent) in own.items() if persistent) or any(
                    not persistent for _, persistent in own.values()):
                _init_module(module, name, own, inits, seed, device, stats)
            for k, (tensor, _) in own.items():
                if full_names[k] in provided:
                    _load(tensor, full_names[k], source, device, stats)
                stats.tensors += 1
            done.update(id(t) for t, _ in own.values())
            if finish is not None:
                finish(name, module)
    _retie(model)
    log.info("materialized %d tensors on %s in %.1fs (%d initialized, %d from pretrained weights; largest tensor "
             "held whole: %.1f MiB)", stats.tensors, device, time.perf_counter() - t0, stats.initialized,
             stats.loaded, stats.largest / 2**20)


def finished(skeleton: nn.Module, peft) -> nn.Module:
    """A meta skeleton in the form materialize leaves it: the peft plugin's `finish_module` (if any) applied to
    each module, e.g. QLoRA's base layers in their 4-bit shapes (for sizing and checkpoint templates)."""
    finish = getattr(peft, "finish_module", None)
    for name, module in list(skeleton.named_modules()) if finish else ():
        finish(name, module)
    return skeleton


def _owners(model: nn.Module) -> dict[int, list[tuple[nn.Module, str, bool]]]:
    """{id(tensor): every (module, key, is_parameter) holding it}: a tied tensor has several holders."""
    owners: dict[int, list] = {}
    for module in model.modules():
        for k, p in module._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append((module, k, True))
        for k, b in module._buffers.items():
            if b is not None:
                owners.setdefault(id(b), []).append((module, k, False))
    return owners


def _allocate(module: nn.Module, own: dict, owners: dict, device) -> dict:
    """Storage on `device` for this module's own meta tensors (every holder of a tied one gets the same)."""
    fresh = {}
    for k, (t, persistent) in own.items():
        new = torch.empty_like(t, device=device)
        if isinstance(t, nn.Parameter):
            new = nn.Parameter(new, requires_grad=t.requires_grad)
            new.__dict__.update(t.__dict__)
        for holder, key, is_param in owners.get(id(t), [(module, k, isinstance(t, nn.Parameter))]):
            (holder._parameters if is_param else holder._buffers)[key] = new
        fresh[k] = (new, persistent)
    return fresh


def _load(tensor: torch.Tensor, name: str, source, device, stats: _Stats) -> None:
    """Fill `tensor` (this rank's shard) from the source: only its own region when the layout is plain
    row/column blocks, else the whole tensor, sliced here."""
    stored = source.shape(name) if hasattr(source, "shape") else None
    # a block is read alone when the stored size is known, or the source reads blocks of a converted tensor
    blocks = stored is not None or (hasattr(source, "reads_blocks") and source.reads_blocks(name))
    region = _region(tensor) if blocks else None
    value = source.get(name, region) if region is not None else source.get(name)
    whole = stored if stored is not None else tuple(value.shape)
    if region is not None and stored is None:  # a converted block: it must be the block's shape
        whole = tuple(tensor.shape) if tuple(value.shape) == tuple(s.stop - s.start for s in region) else value.shape
    if tuple(whole) != tuple(tensor.shape):
        raise UserError(f"{source.describe()} holds '{name}' with shape {tuple(whole)} but the model expects "
                        f"{tuple(tensor.shape)}; it does not hold this architecture's weights")
    stats.largest = max(stats.largest, value.numel() * value.element_size())
    value = value.to(device=device, dtype=tensor.dtype)
    if region is not None:
        tensor.to_local().copy_(value)
    else:
        _copy_shard(tensor, value)
    stats.loaded += 1


def _region(tensor: torch.Tensor) -> tuple | None:
    """This rank's block of a DTensor sharded in plain row/column blocks, as slices; None otherwise."""
    if not hasattr(tensor, "device_mesh"):
        return None
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if not all(type(p) in (Shard, Replicate) for p in tensor.placements):
        return None  # e.g. FSDP over TP on the same dim (_StridedShard): read whole, slice by the placement
    shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    return tuple(slice(o, o + n) for o, n in zip(offset, shape))


def _own_tensors(module: nn.Module, done: set[int]) -> dict[str, tuple[torch.Tensor, bool]]:
    """This module's own parameters and buffers not yet filled: {name: (tensor, persistent)}."""
    own = {}
    for k, p in module._parameters.items():
        if p is not None and id(p) not in done:
            own[k] = (p, True)
    skip = getattr(module, "_non_persistent_buffers_set", set())
    for k, b in module._buffers.items():
        if b is not None and id(b) not in done:
            own[k] = (b, k not in skip)
    return own


def _init_module(module: nn.Module, name: str, own: dict, inits: list[ModuleInit], seed: int, device,
                 stats: _Stats) -> None:
    """Run the module's initializer on a full-size shadow of it (its own tensors only), then keep our slices.

    A tensor the initializer never wrote (its version counter did not move) is refused rather than
    trained from uninitialized memory. Stacked experts (a module whose tensors all have num_experts rows,
    see automodel/moe/experts.py) are initialized one expert at a time, each seeded by its own name: a
    DeepSeek-V3 layer's experts are 30 GB in fp32, and a rank needs only its own."""
    region = _expert_rows(module, own)
    if region is not None:
        for e in range(*region):
            _init_shadow(module, f"{name}#{e}", own, inits, seed, device, stats, rows=(e, e - region[0]))
        return
    _init_shadow(module, name, own, inits, seed, device, stats)


def _expert_rows(module: nn.Module, own: dict) -> tuple[int, int] | None:
    """(first, end) of the experts whose rows this rank holds, for a stacked-experts module; else None."""
    n = getattr(module, "num_experts", None)
    if not hasattr(module, "_is_expert_parallel") or not isinstance(n, int) or n < 2:
        return None
    ranges = set()
    for t, _ in own.values():
        if t.dim() < 2 or t.shape[0] != n:
            return None
        region = _region(t) if hasattr(t, "device_mesh") else tuple(slice(0, d) for d in t.shape)
        if region is None:
            return None
        ranges.add((region[0].start, region[0].stop))
    return ranges.pop() if len(ranges) == 1 else None


def _init_shadow(module: nn.Module, name: str, own: dict, inits: list[ModuleInit], seed: int, device,
                 stats: _Stats, rows: tuple[int, int] | None = None) -> None:
    """`rows=(expert, local row)`: the shadow holds that one expert (num_experts=1) and fills that local row."""
    shadow = object.__new__(_plain_class(module))  # the module's own class: isinstance checks still hold
    shadow.__dict__ = dict(module.__dict__)
    shadow._modules = {}  # an initializer touches only the module's own tensors
    shape = {k: (1, *t.shape[1:]) if rows else tuple(t.shape) for k, (t, _) in own.items()}
    if rows:
        shadow.num_experts = 1
    full = {k: torch.empty(shape[k], dtype=t.dtype, device=device) for k, (t, _) in own.items()}
    # unset entries (a Linear's bias=None) stay as they are; tensors already filled (a tied weight) stay out
    shadow._parameters = {k: nn.Parameter(full[k], requires_grad=False) if k in full else None
                          for k, p in module._parameters.items() if k in full or p is None}
    shadow._buffers = {k: full[k] if k in full else None for k, b in module._buffers.items() if k in full or b is None}
    versions = {k: v._version for k, v in full.items()}
    stats.largest = max(stats.largest, sum(v.numel() * v.element_size() for v in full.values()))
    devices = [torch.device(device)] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        try:
            try:
                torch.manual_seed(seed_for(seed, name))
                handled = any(init(name, shadow) for init in inits)
            except AttributeError:  # an initializer that also reaches into children (SigLIP's embeddings, attention)
                shadow._modules = {k: _ghost(c) for k, c in module._modules.items()}
                torch.manual_seed(seed_for(seed, name))
                handled = any(init(name, shadow) for init in inits)
        except (AttributeError, KeyError, TypeError) as e:
            raise UserError(f"cannot initialize '{name}' ({type(module).__name__}) on the meta device: its initializer "
                            f"failed ({e}); load pretrained weights (model.path) or report this model") from None
    for k, (tensor, _) in own.items():
        value = shadow._parameters[k] if k in shadow._parameters else shadow._buffers[k]
        replaced = value is not None and value.data_ptr() != full[k].data_ptr()  # assigned a new tensor: set
        if not handled or value is None or (not replaced and full[k]._version == versions[k]):
            raise UserError(f"cannot initialize '{name}.{k}' ({type(module).__name__}) on the meta device: the model's "
                            "initializer leaves it unset; load pretrained weights (model.path) for this model")
        if rows:  # one expert: its row of this rank's block (the other dims as the block has them)
            region = _region(tensor) if hasattr(tensor, "device_mesh") else None
            local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
            local[rows[1]].copy_(value.detach()[0][region[1:]] if region else value.detach()[0])
            stats.initialized += rows[1] == 0
            continue
        _copy_shard(tensor, value.detach())
        stats.initialized += 1


def _ghost(module: nn.Module | None) -> nn.Module | None:
    """A weightless stand-in for a child module (its tensors on the meta device, where writes do nothing): what
    the parent's initializer writes into its children is dropped; each child is initialized in its own turn."""
    if module is None:
        return None
    ghost = object.__new__(_plain_class(module))
    ghost.__dict__ = dict(module.__dict__)
    ghost._parameters = {k: None if p is None else nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"),
                                                                requires_grad=False)
                         for k, p in module._parameters.items()}
    ghost._buffers = {k: None if b is None else torch.empty(b.shape, dtype=b.dtype, device="meta")
                      for k, b in module._buffers.items()}
    ghost._modules = {k: _ghost(c) for k, c in module._modules.items()}
    return ghost


def _plain_class(module: nn.Module) -> type:
    """The module's class without FSDP2's wrapper class (which cannot be instantiated bare), or the class it stands
    in for (`initialize_as`: e.g. a Transformer Engine Linear holding an nn.Linear's parameters, which the model's
    initializer knows only as nn.Linear)."""
    from torch.distributed.fsdp import FSDPModule

    cls = getattr(module, "initialize_as", None) or type(module)
    if issubclass(cls, FSDPModule):
        cls = next(c for c in cls.__mro__ if issubclass(c, nn.Module) and not issubclass(c, FSDPModule))
    return cls


def _copy_shard(tensor: torch.Tensor, full: torch.Tensor) -> None:
    """Write this rank's part of the full value `full` into `tensor` (a DTensor shard or a plain tensor)."""
    if not hasattr(tensor, "device_mesh"):
        tensor.copy_(full)
        return
    region = _region(tensor)
    if region is not None:  # plain row/column blocks: copy straight from a view, no intermediate copy
        tensor.to_local().copy_(full[region])
        return
    from torch.distributed.tensor import distribute_tensor

    local = distribute_tensor(full, tensor.device_mesh, tensor.placements, src_data_rank=None).to_local()
    tensor.to_local().copy_(local)


def _retie(model: nn.Module) -> None:
    base = hf_base(model)
    if getattr(base.config, "tie_word_embeddings", False) and hasattr(base, "tie_weights"):
        out, inp = base.get_output_embeddings(), base.get_input_embeddings()
        if out is not None and inp is not None and out.weight is not inp.weight:
            base.tie_weights()


def _check_complete(model, names, provided: set[str], base_keys: set[str], source) -> None:
    """Refuse, before allocating anything, pretrained weights that lack a parameter of the model."""
    missing = []
    seen = set()
    for module in model.modules():
        name = names.get(id(module))
        if name is None:
            continue
        for k, p in module._parameters.items():
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            full = f"{name}.{k}" if name else k
            if full in base_keys and full not in provided:
                missing.append(full)
    if missing:
        raise UserError(f"{source.describe()} has no tensor '{missing[0]}' ({len(missing)} missing); it does not hold "
                        "this architecture's weights")
