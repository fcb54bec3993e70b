"""The engine's order, written down once. Every rank runs this same function (SPMD).

 1. distributed init and ParallelDims -> DeviceMesh (layouts that cannot work are refused first)
 2. the model plugin's config; a memory check on a weightless (meta) skeleton
 3. the model on the meta device (no storage), then peft
 4. the parallel plugin lays it out on the mesh (TP -> CP -> AC -> compile -> FSDP); each rank then
    materializes only its own shards: random init streamed one module at a time (the same values on
    every layout), or the pretrained weights read one tensor at a time (materialize.py)
 5. optimizer and LR schedule; the data plugin's loader for this rank's data-parallel coordinate
 6. the loop: forward/backward, global-token loss normalization, clip, step, log
 7. export: the full state dict gathered on rank 0, written as an HF folder (+ PEFT adapter)
"""

from __future__ import annotations

import dataclasses
import logging
import time

from automodel.config import validate
from automodel.distributed import launch_env
from automodel.engine.preemption import SignalCheckpoint
from automodel.engine.preflight import preflight
from automodel.engine.step_guard import BadSteps, StepGuard
from automodel.errors import UserError
from automodel.stop_signals import Stopped

log = logging.getLogger("automodel")


@dataclasses.dataclass
class TrainResult:
    records: list[dict]  # what metrics.jsonl holds
    final_dir: str | None
    model: object  # the trained (possibly sharded) model, for in-process callers such as tests
    tokenizer: object
    preempted_at: int | None = None  # the step a preemption signal stopped the run at (its checkpoint's)

    @property
    def final_loss(self) -> float | None:
        return self.records[-1]["loss"] if self.records else None


def train(cfg, out_dir: str) -> TrainResult:
    from automodel import fs
    from automodel.launch import lifetime

    checked = validate(cfg)
    env = launch_env.init(checked.train.device, fake_world_size=checked.launcher.fake_world_size,
                          join_timeout_s=checked.launcher.join_timeout_s)
    signals = SignalCheckpoint(out_dir, checked.train.max_steps)  # Ctrl-C/SIGTERM from here on: preemption.py
    opened = []  # the run's loggers, once started: closed as failed if anything below raises
    try:
        rehearsal = checked.launcher.fake_world_size > 0  # one real process: nothing to tell other ranks
        lifetime.acquire_for_job(out_dir, env.is_main, 1 if rehearsal else env.world_size)
        result = _train(cfg, checked, env, out_dir, opened, signals)
    except BaseException as e:
        for loggers in opened:  # wandb/MLflow runs are marked failed; every line already logged is kept
            loggers.close(ok=False)
        launch_env.shutdown()
        refused = isinstance(e, UserError) and not isinstance(e, lifetime.RunDirBusy)
        if (refused or isinstance(e, Stopped)) and env.world_size == 1:  # stopped before it began writing: the
            fs.undo(out_dir)  # folder as the invocation found it (fs.undo), while still holding its lock
        lifetime.release(out_dir, refused=refused)
        signals.close()
        ended = signals.ending(e)  # after a stop signal: the stop, said once
        if ended is e:
            raise
        raise ended from None
    lifetime.release(out_dir)
    launch_env.shutdown(clean=result.preempted_at is None)  # a preempted rank 0 has exited to requeue
    signals.close()
    signals.end()  # stopped by Ctrl-C/SIGTERM: one line, and the process ends with 128+signal
    return result


def _train(cfg, checked, env, out_dir: str, opened: list, signals: SignalCheckpoint) -> TrainResult:
    import torch

    from automodel.engine import checkpointing, export, loggers, metrics, run_dir, teacher, validate
    from automodel.engine.loop import StepRunner, run_loop
    from automodel.engine.materialize import canonical_names, finished, hf_init, materialize, zero_init
    from automodel.engine import memory
    from automodel.engine.memory import check_fits
    from automodel.engine.throughput import Throughput
    from automodel.flops import flops_per_token, peak_tflops
    from automodel.modules import count_params, tensor_bytes
    from automodel.moe.router import RouterLosses

    t, p = checked.train, checked.plugins
    if not env.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    rehearsal = checked.launcher.fake_world_size > 0
    if rehearsal:
        torch.set_flush_denormal(True)  # fake collectives leave garbage in their outputs; denormals would crawl
        log.warning("rehearsal: rank 0 of %d under torch's fake process group: real shapes and memory for one rank, "
                    "losses without meaning; no checkpoint and no export are written", env.world_size)

    run_loggers = None
    if env.is_main:  # wandb/TensorBoard/MLflow: their own process imports them while this one sets up
        chosen = p["logger"] if not rehearsal else [q for q in p["logger"] if not getattr(q, "background", False)]
        run_loggers = loggers.RunLoggers(chosen)
        opened.append(run_loggers)

    # 1. layout
    dims, micro, accum = preflight(checked, env.world_size)
    hf_config, hints = check_layout(checked, dims, accum)
    if hasattr(p["precision"], "check_device"):  # e.g. float8 matmuls: the GPU generation, the package
        p["precision"].check_device(env.device.type, dims)

    # 2. will it fit? (a weightless skeleton, adapted by peft so trainable counts are right)
    skeleton = p["peft"].apply(p["model"].build("meta"))
    total, trainable = count_params(skeleton)
    largest = max((q.numel() for q in skeleton.parameters()), default=0)
    throughput = Throughput(flops_per_token(skeleton, hf_config, t.seq_len), env.world_size, env.device,
                            peak_tflops(env.device, str(cfg.precision.plugin), t.peak_tflops))
    weight_bytes = tensor_bytes(finished(skeleton, p["peft"]))  # as materialized: e.g. QLoRA's 4-bit base layers
    del skeleton
    # a teacher's frozen weights count like the student's, without grads or optimizer state
    teacher_skeleton = p["teacher"].model.build("meta") if p["teacher"].enabled else None  # checked, then laid out
    frozen_teacher = count_params(teacher_skeleton)[0] if teacher_skeleton is not None else 0
    check_fits(total + frozen_teacher, trainable, dims, device_type=env.device.type, model_name=p["model"].name,
               largest_tensor=largest, weight_bytes=weight_bytes + 4 * frozen_teacher)
    tokenizer = p["model"].tokenizer()
    if hasattr(p["data"], "use_processor"):  # e.g. data=vlm: images go through the model's own processor
        p["data"].use_processor(p["model"].processor() if hasattr(p["model"], "processor") else None)
    saved_with_model = export.preprocessor(p["model"])  # the processor of an image-text model, else the tokenizer
    mesh = dims.build_mesh(env.device.type)
    dp_rank, dp_size = dims.dp_coordinate(mesh)
    fingerprint = checkpointing.fingerprint(cfg, hf_config)
    resume = None if rehearsal else p["checkpoint"].resume_point(out_dir, fingerprint)  # refuses a foreign one
    start = resume.step if resume else 0
    batches = p["data"].build(tokenizer, seq_len=t.seq_len, seed=t.seed, dp_rank=dp_rank, dp_size=dp_size,
                              global_batch_size=t.global_batch_size, micro_batch_size=micro,
                              start_step=start)
    first = next(batches)  # fail on bad data before spending time on the model
    if hints.packing_refused_by and any("position_ids" in m for m in first.micro_batches):
        raise UserError(f"{hints.packing_refused_by} does not support packed sequences; turn packing off "
                        "(data.packing=false)")
    val = validate.batches(p["data"], tokenizer, t, dp_rank, dp_size, micro)

    if run_loggers is not None:  # the data is good: wandb/MLflow open their runs while the model is built
        run_loggers.start(loggers.run_info(cfg, out_dir, start))

    # 3-4. model, peft, layout: all on the meta device; then each rank materializes only its own shards
    torch.manual_seed(t.seed)  # dropout and anything else random in training: the same on every layout
    model = p["model"].build("meta")
    base_keys = set(model.state_dict())  # what pretrained weights must provide (adapters are not in them)
    source = p["model"].weights(model) if hasattr(p["model"], "weights") else None
    model = p["peft"].apply(model)
    if p["teacher"].enabled:
        teacher.check(p["teacher"], p["loss"], p["parallel"], dims, model, teacher_skeleton, p["model"].name)
    if hasattr(p["loss"], "prepare"):  # e.g. the loss computed inside the output head (same parameters)
        p["loss"].prepare(model, p["model"].name)
    if hasattr(p["precision"], "prepare"):  # e.g. float8 linear layers (same parameters), before the layout
        p["precision"].prepare(model)
    model.train()
    router = RouterLosses.attach(model, hf_config, checked.moe)  # None for a dense model
    if router is not None:
        token_mesh = dims.token_mesh(mesh)
        router.bind(_group(token_mesh), token_mesh.size() if token_mesh is not None else 1)
    names = canonical_names(model)
    model = p["parallel"].apply(model, mesh, dims, p["precision"].mixed_precision_policy())
    inits = [p["peft"].init_module] if hasattr(p["peft"], "init_module") else []
    inits = [zero_init] if rehearsal else [*inits, hf_init(model)]  # a rehearsal's values mean nothing: skip the RNG
    materialize(model, names, env.device, seed=t.seed, inits=inits, source=source, base_keys=base_keys,
                finish=getattr(p["peft"], "finish_module", None))  # e.g. QLoRA: quantize each base layer once filled
    if source is not None:
        source.close()
    if hasattr(p["peft"], "after_materialize"):  # adapters whose start depends on the base weights (DoRA)
        p["peft"].after_materialize(model)
    distiller = None
    if p["teacher"].enabled:  # the same parallel plugin: the teacher sees each step's inputs split as the student's
        distiller = teacher.build(p["teacher"], teacher_skeleton, p["parallel"], mesh, dims,
                                  p["precision"].mixed_precision_policy(), env.device, t.seed,
                                  lambda: p["precision"].autocast(env.device.type),
                                  in_head=getattr(p["loss"], "distills_in_head", False))
    memory.log_setup(model, env.device)

    # 5. optimizer
    params = [q for q in model.parameters() if q.requires_grad]
    optimizer, scheduler = p["optim"].build(params, t.max_steps)
    warmup = getattr(getattr(p["optim"], "cfg", None), "warmup_steps", 0) or 0
    if env.is_main and warmup >= t.max_steps:
        log.warning("optim.warmup_steps=%d is not shorter than train.max_steps=%d: the learning rate never reaches "
                    "optim.lr; lower optim.warmup_steps", warmup, t.max_steps)
    pp_group = mesh["pp"].get_group() if dims.pp > 1 else None  # pipeline stages: each holds part of the model
    loss_scale = p["precision"].loss_scale() if hasattr(p["precision"], "loss_scale") else None  # fp16
    guard = StepGuard(t.max_bad_steps, t.spike_factor, t.spike_window, loss_scale=loss_scale)
    state = checkpointing.TrainState(model, optimizer, scheduler, fingerprint, run_dir.resolved_config_yaml(cfg),
                                     export_hf=lambda folder: export.export_to(model, saved_with_model, p, folder,
                                                                               env, pp_group), extra=guard)
    if resume:  # before anything is written: a failed resume leaves the run dir as it was
        p["checkpoint"].restore(resume, state)
    if env.is_main and not rehearsal:  # the record matches the run: lines past where it starts are trained again
        checkpointing.trim_metrics(out_dir, start)
    if env.is_main and start >= t.max_steps:
        log.warning("this run already finished: its checkpoint is of step %d and train.max_steps=%d, so there is "
                    "nothing to train (raise train.max_steps to train on)", start, t.max_steps)

    if env.is_main:
        run_dir.begin(cfg, out_dir)  # .hydra/ and config.yaml: from here on the folder holds this run
        log.info("model %s: %.2fM parameters (%.2fM trainable); layout %s; %d rank(s); global batch %d = "
                 "%d micro x %d dp x %d accumulation; device %s", p["model"].name, total / 1e6, trainable / 1e6,
                 dims.describe(), env.world_size, t.global_batch_size, micro, dims.dp, accum,
                 env.device)

    # 6. loop
    step_args = (model, optimizer, scheduler, lambda: p["precision"].autocast(env.device.type), env.device,
                 t.max_grad_norm)
    step_kwargs = dict(dp_group=_group(dims.dp_mesh(mesh)), dp_size=dims.dp, hints=hints, router=router, guard=guard,
                       loss=p["loss"], teacher=distiller, loss_scale=loss_scale)
    if hints.pipeline:
        from automodel.engine.pipeline_step import PipelineStepRunner

        step = PipelineStepRunner(*step_args, **step_kwargs, seq_len=t.seq_len, micro_batch_size=micro,
                                  pp_group=pp_group)
        step.pipeline = p["parallel"].pipeline(mesh, dims, env.device, accum, step.micro_loss, model)
        if distiller is not None:  # the teacher's stages run forward only, its last stage micro-batch by micro-batch
            distiller.pipeline = p["parallel"].pipeline(mesh, dims, env.device, accum, None, distiller.model,
                                                        defer_last_stage=True)
    else:
        step = StepRunner(*step_args, **step_kwargs)
    harness_eval = []  # lm-eval every train.eval_every steps, on an export of the model as trained so far
    if t.eval_every and not rehearsal:
        from automodel.engine.eval_every import HarnessEval

        harness_eval = [(t.eval_every, HarnessEval(checked.eval, state.export_hf, env.is_main, out_dir))]
    if run_loggers is not None:  # after the resume trimmed metrics.jsonl to its step
        run_loggers.open_record()
    progress = metrics.Progress(t.max_steps, enabled=env.is_main)
    ckpt = _NoCheckpoint() if rehearsal else p["checkpoint"]
    signals.arm(ckpt, alone=rehearsal or env.world_size == 1, unsaved="a rehearsal saves nothing" if rehearsal
                else f"checkpoint={cfg.checkpoint.plugin} saves no training state mid-run")

    def stop(s: int) -> bool:  # collective: did a stop signal (Ctrl-C, SIGTERM, SLURM's warning) reach any rank?
        return signals.stop_here(s, ckpt, state)

    t0 = time.perf_counter()
    try:
        records = run_loop(step, _chain(first, batches), t.max_steps, t.log_every, start_step=start,
                           periodic=[*validate.periodic(step, val, t.val_every), *harness_eval],
                           on_step=lambda s: (progress.advance(s), ckpt.after_step(s, state, out_dir)),
                           on_log=lambda r: (throughput.add(r), run_loggers and run_loggers.log(r), progress.logged(r)),
                           stop=stop)
    except BadSteps:
        ckpt.finish(state, out_dir)  # collective (every rank stops at the same step): commit a save in flight
        raise
    finally:
        progress.close()
        signals.training_over()
    ckpt.finish(state, out_dir)
    if run_loggers is not None:
        run_loggers.close(ok=True)
    if signals.preempted_at is not None:
        log.warning("preemption signal: saved a checkpoint of step %d; stopping here (the job is requeued and "
                    "resumes from it)", signals.preempted_at)
        signals.hand_over()  # submitit's handler: requeue (rank 0) and exit
        return TrainResult(records, None, model, tokenizer, preempted_at=signals.preempted_at)
    if signals.report is not None:  # Ctrl-C/SIGTERM stopped the loop (its step saved): train() says so
        return TrainResult(records, None, model, tokenizer)
    if env.is_main and records:
        log.info("trained %d steps in %.1fs; final loss %.4f", t.max_steps - start, time.perf_counter() - t0,
                 records[-1]["loss"])

    if rehearsal:
        memory.report_rehearsal(model, env.world_size, env.device)
        return TrainResult(records, None, model, tokenizer)

    # 7. export
    final_dir = export.export_final(model, saved_with_model, p, out_dir, env, pp_group)
    if env.is_main and final_dir and t.sample_prompts:
        export.show_samples(final_dir, p["data"].sample_prompts(t.sample_prompts))
    return TrainResult(records, final_dir, model, tokenizer)


class _NoCheckpoint:
    """A rehearsal's checkpoint plugin: its weights mean nothing, so nothing is saved."""

    def after_step(self, step, state, run_dir):
        pass

    def finish(self, state, run_dir):
        pass


def _chain(first, rest):
    yield first
    yield from rest



def check_layout(checked, dims, accum: int):
    """(the model's config, the layout's hints), or the one-line refusal of a model or layout the plugins cannot
    serve, before anything is built. Shared by training and `automodel plan` (which plans only what would run)."""
    p, t = checked.plugins, checked.train
    hf_config = p["model"].hf_config()
    p["parallel"].check_model(dims, hf_config)
    _check_seq_len(t.seq_len, hf_config, p["model"].name)
    hints = _hints(p["parallel"], dims, hf_config, t.seq_len, accum)
    if hasattr(p["loss"], "check_layout"):
        p["loss"].check_layout(dims, hints)
    if hasattr(p["peft"], "check_layout"):
        p["peft"].check_layout(dims)
    if hasattr(p["precision"], "check_layout"):  # e.g. Transformer Engine's fp8 state and activation recompute
        p["precision"].check_layout(dims, hints)
    return hf_config, hints


def _hints(parallel, dims, hf_config, seq_len: int, accum: int = 1):
    """The parallel plugin's ParallelHints (optional method); train.seq_len must split evenly under them,
    and a step must have the micro-batches the layout needs."""
    from automodel.distributed.parallel_dims import ParallelHints

    hints = parallel.hints(dims, hf_config) if hasattr(parallel, "hints") else ParallelHints()
    if seq_len % hints.seq_multiple:
        raise UserError(f"train.seq_len={seq_len} is not divisible by {hints.seq_multiple_reason} = "
                        f"{hints.seq_multiple}; pick a multiple of {hints.seq_multiple}")
    if accum < hints.min_microbatches:
        raise UserError(f"{hints.min_microbatches_reason} needs at least {hints.min_microbatches} micro-batches per "
                        f"step, but train.global_batch_size / (train.micro_batch_size x {dims.dp} data-parallel "
                        f"rank(s)) = {accum}; lower train.micro_batch_size or raise train.global_batch_size")
    return hints


def _check_seq_len(seq_len: int, hf_config, model_name: str) -> None:
    """A sequence longer than the model's positions would train on positions it never learned (or index past
    a learned table): refuse before anything is built."""
    limit = next((getattr(hf_config, k) for k in ("max_position_embeddings", "n_positions", "max_sequence_length")
                  if isinstance(getattr(hf_config, k, None), int)), None)
    if limit and seq_len > limit:
        raise UserError(f"train.seq_len={seq_len} is longer than model {model_name!r} can place ("
                        f"max_position_embeddings={limit}); use train.seq_len<={limit}")


def _group(mesh):
    return mesh.get_group() if mesh is not None else None
