"""What each plugin group must implement: the whole contract between the engine and its plugins.

A plugin is a class with a nested dataclass `Config` (its typed config; the registry validates the YAML
node against it, minus its `plugin` key) and an `__init__(self, config)` taking an instance of it. The
engine only calls the methods and reads the attributes below (those marked optional only when the plugin
has them), only with the small objects named here; plugins never import each other. docs/plugins.md
explains each group, and plugins/automodel-example-plugin has a worked example of each.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch
    from torch import nn

    from automodel.batch import StepBatch
    from automodel.distributed.parallel_dims import ParallelDims


@runtime_checkable
class ModelPlugin(Protocol):
    """Optional: `weights(skeleton) -> source | None`, the pretrained weights to fill the meta-device `skeleton`
    with (None: random init). A source has `keys() -> set[str]` (the tensor names it holds, as the plain HF
    model names them), `get(name) -> Tensor` (that whole tensor), `describe() -> str` (for messages) and
    `close()`; optionally `shape(name)`, `reads_blocks(name)` and `get(name, region)` to read only a rank's
    block of a sharded tensor. See automodel/model/hf_weights.py. Without `weights`, the engine initializes
    every module with the model's own `_init_weights`, seeded by (train.seed, module name)."""

    @property
    def name(self) -> str:
        """What the log calls the model (e.g. its path or architecture)."""

    def hf_config(self) -> Any:
        """The transformers `PretrainedConfig` (cheap: no weights); its fields go into the resume fingerprint."""

    def tokenizer(self) -> Any:
        """A transformers tokenizer, saved with every export."""

    def build(self, device: "torch.device | str") -> "nn.Module":
        """A transformers causal-LM `PreTrainedModel` (forward returns `.logits`; `save_pretrained`,
        `_init_weights`, `tie_weights`; `_no_split_modules` names its decoder blocks).

        The engine only ever asks for device "meta": a weightless skeleton, used for sizing, training (the
        engine materializes each rank's shards itself) and export. On a real device: the model with its
        initial weights (pretrained, or random from the current RNG state)."""


@runtime_checkable
class ParallelPlugin(Protocol):
    """Optional: `hints(dims, hf_config) -> automodel.distributed.parallel_dims.ParallelHints`, what the training
    step must do for the layout and model (global position_ids, sequence padding, loss_parallel context, CP split,
    pipeline).

    Optional, needed when its hints say `pipeline`: `pipeline(mesh, dims, device, n_microbatches, loss_fn, model,
    defer_last_stage=False)`, called after `apply` returned `model`, returning an object with
    `run(input_ids, labels, train=True) -> list[Tensor]` (one forward/backward of the whole local batch through
    the schedule; the micro-batch losses on the rank that holds the last stage, [] elsewhere) and
    `n_microbatches`. With `defer_last_stage` (a distillation teacher; `loss_fn` None): `forward_to_last(input_ids)
    -> list[Tensor]` (forward only, the last stage's input per micro-batch on the rank holding it) and
    `run_last(received) -> logits`."""

    def dims(self, world_size: int) -> "ParallelDims":
        """Mesh sizes for this world size (`ParallelDims.infer(world_size, ...)`); raises UserError for layouts
        that cannot work. Called before any rank starts, so it must not need torch.distributed."""

    def check_model(self, dims: "ParallelDims", hf_config: Any) -> None:
        """Refuse (UserError) model/layout combinations before any weights are built."""

    def apply(self, model: "nn.Module", mesh: Any, dims: "ParallelDims", mp_policy: Any) -> "nn.Module":
        """Parallelize the meta-device model in place (TP -> CP -> AC -> compile -> FSDP) and return the model
        to train: under a pipeline, this rank's part of it (its parameters under the model's own names).
        `mesh` is the DeviceMesh `dims.build_mesh` made; `mp_policy` the precision plugin's
        `mixed_precision_policy()` (for `fully_shard`). Modules it creates must hold no tensors of their own:
        the engine fills the tensors of the modules it named before the layout. Called a second time, after the
        student's, for a distillation teacher (frozen): its forward must see the same per-step state (the CP
        split of the sequence)."""


@runtime_checkable
class DataPlugin(Protocol):
    """A `StepBatch` (automodel.batch) is this rank's share of one global batch: `micro_batches`, a list of
    dicts of int64 tensors [rows, width] (`input_ids`, `labels`, and optionally `position_ids` for packed
    rows; every key but `labels` is passed to the model), plus host ints `num_target_tokens` (labels that
    are not -100, for the global loss normalization) and `num_tokens` (for throughput). Labels are already
    shifted (`labels[:, i]` is the token after `input_ids[:, i]`) and -100 (`automodel.batch.IGNORE_INDEX`)
    where there is no loss: prompt, padding. `automodel.batch.step_batch(examples, micro_batch_size, pad_id)`
    builds one from (input_ids, labels) lists; `automodel.sampling.GlobalBatchSampler(n, global_batch_size,
    seed).rank_indices(step, dp_rank, dp_size, micro_batch_size)` picks a rank's examples of a step.

    Optional: `val_batches(tokenizer, *, seq_len, dp_rank, dp_size, micro_batch_size) -> list[StepBatch] | None`,
    this rank's share of the held-out data (every rank the same number of forward passes), used every
    train.val_every steps; None when the data has no held-out part (train.val_every > 0 is then refused)."""

    def build(self, tokenizer: Any, *, seq_len: int, seed: int, dp_rank: int, dp_size: int,
              global_batch_size: int, micro_batch_size: int, start_step: int = 0) -> "Iterator[StepBatch]":
        """An endless iterator of StepBatch, one per optimizer step, the first being the batch that follows
        `start_step` completed steps (0, or the resumed checkpoint's step). Each holds this rank's
        global_batch_size / dp_size rows, in micro-batches of micro_batch_size rows; a row holds at most
        seq_len tokens (padding aside). The batches of a step must depend only on (seed, step), so a
        resumed run that starts at step k sees exactly what an uninterrupted run saw at step k. The engine
        takes the first item at once, before building the model: refuse bad data there (UserError)."""

    def sample_prompts(self, n: int) -> list[tuple[str, str]]:
        """Up to n (prompt, expected completion) string pairs, tried on the exported model after training
        (greedy, the prompt tokenized without special tokens after a bos); [] for none. Must not fail."""


@runtime_checkable
class PeftPlugin(Protocol):
    """Optional: `init_module(name, module) -> bool`, initialize the module the plugin added (a full-size,
    unsharded copy of it, `name` as the plain model names it) and return True; False leaves it to the model's
    own `_init_weights`. `after_materialize(model)`: once every rank holds its shards, set what depends on the
    base weights (DoRA's magnitudes: from the rows a rank holds). `finish_module(name, module)`: called on each
    module as soon as its own tensors hold their values (QLoRA: quantize a base layer to 4 bits), and on the meta
    skeletons used for sizing and checkpoint templates (then it must only change shapes); with it, an unsharded
    model is allocated one module at a time. `check_layout(dims)`: refuse (UserError) a layout the adapters cannot
    serve, before anything is built."""

    def apply(self, model: "nn.Module") -> "nn.Module":
        """Adapt the (meta-device) model: freeze the base, add adapters; identity for full fine-tuning.
        Also applied to the skeletons used for sizing and export, so it must be deterministic."""

    def export(self, model: "nn.Module", full_state_dict: dict, out_dir: str) -> "nn.Module":
        """On rank 0, with an unsharded copy of the trained model (`apply` already run on it, the weights
        in `full_state_dict`): write adapter files (if any) to out_dir and return a plain HF model to export."""


@runtime_checkable
class PrecisionPlugin(Protocol):
    """Optional: `loss_scale()`, a fresh `automodel.loss_scale.DynamicLossScale` (fp16): backward then runs on the
    loss times its value, gradients are unscaled before clipping, and overflowing steps are skipped.
    `check_device(device_type, dims)`: refuse (UserError) where it cannot run, before any model is built.
    `prepare(model)`: adapt the meta-device model before the layout, keeping every parameter name (fp8: torchao's
    Float8Linear in the decoder blocks)."""

    def autocast(self, device_type: str) -> contextlib.AbstractContextManager:
        """The context every forward pass and its loss run under; device_type is "cpu" or "cuda"."""

    def mixed_precision_policy(self) -> Any:
        """FSDP2 `MixedPrecisionPolicy`, or None for full precision (handed to the parallel plugin's apply)."""


@runtime_checkable
class CheckpointPlugin(Protocol):
    """`state` is the engine's TrainState: model, optimizer, scheduler, fingerprint (a JSON-able dict of what a
    resumed run must share with the saved one: architecture, peft, optimizer, data, seed, global batch,
    seq_len), config_yaml (the resolved config, kept with each checkpoint) and export_hf (collective:
    folder -> an HF folder of the current model written there).

    Optional: `save_now(step, state, run_dir)`, collective: `step` saved and committed before it returns, and
    the folder (the checkpoint a stop signal asks for: SLURM's warning, Ctrl-C, SIGTERM; without it SLURM's
    warning is not handled, and Ctrl-C/SIGTERM stop the run with nothing saved). A SLURM job requeued
    after a preemption gets `checkpoint.resume=auto` when the config has a `resume` key: accept `auto` as
    "the latest checkpoint of this run directory"."""

    cfg: Any
    """The plugin's config; the engine reads `cfg.export_final` (bool: write the final HF folder) and
    `cfg.dirname` (str: that folder's name inside the run directory)."""

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
        """On rank 0: write an HF folder (config, safetensors, tokenizer) that transformers loads into out_dir
        (a staging folder the engine renames into place). `model` is plain, unsharded, fp32: what the peft
        plugin's export returned."""


@runtime_checkable
class LossPlugin(Protocol):
    """How a micro-batch's token-sum loss comes out of the model. Optional: `check_layout(dims, hints)`, refuse
    (UserError) a layout it cannot work under, before anything is built; `prepare(model, model_name)`, adapt the
    meta-device model after peft and before the layout (e.g. swap its output head: automodel/head_loss.py).
    `returns_logits = False`: the model hands back the loss, not logits (a distillation teacher is then refused
    unless `distills_in_head = True`: `targets(labels, teacher)` takes the teacher's
    `automodel.head_loss.TeacherChunks`, `token_loss` returns the blended objective, and `distill_parts()` its
    (CE, KD) token sums)."""

    def targets(self, labels: "torch.Tensor") -> contextlib.AbstractContextManager:
        """The context the model's forward runs under (the labels handed to a head that computes the loss)."""

    def token_loss(self, logits: "torch.Tensor", labels: "torch.Tensor") -> "torch.Tensor":
        """The sum over target tokens (labels != -100) of the loss, from what the model returned as `.logits`."""


@runtime_checkable
class TeacherPlugin(Protocol):
    """Distillation. `enabled` False (the `none` plugin) is all the engine reads of a run without a teacher.
    Enabled, it also has `model`, a model plugin instance (ModelPlugin above: the engine builds, lays out and
    loads it like the student, frozen), and `kd_ratio` (float in [0, 1]): the step trains
    (1 - kd_ratio) x CE + kd_ratio x token_loss(...), normalized like the CE, and logs both parts."""

    enabled: bool

    def token_loss(self, student_logits: "torch.Tensor", teacher_logits: "torch.Tensor",
                   labels: "torch.Tensor") -> "torch.Tensor":
        """The distillation term's sum over target tokens (logits as the model returned them: vocab-sharded
        DTensors under tensor parallelism's loss_parallel)."""


@runtime_checkable
class OptimPlugin(Protocol):
    def build(self, params: list, max_steps: int) -> tuple[Any, Any]:
        """(a torch.optim.Optimizer over `params` (the trainable ones, possibly DTensors), an LR scheduler
        stepped once per optimizer step); both need state_dict/load_state_dict for checkpoints.
        `automodel.optim.schedule.warmup_cosine_scheduler` is the shared warmup + cosine shape."""


@dataclasses.dataclass(frozen=True)
class RunInfo:
    """What a logger is told when a run starts (rank 0 only)."""

    run_dir: str  # the run's folder: where a logger keeps its files and the ids that let a resumed run continue
    config: dict  # the resolved config, secrets masked (automodel.secrets): the run's config for the logger
    start_step: int  # 0, or the checkpoint step a resumed run continues from (its earlier lines after it are redone)
    name: str | None  # a sweep point's overrides (e.g. "optim.lr=0.001"); None for a plain run
    group: str | None  # the sweep's folder for a sweep's runs (they belong together); None for a plain run


@runtime_checkable
class LoggerPlugin(Protocol):
    """Where each logged step goes. Several run at once (`logger=[jsonl,wandb]`), on rank 0 only. A plugin with
    `background = True` is called on a thread of its own (imports, network, files: never the training loop's
    time); its failure after start is a warning and the run goes on without it. Optional: `check()`, refuse
    (UserError) before anything is built, e.g. its package is not installed (name the install command)."""

    def start(self, run: RunInfo) -> None:
        """Open (or, for a resumed run, reopen) the run's record."""

    def log(self, record: dict) -> None:
        """One logged step: `step` and the metrics (floats; strings such as `skipped`; None for non-finite)."""

    def finish(self, ok: bool) -> None:
        """Close; `ok` False when the run stopped on an error."""
