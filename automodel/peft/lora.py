"""PEFT plugin `lora`: LoRA adapters through the `peft` library.

Training keeps peft's own `LoraModel` (so FSDP2 shards the frozen base and the adapters together, one
unit per decoder layer). Export writes the adapter in PEFT format (what `PeftModel.from_pretrained`
loads) under `adapter/`, and returns the merged model so the main export is an ordinary HF checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Optional

log = logging.getLogger(__name__)


@dataclasses.dataclass
class LoRAConfig:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: Any = "all-linear"  # a list of module names, or peft's for every linear layer but the output head
    init: str = "gaussian"  # peft `init_lora_weights`: true|gaussian|pissa|olora|...
    base_model_name_or_path: Optional[str] = None  # recorded in adapter_config.json (default: model.path)


class LoRA:
    Config = LoRAConfig

    def __init__(self, config: LoRAConfig):
        self.cfg = config

    def _peft_config(self):
        from peft import LoraConfig

        init = True if self.cfg.init in ("true", "True", "default") else self.cfg.init
        return LoraConfig(
            r=self.cfg.r, lora_alpha=self.cfg.alpha, lora_dropout=self.cfg.dropout,
            target_modules=self.cfg.target_modules, init_lora_weights=init, task_type="CAUSAL_LM",
        )

    def apply(self, model):
        from peft import get_peft_model

        return get_peft_model(model, self._peft_config())

    def export(self, model, full_state_dict, out_dir):
        adapter_dir = os.path.join(out_dir, "adapter")
        base = self.cfg.base_model_name_or_path or model.peft_config["default"].base_model_name_or_path
        model.peft_config["default"].base_model_name_or_path = base
        model.save_pretrained(adapter_dir, state_dict=full_state_dict, safe_serialization=True)
        if not base:
            log.info("LoRA base weights were randomly initialised: the adapter in %s needs the merged model "
                     "(or the same seed) to be meaningful", adapter_dir)
        return model.merge_and_unload()
