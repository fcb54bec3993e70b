"""PEFT plugin `output_scales`: an adapter of its own. Each chosen linear layer gets a learned scale per output
feature (as IA3 does), `y = s * (W x + b)`; everything else is frozen. s starts at 1 (the model unchanged).

The adapter is a parameter added to the linear module itself (`<layer>.output_scale`) with a forward hook, so
the base weights keep their names (pretrained weights load into them, the layouts shard them) and the new
tensor is initialized by `init_module`, like any module the engine fills. At export the scales are merged into
the weights (`W' = diag(s) W`, `b' = s * b`): the export is a plain transformers model, and the scales alone
are written to `output_scales.safetensors`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from automodel.errors import UserError


@dataclasses.dataclass
class OutputScalesConfig:
    target_modules: Any = dataclasses.field(default_factory=lambda: ["k_proj", "v_proj", "down_proj"])


def _scale_output(module, args, output):
    return output * module.output_scale


class OutputScales:
    Config = OutputScalesConfig

    def __init__(self, config: OutputScalesConfig):
        if not config.target_modules:
            raise UserError("peft.target_modules is empty: name the linear layers to scale, e.g. [k_proj, v_proj]")
        self.cfg = config

    def _targets(self, model):
        import torch

        found = [(n, m) for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in self.cfg.target_modules]
        if not found:
            raise UserError(f"peft.target_modules={list(self.cfg.target_modules)} names no linear layer of the model")
        return found

    def apply(self, model):
        import torch

        for p in model.parameters():
            p.requires_grad_(False)
        for _, module in self._targets(model):
            module.output_scale = torch.nn.Parameter(torch.empty(module.out_features, device=module.weight.device))
            module.output_scale_hook = module.register_forward_hook(_scale_output)
        return model

    def init_module(self, name, module) -> bool:
        import torch

        if not hasattr(module, "output_scale"):
            return False
        torch.nn.init.ones_(module.output_scale)
        return False  # the base weight and bias: the model's own initializer (random init runs only)

    def export(self, model, full_state_dict, out_dir):
        import torch
        from safetensors.torch import save_file

        scales = {}
        with torch.no_grad():
            for name, module in self._targets(model):
                scale = module.output_scale
                scales[name] = scale.detach().clone().contiguous()
                module.weight.mul_(scale.unsqueeze(1))
                if module.bias is not None:
                    module.bias.mul_(scale)
                del module.output_scale
                module.output_scale_hook.remove()
        save_file(scales, os.path.join(out_dir, "output_scales.safetensors"))
        return model
