"""PEFT plugin `lora`: LoRA adapters through the `peft` library.

Training keeps peft's own `LoraModel` (so FSDP2 shards the frozen base and the adapters together, one
unit per decoder layer). Export writes the adapter in PEFT format (what `PeftModel.from_pretrained`
loads) under `adapter/`, and returns the merged model so the main export is an ordinary HF checkpoint.

Adapters are created on the meta device with the rest of the model and initialized by `init_module`,
one adapter matrix at a time (A as peft initializes it, B zero), so every layout starts from the same
adapters. Inits computed from the base weights (pissa, olora, loftq, ...) would need each whole base
matrix before sharding and are refused.

The hyper-parameters are checked when the config is validated (before a run directory exists), and the
target modules against the model as soon as the weightless skeleton is adapted: peft would otherwise
refuse them deep inside its injection with a traceback, or silently skip a misspelt name next to a right one.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
from typing import Any, Optional

from automodel.errors import UserError

log = logging.getLogger(__name__)

INITS = ("gaussian", "true", "default", "false")


@dataclasses.dataclass
class LoRAConfig:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: Any = "all-linear"  # a list of module names, or peft's for every linear layer but the output head
    init: str = "gaussian"  # peft `init_lora_weights`: gaussian | true (kaiming-uniform A) | false (A, B as peft leaves them)
    target_experts: bool = False  # MoE models: also adapt the routed experts and routers (peft's parameter targets)
    use_dora: bool = False  # DoRA: a learned magnitude per output row times the direction of W + BA
    quantize_base: Optional[str] = None  # nf4: QLoRA, the adapted base layers stored in 4 bits (bitsandbytes)
    double_quant: bool = True  # QLoRA: quantize the 4-bit blocks' scales too (~0.37 bits per parameter less)
    base_model_name_or_path: Optional[str] = None  # recorded in adapter_config.json (default: model.path)


class LoRA:
    Config = LoRAConfig

    def __init__(self, config: LoRAConfig):
        self.cfg = config
        if str(config.init).lower() not in INITS:
            raise UserError(f"peft.init={config.init!r}: choose one of {', '.join(INITS)} (inits computed from the base "
                            "weights, such as pissa or olora, need each whole base matrix and are not supported)")
        _check(config)
        config.target_modules = module_names(config.target_modules)
        if config.quantize_base:
            _require_bitsandbytes()

    def _init(self):
        return {"true": True, "default": True, "false": False}.get(str(self.cfg.init).lower(), "gaussian")

    def _peft_config(self, model=None):
        from peft import LoraConfig

        init = self._init()
        config = LoraConfig(
            r=self.cfg.r, lora_alpha=self.cfg.alpha, lora_dropout=self.cfg.dropout,
            target_modules=self.cfg.target_modules, init_lora_weights=init, task_type="CAUSAL_LM",
            use_dora=self.cfg.use_dora,
        )
        if model is not None and not self.cfg.target_experts:
            config = self._without_experts(config, model)
        if model is not None:
            frozen = _frozen_prefixes(model)
            if frozen:  # what the model plugin froze (an image-text model's vision tower, by default) stays as it is
                import re

                config.exclude_modules = rf"^({'|'.join(re.escape(p) for p in frozen)})(\..*)?$"
        return config

    @staticmethod
    def _without_experts(config, model):
        """peft (for transformers 5) turns the targets of an MoE model into parameter targets on its stacked
        experts and its router; resolved here the same way, and those dropped, so only the modules stay."""
        from automodel.moe.experts import experts_modules

        if not experts_modules(model):
            return config
        try:
            from peft.utils.transformers_weight_conversion import (
                convert_peft_config_for_transformers,
                get_model_conversion_mapping,
            )
        except ImportError:  # a peft without transformers-5 conversions targets no parameters on its own
            return config
        import copy

        resolved = copy.deepcopy(config)
        convert_peft_config_for_transformers(resolved, model=model, conversions=get_model_conversion_mapping(model))
        if not getattr(resolved, "target_parameters", None):
            return config
        config.target_modules = sorted(resolved.target_modules)
        return config

    def apply(self, model):
        from peft import get_peft_model

        _check_targets(self.cfg.target_modules, model)
        try:
            model = get_peft_model(model, self._peft_config(model))
        except ValueError as e:  # peft's words for targets (a pattern) that match nothing, or a layer it cannot adapt
            if "target" not in str(e).lower():
                raise
            raise UserError(f"peft.target_modules={self.cfg.target_modules!r}: {' '.join(str(e).split())[:300]}; "
                            f"the model's linear layers are: {', '.join(_linear_names(model))}") from None
        if self.cfg.quantize_base:
            from automodel.peft.nf4 import quantize_bases

            quantize_bases(model, self.cfg.double_quant)
        return model

    def finish_module(self, name: str, module) -> None:
        """QLoRA: a base layer is quantized as soon as it holds its values (also on meta, for sizing)."""
        if self.cfg.quantize_base and hasattr(module, "quantize_"):
            module.quantize_()

    def init_module(self, name: str, module) -> bool:
        """Initialize one adapter matrix (a full-size copy of it) as peft would; False for anything else."""
        import torch

        parts = name.split(".")
        if len(parts) >= 2 and parts[-2] == "lora_magnitude_vector":  # set from the base weight: after_materialize
            for p in module.parameters(recurse=False):
                torch.nn.init.ones_(p)
            return True
        if len(parts) < 2 or parts[-2] not in ("lora_A", "lora_B"):
            return False
        init = self._init()
        if init is False:  # peft keeps nn.Linear's default init for A and B
            module.reset_parameters()
        elif parts[-2] == "lora_B":
            for p in module.parameters(recurse=False):
                torch.nn.init.zeros_(p)
            return True
        elif init is True:
            torch.nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5))
        else:
            torch.nn.init.normal_(module.weight, std=1 / self.cfg.r)
        if init is not False and getattr(module, "bias", None) is not None:
            torch.nn.init.zeros_(module.bias)
        return True

    def check_layout(self, dims) -> None:
        if self.cfg.quantize_base and dims.world_size > 1:
            raise UserError(f"peft=qlora trains on one process only ({dims.describe()} asked for {dims.world_size} "
                            "ranks): FSDP2, TP and PP cannot shard bitsandbytes' 4-bit weights; use peft=lora for "
                            "multi-rank layouts, or one GPU for QLoRA")
        if self.cfg.use_dora and (dims.tp > 1 or dims.pp > 1):
            raise UserError(f"peft.use_dora=true under {'tensor' if dims.tp > 1 else 'pipeline'} parallelism is not "
                            "supported (DoRA's weight norm needs whole rows of each adapted weight); use fsdp2/hsdp or "
                            "plain LoRA (peft.use_dora=false)")

    def after_materialize(self, model) -> None:
        """DoRA: each magnitude starts as the row norms of its base weight (B = 0, so W + BA = W), taken from the
        rows this rank holds: FSDP2 splits a weight and its magnitude vector into the same row blocks."""
        if not self.cfg.use_dora:
            return
        import torch

        with torch.no_grad():
            for module in model.modules():
                vectors = getattr(module, "lora_magnitude_vector", None)
                if not vectors:
                    continue
                weight = _local(module.get_base_layer().weight)
                for layer in vectors.values():
                    magnitude = _local(layer.weight)
                    if magnitude.shape[0] != weight.shape[0]:
                        raise RuntimeError(f"DoRA magnitude rows {tuple(magnitude.shape)} do not match the weight "
                                           f"rows {tuple(weight.shape)} this rank holds")
                    magnitude.copy_(torch.linalg.vector_norm(weight.float(), dim=1).to(magnitude.dtype))

    def export(self, model, full_state_dict, out_dir):
        if self.cfg.quantize_base:  # adapters merge into the weights the base computed with: its NF4 values
            from automodel.peft.nf4 import dequantize_bases

            dequantize_bases(model)
        adapter_dir = os.path.join(out_dir, "adapter")
        base = self.cfg.base_model_name_or_path or model.peft_config["default"].base_model_name_or_path
        model.peft_config["default"].base_model_name_or_path = base
        model.save_pretrained(adapter_dir, state_dict=full_state_dict, safe_serialization=True)
        if not base:
            log.info("LoRA base weights were randomly initialised: the adapter (adapter/) needs the merged model "
                     "(or the same seed) to be meaningful")
        return model.merge_and_unload()


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def _check(c: LoRAConfig) -> None:
    """The ranges peft and torch accept, as one line naming the key (NaN fails every comparison)."""
    if c.use_dora and str(c.init).lower() == "false":
        raise UserError("peft.use_dora=true needs B = 0 at the start (peft.init=gaussian or true): DoRA's magnitude "
                        "starts as the norm of the base weight")
    if c.quantize_base not in (None, "nf4"):
        raise UserError(f"peft.quantize_base={c.quantize_base!r}: choose nf4 (QLoRA's 4-bit NormalFloat) or null")
    if c.quantize_base and c.use_dora:
        raise UserError("peft.use_dora=true with a 4-bit base (peft=qlora) is not supported; use peft=qlora or peft=dora")
    if c.quantize_base and c.target_experts:
        raise UserError("peft=qlora quantizes linear layers only; set peft.target_experts=false")
    if c.use_dora and c.target_experts:
        raise UserError("peft.use_dora=true adapts linear modules only; set peft.target_experts=false")
    if c.r < 1:
        raise UserError(f"peft.r={c.r} must be at least 1 (the adapter rank, e.g. 8 or 16)")
    if not (c.alpha > 0 and math.isfinite(c.alpha)):
        raise UserError(f"peft.alpha={c.alpha} must be a positive number (the scale is alpha / r; e.g. 2 x r)")
    if not (0 <= c.dropout < 1):
        raise UserError(f"peft.dropout={c.dropout} must be in [0, 1) (a probability; 0: off)")
    targets = c.target_modules
    ok = (isinstance(targets, str) and targets.strip()) or (
        isinstance(targets, (list, tuple)) and targets and all(isinstance(t, str) and t for t in targets))
    if not ok:
        raise UserError(f"peft.target_modules={targets!r} must be all-linear, a regular expression, or a non-empty "
                        "list of module names, e.g. [q_proj, v_proj]")


def module_names(targets):
    """`peft.target_modules=q_proj` as [q_proj]. peft reads a string as a regular expression that must match a
    module's whole dotted name (model.layers.0.self_attn.q_proj), so a bare name, the way every list entry is
    written, matched nothing, and the refusal listed that very name among the model's layers. A string that is
    a module name (letters, digits, _ and dots) is the one-element list it stands for: a name or a dotted
    suffix of one, as every list entry is read; all-linear and true patterns (.*, |, [...]) stay as written."""
    if isinstance(targets, str) and targets != "all-linear" and re.fullmatch(r"[A-Za-z_][\w.]*", targets):
        return [targets]
    return targets


def _linear_names(model) -> list[str]:
    import torch

    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})


def _check_targets(targets, model) -> None:
    """Every name of a list must name some module (peft's rule: the whole name or a dotted suffix of it)."""
    if isinstance(targets, str):
        return  # all-linear, or a pattern: peft checks that it matches something
    names = [n for n, _ in model.named_modules() if n]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise UserError(f"peft.target_modules: {', '.join(repr(t) for t in missing)} names no module of "
                        f"{type(model).__name__}; its linear layers are: {', '.join(_linear_names(model))} "
                        "(or use all-linear)")


def _require_bitsandbytes() -> None:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError("peft=qlora needs bitsandbytes, which is not installed: pip install 'automodel[qlora]' "
                        "(or pip install bitsandbytes)") from None


def _frozen_prefixes(model) -> list[str]:
    """The outermost modules all of whose parameters the model plugin froze (requires_grad=False before peft)."""
    out = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(p + ".") for p in out):
            continue
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params):
            out.append(name)
    return out
