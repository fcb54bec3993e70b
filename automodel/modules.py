"""Structural facts about an HF model that several plugin groups need, derived from the model itself.

Nothing here knows a model name: decoder layers are found through HF's own `_no_split_modules`, the list
every PreTrainedModel keeps of the blocks that must not be split across devices.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from automodel.errors import UserError

if TYPE_CHECKING:
    from torch import nn


def hf_base(model: nn.Module) -> nn.Module:
    """The underlying transformers model, through PEFT (and torch.compile) wrappers."""
    inner = getattr(model, "_orig_mod", model)
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks, in order: the units FSDP shards and PP splits."""
    block_names = set(getattr(hf_base(model), "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in block_names]
    if not layers:
        raise UserError(
            f"cannot find the decoder layers of {type(hf_base(model)).__name__}: it declares no "
            "`_no_split_modules`; parallelize it with parallel=none or a plugin that knows its structure"
        )
    return layers


def language_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of the language model: all of them for a text model; for an image-text model, those
    inside the module built from its text sub-config (not the vision tower's), where tensor parallel applies."""
    layers = decoder_layers(model)
    base = hf_base(model)
    text_config = base.config.get_text_config()
    if text_config is base.config:
        return layers
    inside = {id(m) for m in language_model(model).modules()}
    return [layer for layer in layers if id(layer) in inside]


def vision_layers(model: nn.Module) -> list[nn.Module]:
    """An image-text model's repeated vision blocks (the entries of a layer list; not its embeddings or pooling
    head, which _no_split_modules also lists); none for a text model."""
    blocks = {id(b) for b in decoder_layers(model)} - {id(b) for b in language_layers(model)}
    return [m for name, m in model.named_modules() if id(m) in blocks and name.rpartition(".")[2].isdigit()]


def sub_models(model: nn.Module, config) -> list[tuple[str, nn.Module]]:
    """(name, module) of each transformers model inside `model` (not itself) built from a config of `config`'s
    type: how an image-text model's language and vision parts are told apart, without knowing the model."""
    from transformers import PreTrainedModel

    return [(name, m) for name, m in model.named_modules() if isinstance(m, PreTrainedModel) and m is not model
            and type(m.config) is type(config)]


def language_model(model: nn.Module) -> nn.Module:
    """The module built from the text sub-config (the model itself for a text model): the part tensor parallel
    splits, with the output head beside it."""
    base = hf_base(model)
    text_config = base.config.get_text_config()
    if text_config is base.config:
        return base
    found = next((m for _, m in sub_models(base, text_config)), None)
    if found is None:
        raise UserError(f"cannot tell the language model of {type(base).__name__} from its other parts: no sub-model "
                        "is built from its text config; use a layout without tensor parallel (parallel=fsdp2)")
    return found


def parent_of(root: nn.Module, child: nn.Module) -> tuple[nn.Module, str]:
    """(the module holding `child` as a direct submodule, the attribute name), to replace it in place."""
    for module in root.modules():
        for name, c in module.named_children():
            if c is child:
                return module, name
    raise RuntimeError(f"{type(child).__name__} is not inside {type(root).__name__}")


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer (shared ones once), at the dtypes they have (meta ones too)."""
    seen = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in seen.values())


def count_params(model: nn.Module) -> tuple[int, int]:
    """(all parameters, trainable parameters), counting each shared tensor once."""
    seen: set[int] = set()
    total = trainable = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = p.numel()
        total += n
        trainable += n if p.requires_grad else 0
    return total, trainable


# A forward that only traces shapes (a pipeline schedule infers what its stages exchange by running one):
# hooks that keep training statistics ignore it.
_SHAPE_ONLY = [0]


class shape_only_forward:
    """Context: the model runs to learn output shapes, not on training data."""

    def __enter__(self):
        _SHAPE_ONLY[0] += 1

    def __exit__(self, *exc):
        _SHAPE_ONLY[0] -= 1


def in_shape_only_forward() -> bool:
    return _SHAPE_ONLY[0] > 0
