"""Config core: where the YAML lives, the resolvers it uses, the typed `train` section, and validation.

Validation runs on the composed config *before* Hydra creates a run directory, so a bad override costs
the user one line and leaves nothing on disk.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path
from typing import Any, Optional

from automodel import registry
from automodel.errors import UserError

RESOURCES = Path(__file__).parent / "resources"
CONFIG_NAME = "config"


def conf_dir() -> Path:
    """conf/ of an installed wheel (automodel/conf) or of a source checkout (repo-root conf/)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / f"{CONFIG_NAME}.yaml").is_file():
            return candidate
    raise RuntimeError(f"automodel's conf/ folder is missing next to {here}; the installation is broken")


@dataclasses.dataclass
class TrainConfig:
    """The training-loop contract; docs and later features rely on these names."""

    max_steps: int = 300
    global_batch_size: int = 16  # sequences per optimizer step, over all data-parallel ranks
    micro_batch_size: Optional[int] = None  # per rank per forward pass; null = global / dp (no accumulation)
    seq_len: int = 128  # longest sequence; longer examples are truncated (and counted)
    seed: int = 42
    log_every: int = 10  # the only steps that synchronise the host with the device
    max_grad_norm: float = 1.0  # 0 disables clipping
    max_bad_steps: int = 3  # consecutive skipped steps (non-finite loss/grad norm, spikes) before stopping
    spike_factor: Optional[float] = None  # opt-in: skip a step whose loss > factor x the recent median
    spike_window: int = 20  # applied steps the spike guard's median is taken over
    device: str = "auto"  # auto | cpu | cuda
    sample_prompts: int = 3  # greedy generations shown at the end of a run (0: none)
    val_every: int = 0  # steps between validations on the data's held-out part (0: off); val_loss in metrics
    peak_tflops: Optional[float] = None  # a device's dense peak for MFU; null: the known GPUs' table (none on a CPU)
    eval_every: int = 0  # steps between lm-eval runs (the `eval` section) on the model as trained so far (0: off)


TOP_LEVEL = ("train", "launcher", "moe", "eval", *registry.GROUPS)


# ---------------------------------------------------------------- resolvers
_STAMP = {"t": None}


def set_run_stamp(t: float) -> None:
    """Pin the time every rank uses for run-directory names (rank 0's, broadcast at start-up)."""
    _STAMP["t"] = t


def _stamp(fmt: str = "%Y-%m-%d_%H-%M-%S") -> str:
    if _STAMP["t"] is None:
        _STAMP["t"] = time.time()
    return time.strftime(fmt, time.localtime(_STAMP["t"]))


def _asset(rel: str) -> str:
    path = RESOURCES / rel
    if not path.exists():
        raise UserError(f"${{asset:{rel}}}: no such bundled resource under {RESOURCES}")
    return str(path)


def _held_out_split(split: str, *, _parent_) -> Optional[str]:
    """`data.val_split: ${held_out_split:validation}` (data=squad, data=hellaswag): the hub set's split, only where
    it can apply. One local file, or a folder holding one Dataset, has no splits; and data.val_path or
    data.val_size set by the user chooses the held-out data instead. Else `data.path=dev.json` stops on a split
    the user never asked for, and so does the advice `data.val_size=100`."""
    if _parent_.get("val_path") or _parent_.get("val_size"):
        return None
    path = os.path.expanduser(str(_parent_.get("path")))
    if os.path.isfile(path) or (os.path.isdir(path) and not os.path.isfile(os.path.join(path, "dataset_dict.json"))):
        return None
    return split


def register_resolvers() -> None:
    """`${asset:...}` names files shipped inside the package; `${stamp:fmt}` is a run time shared by all ranks;
    `${held_out_split:name}` is a data preset's held-out split where data.path has splits.

    Also registers the search-path plugin that adds installed plugin packages' YAML options."""
    from omegaconf import OmegaConf

    from automodel import searchpath

    searchpath.register()

    for name, fn in (("asset", _asset), ("stamp", _stamp), ("held_out_split", _held_out_split)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


# ---------------------------------------------------------------- validation
@dataclasses.dataclass
class Validated:
    train: TrainConfig
    plugins: dict[str, Any]  # group -> plugin instance
    launcher: Any = None  # automodel.launch.local.LauncherConfig
    moe: Any = None  # automodel.moe.config.MoEConfig
    eval: Any = None  # automodel.evaluation.config.EvalConfig


def validate(cfg) -> Validated:
    """Typed check of a composed config: every group names an installed plugin and its keys/types fit."""
    from omegaconf import OmegaConf

    unknown = [k for k in cfg.keys() if k not in TOP_LEVEL and k != "hydra"]
    if unknown:
        raise UserError(f"unknown top-level key '{unknown[0]}'; valid keys are: {', '.join(TOP_LEVEL)}")
    try:
        train_node = OmegaConf.to_container(cfg.get("train", {}), resolve=True)
    except UserError:
        raise
    except Exception as e:  # an interpolation that does not resolve
        raise UserError(f"train: {str(e).splitlines()[0]}") from None
    train = registry.validate(TrainConfig, train_node, "train")
    from automodel.launch.local import LauncherConfig

    launcher = registry.validate(LauncherConfig, OmegaConf.to_container(cfg.get("launcher", {})), "launcher")
    from automodel.moe.config import MoEConfig

    moe = registry.validate(MoEConfig, OmegaConf.to_container(cfg.get("moe", {})), "moe")
    for key in ("aux_loss_coef", "z_loss_coef", "bias_update_rate"):
        value = getattr(moe, key)
        if value is not None and not (value >= 0 and value < float("inf")):
            raise UserError(f"moe.{key}={value} must be a finite number >= 0 (0 turns it off)")
    from automodel.evaluation.config import EvalConfig, check as check_eval

    evaluation = registry.validate(EvalConfig, OmegaConf.to_container(cfg.get("eval", {}), resolve=True), "eval")
    check_eval(evaluation)
    plugins = {}
    for group in registry.GROUPS:
        try:
            if group in registry.LIST_GROUPS:
                plugins[group] = registry.instantiate_all(group, cfg.get(group))
            else:
                plugins[group] = registry.instantiate(group, cfg.get(group))
        except UserError:
            raise
        except Exception as e:  # interpolation errors and the like, still one line
            raise UserError(f"{group}: {str(e).splitlines()[0]}") from None
    _check_train(train)
    for plugin in plugins["logger"]:  # e.g. its package is not installed: said now, not after the model is built
        if hasattr(plugin, "check"):
            plugin.check()
    if train.eval_every:  # said now, not at the first evaluation
        from automodel.evaluation.harness import require_lm_eval

        require_lm_eval()
    return Validated(train, plugins, launcher, moe, evaluation)


def _check_train(t: TrainConfig) -> None:
    for key in ("max_steps", "global_batch_size", "micro_batch_size", "seq_len", "log_every"):
        if getattr(t, key) is not None and getattr(t, key) < 1:
            raise UserError(f"train.{key}={getattr(t, key)} must be at least 1")
    for key, off in (("val_every", "0 turns validation off"), ("eval_every", "0 turns evaluation off"),
                     ("sample_prompts", "0 shows none")):
        if getattr(t, key) < 0:
            raise UserError(f"train.{key}={getattr(t, key)} must be >= 0 ({off})")
    if not (t.max_grad_norm >= 0 and math.isfinite(t.max_grad_norm)):
        raise UserError(f"train.max_grad_norm={t.max_grad_norm} must be a finite number >= 0 (0: no clipping)")
    if t.max_bad_steps < 1:
        raise UserError(f"train.max_bad_steps={t.max_bad_steps} must be at least 1 (skipped steps in a row before "
                        "the run stops)")
    if t.spike_factor is not None and not (t.spike_factor > 1 and math.isfinite(t.spike_factor)):
        raise UserError(f"train.spike_factor={t.spike_factor} must be a finite number above 1 (e.g. 3.0), or null "
                        "(off)")
    if t.spike_window < 1:
        raise UserError(f"train.spike_window={t.spike_window} must be at least 1")
    if t.peak_tflops is not None and not (t.peak_tflops > 0 and math.isfinite(t.peak_tflops)):
        raise UserError(f"train.peak_tflops={t.peak_tflops} must be a positive number (a device's dense TFLOP/s, "
                        "e.g. 989 for an H100 in bf16), or null (the table of known GPUs)")
    if t.micro_batch_size is not None and t.micro_batch_size > t.global_batch_size:
        raise UserError(
            f"train.micro_batch_size={t.micro_batch_size} is larger than train.global_batch_size="
            f"{t.global_batch_size}; the micro batch is per rank, the global batch is per optimizer step"
        )
    if t.device not in ("auto", "cpu", "cuda"):
        raise UserError(f"train.device='{t.device}' is not one of: auto, cpu, cuda")


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")
