"""Checkpoint plugin `hf_export`: the final model as an ordinary Hugging Face folder.

Writes config.json, generation_config.json, model.safetensors and the tokenizer into the folder the
engine stages atomically. (Periodic distributed checkpoints and resume come later.)
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class HFExportConfig:
    export_final: bool = True
    dirname: str = "final"  # inside the run directory


class HFExport:
    Config = HFExportConfig

    def __init__(self, config: HFExportConfig):
        self.cfg = config

    def export_final(self, model, tokenizer, out_dir: str) -> None:
        model.save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
