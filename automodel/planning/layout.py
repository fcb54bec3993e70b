"""What one rank holds, counted on the real layout: the model built on the meta device, adapted by peft, loss and
precision plugins, and laid out by the real parallel plugin on a mesh of the planned world size under torch's fake
process group (collectives return at once; nothing is allocated). So the parameter shards are exactly training's.
"""

from __future__ import annotations

import dataclasses
import math

from torch import nn

_FSDP_DIMS = ("dp_shard", "dp_shard_cp", "dp_shard_mod_ep", "expert_fsdp", "dp_replicate", "dp")


@dataclasses.dataclass
class RankState:
    rank: int
    stage: str  # e.g. "stage 0 of 4" under pp, else ""
    params: int  # parameters this rank holds (elements, after every shard)
    param_bytes: int  # their bytes as stored
    trainable: int  # elements of those that train (they get grads and optimizer state)
    total: int  # the whole model's parameters (elements, counted once; set by the caller)
    total_trainable: int
    fsdp_units: list[int]  # elements each FSDP unit all-gathers on this rank (its TP-local full size)
    root_unit: int  # of those, the root's (embeddings, final norm, head): gathered at the start of a step
    layers: list[nn.Module]  # this rank's decoder blocks (for the activation estimate)
    head_out_features: int  # the output head's rows (the vocabulary) when this rank holds the head, else 0
    tp_local_hidden: int
    model_cls: type | None = None  # the model's class before the layout (for the activation twin)
    # an image-text model's vision blocks this rank holds, when any of their weights train (a frozen tower saves
    # nothing for backward), and the vision tokens of one sample (None: not known from the config)
    vision_layers: list = dataclasses.field(default_factory=list)
    vision_hidden: int = 0
    vision_tokens: int | None = None


def _is_dtensor(p) -> bool:
    return hasattr(p, "placements") and hasattr(p, "device_mesh")


def _fsdp_factor(p) -> int:
    """How many ways FSDP split this parameter (the all-gather restores that many shards)."""
    if not _is_dtensor(p):
        return 1
    names = p.device_mesh.mesh_dim_names or ()
    factor = 1
    for i, placement in enumerate(p.placements):
        if placement.is_shard() and i < len(names) and names[i] in _FSDP_DIMS:
            factor *= p.device_mesh.size(i)
    return factor


def _local_numel(p) -> int:
    return p.to_local().numel() if _is_dtensor(p) else p.numel()


def count(model: nn.Module, layers: list[nn.Module], rank: int, stage: str,
          vision_layers: list[nn.Module] = ()) -> RankState:
    """`model`: this rank's laid-out part; `layers`: the language model's decoder blocks as found before the layout
    (the layout shards them in place; those this rank holds are kept); `vision_layers`: an image-text model's
    vision blocks, likewise."""
    from torch.distributed.fsdp import FSDPModule

    held = {id(q): q for q in model.parameters()}  # a tied weight once
    params = param_bytes = trainable = 0
    for p in held.values():
        n = _local_numel(p)
        params += n
        param_bytes += n * p.element_size()
        trainable += n if p.requires_grad else 0
    layers = [layer for layer in layers if any(id(q) in held for q in layer.parameters())]
    vision_layers = [layer for layer in vision_layers if any(id(q) in held and q.requires_grad
                                                             for q in layer.parameters())]
    units, root = [], 0
    fsdp_modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for module in fsdp_modules:
        nested = {id(q) for sub in module.modules() if sub is not module and isinstance(sub, FSDPModule)
                  for q in sub.parameters()}
        own = {id(q): q for q in module.parameters() if id(q) not in nested}
        gathered = sum(_local_numel(q) * _fsdp_factor(q) for q in own.values() if _fsdp_factor(q) > 1)
        if module is model:  # the root unit: embeddings, final norm, head (a pipeline stage's own)
            root = gathered
        units.append(gathered)
    try:  # a pipeline stage without the head has none (or a placeholder)
        head = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        head = None
    weight = getattr(head, "weight", None) if isinstance(head, nn.Module) else None
    head_out = weight.shape[0] if weight is not None and weight.dim() == 2 else 0  # the whole vocabulary
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = getattr(text_config, "hidden_size", 0) or 0
    state = RankState(rank, stage, params, param_bytes, trainable, 0, 0, units, root, layers, head_out, hidden)
    vision_config = getattr(config, "vision_config", None)
    if vision_config is not None:
        state.vision_layers = vision_layers
        state.vision_hidden = getattr(vision_config, "hidden_size", 0) or 0
        size, patch = getattr(vision_config, "image_size", None), getattr(vision_config, "patch_size", None)
        if isinstance(size, int) and isinstance(patch, int) and patch:
            state.vision_tokens = (size // patch) ** 2  # one image at the tower's own resolution
    return state


def tokens_per_rank(micro_batch: int, seq_len: int, cp: int) -> int:
    return micro_batch * math.ceil(seq_len / cp)

