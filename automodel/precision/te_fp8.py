"""Precision plugin `te_fp8`: float8 training of the decoder blocks' linear layers through NVIDIA Transformer Engine.

The counterpart of `fp8` (torchao) for users whose stack is Transformer Engine's: each `nn.Linear` inside the
decoder blocks whose sizes are multiples of 16 becomes a `transformer_engine.pytorch.Linear` holding the very
same parameters (names, initialization, checkpoints and the HF export are untouched); the embedding, the output
head and anything outside the blocks stay in bf16. Each forward runs inside Transformer Engine's autocast with
the chosen recipe, within torch's bf16 autocast; FSDP2 gathers the weights in bf16.

Recipes: `current` (Float8CurrentScaling: one scale per tensor from its own amax, like torchao's tensorwise),
`delayed` (DelayedScaling: scales from an amax history; the history is module state that DCP checkpoints carry
and the HF export leaves out) and `mxfp8` (MXFP8BlockScaling: a scale per 32 values, Blackwell only).

Refused before any model is built, in one line: Transformer Engine not installed (`pip install 'automodel[te]'`,
CUDA only); a device without float8 matmuls; tensor or pipeline parallelism (Transformer Engine splits layers
with its own process groups, not DTensor; its autocast region holds one forward per module); activation
checkpointing (torch's recompute in backward would run the blocks outside Transformer Engine's autocast, so
backward would differ from forward).

Transformer Engine is imported only when this plugin is chosen.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging

from automodel.errors import UserError

log = logging.getLogger(__name__)

RECIPES = ("current", "delayed", "mxfp8")
FORMATS = ("hybrid", "e4m3")
_INSTALL = "pip install 'automodel[te]' (CUDA only)"


@dataclasses.dataclass
class TEFP8Config:
    recipe: str = "current"  # current | delayed | mxfp8
    format: str = "hybrid"  # hybrid: e4m3 forward, e5m2 gradients | e4m3: e4m3 both ways
    amax_history_len: int = 1024  # delayed: steps of amax history the scale is taken from
    amax_compute_algo: str = "max"  # delayed: max | most_recent


class TEFP8:
    Config = TEFP8Config

    def __init__(self, config: TEFP8Config):
        if config.recipe not in RECIPES:
            raise UserError(f"precision.recipe={config.recipe!r}: choose one of {', '.join(RECIPES)}")
        if config.format not in FORMATS:
            raise UserError(f"precision.format={config.format!r}: choose one of {', '.join(FORMATS)}")
        if config.amax_history_len < 1:
            raise UserError(f"precision.amax_history_len={config.amax_history_len} must be at least 1")
        if config.amax_compute_algo not in ("max", "most_recent"):
            raise UserError(f"precision.amax_compute_algo={config.amax_compute_algo!r}: choose max or most_recent")
        self.cfg = config
        self._recipe = None

    def check_layout(self, dims, hints) -> None:
        """Refuse layouts Transformer Engine's float8 cannot share (before anything is built)."""
        if dims.tp > 1 or dims.pp > 1:
            raise UserError("precision=te_fp8 under tensor or pipeline parallelism is not supported (Transformer "
                            "Engine splits layers with its own process groups, not DTensor); use fsdp2/hsdp/cp")
        if hints.recompute:
            raise UserError(f"precision=te_fp8 with {hints.recompute}: the recompute in backward would run outside "
                            "Transformer Engine's fp8 autocast; use parallel.activation_checkpointing=none, or "
                            "precision=fp8 (torchao)")

    def check_device(self, device_type: str, dims) -> None:
        """Refuse, before any model is built, where Transformer Engine's float8 cannot run."""
        if importlib.util.find_spec("transformer_engine") is None:
            raise UserError(f"precision=te_fp8 needs Transformer Engine: {_INSTALL}; or use precision=fp8 (torchao) "
                            "or precision=bf16")
        if device_type != "cuda":
            raise UserError(f"precision=te_fp8 needs an NVIDIA GPU with float8 matmuls (compute capability >= 8.9: "
                            f"H100, H200, L4, RTX 4090, B200); this run is on {device_type}: use precision=bf16 (or "
                            "precision=fp8 precision.emulate=true to test float8 numerics on any device)")
        import torch

        capability = torch.cuda.get_device_capability()
        need = (10, 0) if self.cfg.recipe == "mxfp8" else (8, 9)
        if capability < need:
            raise UserError(f"precision=te_fp8 precision.recipe={self.cfg.recipe} needs compute capability >= "
                            f"{need[0]}.{need[1]}; {torch.cuda.get_device_name()} has {capability[0]}.{capability[1]}: "
                            + ("use precision.recipe=current" if self.cfg.recipe == "mxfp8" else "use precision=bf16"))
        te = _te()
        available = te.is_fp8_available()
        ok, why = available if isinstance(available, tuple) else (available, "")
        if not ok:
            raise UserError(f"precision=te_fp8: Transformer Engine cannot run float8 here ({why}); use precision=bf16")

    def prepare(self, model) -> None:
        """Swap the decoder blocks' linear layers for Transformer Engine's (meta device, before the layout)."""
        from torch import nn

        from automodel.modules import decoder_layers, parent_of

        te = _te()
        kept, swapped = [], 0
        for block in decoder_layers(model):
            for name, module in list(block.named_modules()):
                if type(module) is not nn.Linear:  # plain layers only (an adapter's base layer is one; QLoRA's 4-bit is not)
                    continue
                if module.in_features % 16 or module.out_features % 16:
                    kept.append(name)
                    continue
                owner, attr = parent_of(block, module)
                setattr(owner, attr, _te_linear(te, module))
                swapped += 1
        log.info("te_fp8 (%s, %s): %d linear layers of the decoder blocks through Transformer Engine, %d kept in bf16 "
                 "(sizes not multiples of 16)", self.cfg.recipe, self.cfg.format, swapped, len(kept))

    def recipe(self):
        if self._recipe is None:
            from transformer_engine.common import recipe

            fmt = {"hybrid": recipe.Format.HYBRID, "e4m3": recipe.Format.E4M3}[self.cfg.format]
            if self.cfg.recipe == "delayed":
                self._recipe = recipe.DelayedScaling(fp8_format=fmt, amax_history_len=self.cfg.amax_history_len,
                                                     amax_compute_algo=self.cfg.amax_compute_algo)
            elif self.cfg.recipe == "current":
                self._recipe = recipe.Float8CurrentScaling(fp8_format=fmt)
            else:
                self._recipe = recipe.MXFP8BlockScaling(fp8_format=fmt)
        return self._recipe

    def autocast(self, device_type: str):
        """bf16 autocast with Transformer Engine's float8 autocast inside it (one forward pass per region)."""
        import contextlib

        import torch

        stack = contextlib.ExitStack()
        stack.enter_context(torch.autocast(device_type, dtype=torch.bfloat16))
        te = _te()
        if hasattr(te, "autocast"):  # Transformer Engine >= 2.8
            stack.enter_context(te.autocast(enabled=True, recipe=self.recipe()))
        else:
            stack.enter_context(te.fp8_autocast(enabled=True, fp8_recipe=self.recipe()))
        return stack

    def mixed_precision_policy(self):
        import torch
        from torch.distributed.fsdp import MixedPrecisionPolicy

        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def _te():
    import transformer_engine.pytorch as te

    return te


def _te_linear(te, linear):
    """A Transformer Engine Linear of `linear`'s shape holding `linear`'s own parameters (meta device)."""
    import torch

    bias = linear.bias is not None
    new = te.Linear(linear.in_features, linear.out_features, bias=bias, params_dtype=linear.weight.dtype,
                    device="meta")
    new.weight = linear.weight  # the same Parameter: its name, init, pretrained values and ties are unchanged
    new.initialize_as = torch.nn.Linear  # the model's initializer knows the layer as what it replaces
    if bias:
        new.bias = linear.bias
    else:
        new.bias = None  # Transformer Engine keeps an empty placeholder tensor otherwise, never moved off meta
    return new
