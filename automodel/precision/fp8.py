"""Precision plugin `fp8`: float8 training of the decoder blocks' linear layers through torchao.

torchao's `Float8Linear` replaces each linear layer inside the decoder blocks (the embedding, the output head,
routers and anything outside the blocks stay in bf16, as torchtitan does) before the layout; everything else
runs as `bf16` does. Recipes: `tensorwise` (one scale per tensor: the fastest; with FSDP2 it can all-gather
weights in float8, `precision.fsdp_float8_all_gather=true`) and `rowwise` (a scale per row: more accurate).
Layers whose sizes are not multiples of 16 (float8 matmul tiles) stay in bf16, counted in the log.

float8 matmuls need an NVIDIA GPU of compute capability 8.9 or newer (Ada, Hopper, Blackwell); elsewhere the run
is refused before any model is built, unless `precision.emulate=true` (torchao's emulation, for tests: same
numerics, no speed-up). torchao is an optional extra: `pip install 'automodel[fp8]'`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging

from automodel.errors import UserError

log = logging.getLogger(__name__)

RECIPES = ("tensorwise", "rowwise")


@dataclasses.dataclass
class FP8Config:
    recipe: str = "tensorwise"  # tensorwise | rowwise
    fsdp_float8_all_gather: bool = False  # tensorwise under FSDP2: all-gather weights in float8 (half the traffic)
    emulate: bool = False  # run float8 matmuls in emulation (any device; for tests, no speed-up)


class FP8:
    Config = FP8Config

    def __init__(self, config: FP8Config):
        if config.recipe not in RECIPES:
            raise UserError(f"precision.recipe={config.recipe!r}: choose one of {', '.join(RECIPES)}")
        if config.fsdp_float8_all_gather and config.recipe != "tensorwise":
            raise UserError("precision.fsdp_float8_all_gather=true needs precision.recipe=tensorwise (one scale per "
                            "weight, so shards can be gathered in float8)")
        self.cfg = config

    def check_device(self, device_type: str, dims) -> None:
        """Refuse, before any model is built, where float8 cannot run."""
        if importlib.util.find_spec("torchao") is None:
            raise UserError("precision=fp8 needs torchao: pip install 'automodel[fp8]' (or use precision=bf16)")
        if dims.tp > 1 or dims.pp > 1:
            raise UserError("precision=fp8 under tensor or pipeline parallelism is not supported yet (float8 needs "
                            "its own tp styles); use fsdp2/hsdp/cp, or precision=bf16")
        if self.cfg.emulate:
            return
        import torch

        if device_type != "cuda":
            raise UserError(f"precision=fp8 needs an NVIDIA GPU with float8 matmuls (compute capability >= 8.9: "
                            f"H100, H200, L4, RTX 4090, B200); this run is on {device_type}: use precision=bf16 "
                            "(or precision.emulate=true to test the numerics, without a speed-up)")
        capability = torch.cuda.get_device_capability()
        if capability < (8, 9):
            raise UserError(f"precision=fp8 needs compute capability >= 8.9 (Ada, Hopper, Blackwell); "
                            f"{torch.cuda.get_device_name()} has {capability[0]}.{capability[1]}: use precision=bf16")

    def prepare(self, model) -> None:
        """Swap the decoder blocks' linear layers for torchao's Float8Linear (meta device, before the layout)."""
        logging.getLogger("torchao").setLevel(logging.ERROR)  # its optional CUDA kernels fail to load on CPU: noise
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training

        from automodel.modules import decoder_layers

        config = Float8LinearConfig.from_recipe_name(self.cfg.recipe)
        config = dataclasses.replace(config, emulate=self.cfg.emulate,
                                     enable_fsdp_float8_all_gather=self.cfg.fsdp_float8_all_gather)
        inside = {id(m) for block in decoder_layers(model) for m in block.modules()}
        kept = []

        def convert(module, fqn: str) -> bool:
            if id(module) not in inside:
                return False
            if module.in_features % 16 or module.out_features % 16:
                kept.append(fqn)
                return False
            return True

        convert_to_float8_training(model, config=config, module_filter_fn=convert)
        converted = sum(type(m).__name__ == "Float8Linear" for m in model.modules())
        log.info("fp8 (%s%s): %d linear layers of the decoder blocks in float8, %d kept in bf16 (sizes not multiples "
                 "of 16)", self.cfg.recipe, ", emulated" if self.cfg.emulate else "", converted, len(kept))

    def autocast(self, device_type: str):
        import torch

        return torch.autocast(device_type, dtype=torch.bfloat16)

    def mixed_precision_policy(self):
        import torch
        from torch.distributed.fsdp import MixedPrecisionPolicy

        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
