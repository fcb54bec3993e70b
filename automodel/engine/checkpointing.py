"""What the engine hands the checkpoint plugin: the training state, and the run's fingerprint.

The fingerprint names what a resumed run must share with the run that saved the checkpoint, in two parts:
- `architecture`: the model's config.json fields (what the weights are); a checkpoint of another model never
  loads into this one;
- `settings`: every setting that changes the trajectory, by its config key (`optim.lr`, `train.seed`,
  `data.path`, ...): the optimizer and its schedule, what fixes the batch of every step (data, seed, global batch,
  sequence length), clipping, the loss, precision, PEFT, distillation, MoE losses, the model's weights and
  tokenizer. A resumed run that changes one is refused unless the user accepts it by name
  (`checkpoint.allow_changed`), and then the new value is the one used.
The layout (parallel), micro-batch size, max_steps, logging, validation and checkpointing may differ: a
checkpoint reshards onto any mesh, and a longer run continues on its own, longer schedule.
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


_TRAIN_KEYS = ("seed", "global_batch_size", "seq_len", "max_grad_norm")
_MODEL_KEYS = ("path", "revision", "tokenizer", "freeze")  # the rest of model.* is the architecture
_GROUPS = ("optim", "data", "peft", "loss", "precision", "teacher", "moe")
_NOT_TRAJECTORY = {"data.val_path"}  # held-out data: what validation reads, not what training does


def fingerprint(cfg, hf_config) -> dict:
    from omegaconf import OmegaConf

    def node(key):
        value = OmegaConf.select(cfg, key)
        return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value

    settings = {f"train.{k}": node(f"train.{k}") for k in _TRAIN_KEYS}
    settings.update({f"model.{k}": node(f"model.{k}") for k in _MODEL_KEYS})
    for group in _GROUPS:
        _flatten(node(group), group, settings)
    arch = {k: v for k, v in hf_config.to_dict().items() if k not in _RUNTIME_KEYS}
    fp = {"architecture": arch, "settings": {k: v for k, v in settings.items() if k not in _NOT_TRAJECTORY}}
    return json.loads(json.dumps(fp, default=str))  # what the JSON file will hold, so comparisons are like for like


def _flatten(value, key: str, into: dict) -> None:
    """Nested sections become dotted keys (teacher.model.path); lists and leaves are compared whole."""
    if isinstance(value, dict) and value:
        for k, v in value.items():
            _flatten(v, f"{key}.{k}", into)
    elif value is not None or "." in key:  # a group the config does not have is left out
        into[key] = value


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
