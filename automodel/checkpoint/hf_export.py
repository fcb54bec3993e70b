"""Checkpoint plugin `hf_export`: the final model as an ordinary Hugging Face folder.

Writes config.json, generation_config.json, model.safetensors and the tokenizer into the folder the
engine stages atomically, and nothing else: no periodic checkpoints, no resume (the `dcp` plugin does both).
"""

from __future__ import annotations

import dataclasses

from automodel.checkpoint.files import refuse_foreign_outputs


@dataclasses.dataclass
class HFExportConfig:
    export_final: bool = True
    dirname: str = "final"  # inside the run directory


class HFExport:
    Config = HFExportConfig

    def __init__(self, config: HFExportConfig):
        self.cfg = config

    def resume_point(self, run_dir: str, fingerprint: dict):
        """Nothing to resume (this plugin never saves training state); a run dir holding another run's export
        is refused rather than overwritten at the end."""
        refuse_foreign_outputs(run_dir, "checkpoints", self.cfg.dirname, None, "null")
        return None

    def restore(self, point, state) -> int:
        raise AssertionError("hf_export has no resume points")

    def after_step(self, step: int, state, run_dir: str) -> None:
        pass

    def finish(self, state, run_dir: str) -> None:
        pass

    def export_final(self, model, tokenizer, out_dir: str) -> None:
        model.save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
