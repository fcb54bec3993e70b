"""What each plugin group must implement: the whole contract between the engine and its plugins.

A plugin is a class with a nested dataclass `Config` (its typed config; the registry validates the YAML
node against it) and an `__init__(self, config)`. The engine only calls the methods below, only with the
small objects named here; plugins never import each other. See docs/plugins.md for a worked example.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch
    from torch import nn

    from automodel.data.batch import StepBatch
    from automodel.distributed.parallel_dims import ParallelDims


@runtime_checkable
class ModelPlugin(Protocol):
    def hf_config(self) -> Any:
        """The transformers `PretrainedConfig` (cheap: no weights)."""

    def tokenizer(self) -> Any:
        """A transformers tokenizer, saved with every export."""

    def build(self, device: "torch.device | str") -> "nn.Module":
        """The model with its initial weights (pretrained, or random from the current RNG state).

        On device "meta" it is a weightless skeleton, used for sizing and for export."""


@runtime_checkable
class ParallelPlugin(Protocol):
    """Optional: `hints(dims) -> automodel.distributed.parallel_dims.ParallelHints`, what the training step
    must do for the layout (global position_ids, sequence padding, loss_parallel context, CP split, pipeline).

    Optional, needed when its hints say `pipeline`: `pipeline(mesh, dims, device, n_microbatches, loss_fn)`,
    called after `apply`, returning an object with `run(input_ids, labels, train=True) -> list[Tensor]` (one
    forward/backward of the whole local batch through the schedule; the micro-batch losses on the rank that
    holds the last stage, [] elsewhere) and `n_microbatches`."""

    def dims(self, world_size: int) -> "ParallelDims":
        """Mesh sizes for this world size; raises UserError for layouts that cannot work."""

    def check_model(self, dims: "ParallelDims", hf_config: Any) -> None:
        """Refuse (UserError) model/layout combinations before any weights are built."""

    def apply(self, model: "nn.Module", mesh: Any, dims: "ParallelDims", mp_policy: Any) -> "nn.Module":
        """Parallelize in place (TP -> CP -> AC -> compile -> FSDP) and return the model to train: under a
        pipeline, this rank's part of it (its parameters under the model's own names)."""


@runtime_checkable
class DataPlugin(Protocol):
    """Optional: `val_batches(tokenizer, *, seq_len, dp_rank, dp_size, micro_batch_size) -> list[StepBatch] | None`,
    this rank's share of the held-out data (every rank the same number of forward passes), used every
    train.val_every steps; None when the data has no held-out part."""

    def build(self, tokenizer: Any, *, seq_len: int, seed: int, dp_rank: int, dp_size: int,
              global_batch_size: int, micro_batch_size: int, start_step: int = 0) -> "Iterator[StepBatch]":
        """An endless iterator over optimizer steps from `start_step` on; each item holds this rank's
        micro-batches. The batches of a step must depend only on (seed, step), so a resumed run that
        starts at step k sees exactly what an uninterrupted run saw at step k."""

    def sample_prompts(self, n: int) -> list[tuple[str, str]]:
        """Up to n (prompt, expected completion) pairs to demonstrate the trained model (may be empty)."""


@runtime_checkable
class PeftPlugin(Protocol):
    def apply(self, model: "nn.Module") -> "nn.Module":
        """Adapt the model (freeze the base, add adapters); identity for full fine-tuning."""

    def export(self, model: "nn.Module", full_state_dict: dict, out_dir: str) -> "nn.Module":
        """On rank 0: write adapter files (if any) to out_dir and return a plain HF model to export."""


@runtime_checkable
class PrecisionPlugin(Protocol):
    def autocast(self, device_type: str) -> contextlib.AbstractContextManager:
        """The context the forward pass runs under."""

    def mixed_precision_policy(self) -> Any:
        """FSDP2 `MixedPrecisionPolicy`, or None for full precision."""


@runtime_checkable
class CheckpointPlugin(Protocol):
    """`state` is the engine's TrainState: model, optimizer, scheduler, fingerprint (what a resumed run must
    share with the saved one: architecture, peft, optimizer, data, seed, global batch, seq_len) and
    config_yaml (the resolved config, kept with each checkpoint)."""

    def resume_point(self, run_dir: str, fingerprint: dict) -> Any:
        """Every rank, read-only, before the data loader and the model are built: the checkpoint to resume
        from (an object with `.step`), or None to start at step 0. Refuses (UserError, one line) a checkpoint
        of another model or config, and a missing or corrupt one."""

    def restore(self, point: Any, state: Any) -> int:
        """Collective, after the optimizer is built: load model, optimizer, LR schedule and RNG states on
        whatever mesh this run has (resharding as needed); return the step. Writes nothing."""

    def after_step(self, step: int, state: Any, run_dir: str) -> None:
        """Collective, after every optimizer step: save when due. A save is committed atomically."""

    def finish(self, state: Any, run_dir: str) -> None:
        """Collective, after the last step: wait for (and commit) a background save."""

    def export_final(self, model: "nn.Module", tokenizer: Any, out_dir: str) -> None:
        """On rank 0: write an HF folder (config, safetensors, tokenizer) that transformers loads."""


@runtime_checkable
class OptimPlugin(Protocol):
    def build(self, params: list, max_steps: int) -> tuple[Any, Any]:
        """(optimizer, LR scheduler stepped once per optimizer step)."""
