"""What the engine hands the checkpoint plugin: the training state, and the run's fingerprint.

The fingerprint names what a resumed run must share with the run that saved the checkpoint: the model's
architecture, the PEFT setup, the optimizer, and what fixes the batch of every step (data, seed, global
batch, sequence length). The layout (parallel), micro-batch size, precision, max_steps and logging may
differ: a checkpoint reshards onto any mesh.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

# config.json keys that say how a model runs, not what it is
_RUNTIME_KEYS = {"_attn_implementation", "_attn_implementation_autoset", "attn_implementation", "use_cache",
                 "transformers_version", "dtype", "torch_dtype", "_name_or_path", "architectures", "output_attentions",
                 "output_hidden_states", "return_dict", "_commit_hash"}


@dataclasses.dataclass
class TrainState:
    model: Any
    optimizer: Any
    scheduler: Any
    fingerprint: dict
    config_yaml: str  # the resolved config, stored with every checkpoint (for `automodel export`)
    export_hf: Any = None  # collective: folder -> an HF folder of the current model written there (rank 0)
    extra: Any = None  # an object with state_dict() -> JSON-able dict and load_state_dict(dict): the loop's own
    #                    state a resumed run must share (the step guard's), saved with every checkpoint


def fingerprint(cfg, hf_config) -> dict:
    from omegaconf import OmegaConf

    arch = {k: v for k, v in hf_config.to_dict().items() if k not in _RUNTIME_KEYS}
    data = {k: v for k, v in OmegaConf.to_container(cfg.data, resolve=True).items() if k != "val_path"}
    train = {k: cfg.train[k] for k in ("seed", "global_batch_size", "seq_len")}
    fp = {"model": arch, "peft": OmegaConf.to_container(cfg.peft, resolve=True), "optim": cfg.optim.plugin,
          "data": data, "train": train}
    return json.loads(json.dumps(fp, default=str))  # what the JSON file will hold, so comparisons are like for like


def trim_metrics(out_dir: str, step: int) -> None:
    """Resuming in the same run dir: drop metrics.jsonl lines past the checkpoint (they are trained again)."""
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = [ln for ln in f if ln.strip()]
    kept = [ln for ln in lines if json.loads(ln).get("step", 0) <= step]
    if len(kept) != len(lines):
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(kept)
