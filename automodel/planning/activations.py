"""Activation memory of a decoder block, measured rather than assumed: a twin of the model with one and with two
blocks, at the real widths, runs forward under torch's FakeTensorMode (shapes only: no memory, no arithmetic) on
[micro-batch, tokens] inputs, and every tensor autograd saves for backward is counted once (views share their
storage), parameters and buffers excluded. Two blocks minus one is what each block saves, whatever the
architecture (GQA, SwiGLU, fp32 norms, rotary copies, LoRA's adapters): no table of architectures, no formula
per model. A model whose forward cannot run on fake tensors (data-dependent routing in some MoE implementations)
falls back to an estimate from the block's weights (every matmul's input and output, routed experts x top-k).
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

log = logging.getLogger("automodel")


def _twin(hf_config, layers: int):
    """The config with `layers` language-model blocks (an image-text model's text sub-config is cut; its vision
    tower does not run on input ids alone)."""
    twin = copy.deepcopy(hf_config)
    text = twin.get_text_config()
    total = text.num_hidden_layers
    for key, value in list(vars(text).items()):  # per-layer settings (layer_types, ...) cut to match
        if isinstance(value, (list, tuple)) and len(value) == total:
            setattr(text, key, type(value)(value[:layers]))
    text.num_hidden_layers = layers
    return twin


def _saved_bytes(model_cls, hf_config, layers: int, dtype, micro: int, tokens: int, adapt) -> int:
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        model = model_cls._from_config(_twin(hf_config, layers), dtype=dtype)
        model = adapt(model)
        model.train()
    own = {t.untyped_storage()._cdata for t in (*model.parameters(), *model.buffers())}
    saved: dict[int, int] = {}

    def pack(t):
        key = t.untyped_storage()._cdata
        if key not in own:
            saved[key] = max(saved.get(key, 0), t.untyped_storage().nbytes())
        return t

    with mode, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ids = torch.zeros(micro, tokens, dtype=torch.long)
        model(input_ids=ids, use_cache=False)
    return sum(saved.values())


def block_bytes(model_cls, hf_config, dtype, micro: int, tokens: int, adapt=lambda m: m) -> int | None:
    """Bytes one decoder block saves for backward for a [micro, tokens] input, or None when the model's forward
    cannot run on fake tensors."""
    try:
        one = _saved_bytes(model_cls, hf_config, 1, dtype, micro, tokens, adapt)
        two = _saved_bytes(model_cls, hf_config, 2, dtype, micro, tokens, adapt)
    except Exception as e:  # noqa: BLE001 - any failure means: estimate from the weights instead
        log.info("plan: the model's forward does not run on fake tensors (%s: %s); activations are estimated from "
                 "the blocks' weights", type(e).__name__, str(e).splitlines()[0][:120] if str(e) else "")
        return None
    return max(two - one, 0)


def weight_estimate_elements(layer: nn.Module, hidden: int, top_k: int, num_experts: int) -> float:
    """Per token: every matmul's input and output as laid out on this rank (TP-local; FSDP's dim-0 shard undone),
    routed experts x top-k, and the two norms' fp32 inputs (2 elements each in a 16-bit count)."""
    from automodel.moe.experts import experts_modules
    from automodel.planning.layout import _fsdp_factor, _is_dtensor

    experts = {id(m) for _, m in experts_modules(layer)}
    elements = 0.0
    for module in layer.modules():
        if isinstance(module, nn.Linear):
            w = module.weight
            local = w.to_local().shape if _is_dtensor(w) else w.shape
            elements += local[0] * _fsdp_factor(w) + local[1]
        elif id(module) in experts:
            for p in module.parameters(recurse=False):
                if p.dim() == 3:
                    shape = p.to_local().shape if _is_dtensor(p) else p.shape
                    elements += min(top_k, num_experts) * (shape[1] + shape[2])
    return elements + 4 * hidden
