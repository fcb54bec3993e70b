"""`automodel plan OVERRIDES... plan.world_size=N [plan.gpu=h100]`: will this run fit, and what does it send?

Takes the same overrides as a training run. Builds the model on the meta device and lays it out with the run's
parallel plugin on a mesh of N ranks under torch's fake process group (no hardware, nothing allocated), counts
what the most loaded rank holds, adds activation and logits estimates (automodel/planning/estimate.py), and prints
per-rank memory by part, the communication of one optimizer step, whether it fits and, if not, the smallest
changes that would. plan.gpu=cpu plans for this machine's host memory.
"""

from __future__ import annotations

import os
import time

from automodel.errors import UserError

PLAN_KEYS = ("world_size", "gpu")


def _split(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    plan, rest = {}, []
    for arg in argv:
        if arg.startswith("plan."):
            key, sep, value = arg[len("plan."):].partition("=")
            if not sep or key not in PLAN_KEYS:
                raise UserError(f"'{arg}': plan takes plan.world_size=N and plan.gpu=NAME (one of "
                                f"{', '.join(_gpus())}), besides a run's overrides")
            plan[key] = value
        else:
            rest.append(arg)
    if "world_size" not in plan:
        raise UserError("automodel plan needs plan.world_size=N (the number of GPUs or processes to plan for)")
    try:
        plan["world_size"] = int(plan["world_size"])
    except ValueError:
        raise UserError(f"plan.world_size={plan['world_size']!r}: give a positive whole number of ranks") from None
    if plan["world_size"] < 1:
        raise UserError(f"plan.world_size={plan['world_size']}: give a positive whole number of ranks")
    gpu = plan.setdefault("gpu", "h100").lower()
    if gpu != "cpu" and gpu not in _gpus():
        raise UserError(f"plan.gpu={gpu!r} is not a GPU the planner knows; choose one of {', '.join(_gpus())}, or cpu "
                        "(this machine's host memory)")
    plan["gpu"] = gpu
    return plan, rest


def _gpus() -> list[str]:
    from automodel.planning.estimate import GPU_MEMORY_GIB

    return list(GPU_MEMORY_GIB)


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _rank_state(checked, dims, world: int, rank: int):
    """Lay the model out as rank `rank` of `world` would, under the fake process group; count what it holds."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore  # registers the "fake" backend

    from automodel.modules import language_layers, vision_layers
    from automodel.planning.layout import count

    p = checked.plugins
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        mesh = dims.build_mesh("cpu")
        model = p["peft"].apply(p["model"].build("meta"))
        totals = {id(q): q for q in model.parameters()}
        layers, model_cls = language_layers(model), type(model)  # (the layout changes the class in place)
        vision = vision_layers(model)
        if hasattr(p["loss"], "prepare"):
            p["loss"].prepare(model, p["model"].name)
        laid = p["parallel"].apply(model, mesh, dims, p["precision"].mixed_precision_policy())
        stage = ""
        if dims.pp > 1:
            stage = f"pipeline stage {rank // (world // dims.pp)} of {dims.pp}"
        state = count(laid, layers, rank, stage, vision)
        state.model_cls = model_cls
        state.total = sum(q.numel() for q in totals.values())
        state.total_trainable = sum(q.numel() for q in totals.values() if q.requires_grad)
        return state
    finally:
        dist.destroy_process_group()


def main(argv: list[str]) -> None:
    if argv in (["-h"], ["--help"]):
        print(__doc__.strip())
        return
    t0 = time.perf_counter()
    plan, overrides = _split(argv)
    from automodel.compose import compose
    from automodel.config import validate
    from automodel.engine.preflight import preflight
    from automodel.engine.run import check_layout
    from automodel.planning import estimate

    cfg = compose(overrides)
    checked = validate(cfg)
    world = plan["world_size"]
    dims, micro, accum = preflight(checked, world)
    p, t = checked.plugins, checked.train
    hf_config, _ = check_layout(checked, dims, accum)
    ranks = [0] if dims.pp == 1 else [0, (dims.pp - 1) * (world // dims.pp)]  # first and last stage differ
    states = [_rank_state(checked, dims, world, r) for r in ranks]
    step = _step(cfg, checked, dims, micro, accum, hf_config, states[0].model_cls)
    runtime = _resident_bytes() + estimate.CPU_TRAINER_EXTRA if plan["gpu"] == "cpu" else estimate.GPU_RUNTIME
    parts = [estimate.memory(s, step, runtime, pp_stage=i * (dims.pp - 1)) for i, s in enumerate(states)]
    worst = max(range(len(parts)), key=lambda i: estimate.peak(parts[i]))
    state, part = states[worst], parts[worst]
    peak = estimate.peak(part)
    if plan["gpu"] == "cpu":
        from automodel.engine.memory import available_host_bytes

        capacity, where = available_host_bytes() // max(1, min(world, os.cpu_count() or 1)), "host memory per rank"
    else:
        capacity, where = estimate.GPU_MEMORY_GIB[plan["gpu"]] * estimate.GiB, f"{plan['gpu']} memory"
    _print(p["model"].name, state, part, peak, capacity, where, dims, world, plan["gpu"], micro, accum, t, step,
           estimate.communication(state, step), time.perf_counter() - t0)
    if peak > capacity:
        ideas = estimate.suggestions(states, step, runtime, capacity, str(cfg.peft.plugin))
        print("does not fit. " + (f"Smallest changes that would: {'; '.join(ideas)}" if ideas else
                                  f"No change to the batch, loss or checkpointing fits it: shard over more ranks "
                                  f"(plan.world_size={2 * world}), or add tensor or pipeline parallel"))
    else:
        print(f"fits, with {(capacity - peak) / estimate.GiB:.1f} GiB to spare")


def _step(cfg, checked, dims, micro: int, accum: int, hf_config, model_cls):
    import torch

    from automodel.planning.activations import block_bytes
    from automodel.flops import _TOP_K_KEYS
    from automodel.moe.experts import num_routed_experts
    from automodel.planning.estimate import Step

    p = checked.plugins
    # the precision plugin's own policy says the dtype of compute and of FSDP's all-gathers (none: fp32)
    policy = p["precision"].mixed_precision_policy()
    compute = getattr(policy, "param_dtype", None) or torch.float32
    par = getattr(p["parallel"], "cfg", None)
    n_experts = num_routed_experts(hf_config) or 1
    top_k = next((getattr(hf_config, k) for k in _TOP_K_KEYS if isinstance(getattr(hf_config, k, None), int)), 1)
    tokens = -(-checked.train.seq_len // dims.cp)
    block = block_bytes(model_cls, hf_config, compute, micro, tokens, adapt=p["peft"].apply)
    width = torch.empty((), dtype=compute).element_size()
    return Step(micro_batch=micro, seq_len=checked.train.seq_len, micro_batches=accum,
                compute_bytes=width, gather_bytes=width,
                activation_checkpointing=getattr(par, "activation_checkpointing", "none"),
                loss=str(cfg.loss.plugin), chunk_tokens=getattr(getattr(p["loss"], "cfg", None), "chunk_tokens", None),
                loss_parallel=bool(getattr(par, "loss_parallel", False)), top_k=top_k, num_experts=n_experts,
                block_bytes=block, dims=dims,
                pp_schedule=getattr(par, "pp_schedule", "1f1b"))


def _print(name, state, part, peak, capacity, where, dims, world, gpu, micro, accum, t, step, comm, seconds) -> None:
    from automodel.planning.estimate import GiB

    print(f"plan: model '{name}' ({state.total / 1e9:.3f}B parameters, {state.total_trainable / 1e9:.3f}B trainable) "
          f"on {world} x {gpu}; layout {dims.describe()}; global batch {t.global_batch_size} = {micro} micro x "
          f"{dims.dp} dp x {accum} accumulation; seq_len {t.seq_len}; activation checkpointing "
          f"{step.activation_checkpointing}; loss {step.loss}")
    who = f"rank {state.rank}" + (f" ({state.stage})" if state.stage else "")
    print(f"per-rank memory, {who}, the most loaded: holds {state.params / 1e6:,.1f}M parameters "
          f"({100 * state.params / max(state.total, 1):.2f}% of the model), {len(state.layers)} decoder blocks"
          + (f" (language model; {len(state.vision_layers)} vision blocks train)" if state.vision_layers else ""))
    if state.vision_hidden:  # an image-text model
        from automodel.planning.estimate import vision_activations

        if not state.vision_layers:
            print("  (the vision tower is frozen: it saves no activations; the language model's are counted)")
        elif state.vision_tokens is None:
            print(f"  ({len(state.vision_layers)} vision blocks train, but the config gives no image size: their "
                  "activations are not counted)")
        else:
            print(f"  (activations include {vision_activations(state, step) / GiB:.2f} GiB for {len(state.vision_layers)} "
                  f"training vision blocks: one {state.vision_tokens}-patch image per sample)")
    width = max(len(k) for k in part)
    for key, value in part.items():
        print(f"  {key:<{width}}  {value / GiB:9.2f} GiB")
    print(f"  {'peak':<{width}}  {peak / GiB:9.2f} GiB of {capacity / GiB:.1f} GiB {where} (gradients and "
          "activations are not held at once: the larger counts)")
    if comm:
        total = sum(comm.values())
        print(f"communication per optimizer step, this rank sends {total / GiB:.2f} GiB: " +
              ", ".join(f"{k} {v / GiB:.2f} GiB" for k, v in comm.items()))
    else:
        print("communication per optimizer step: none (one rank holds everything)")
    print(f"(planned in {seconds:.1f}s under torch's fake process group: parameters counted on the real layout, "
          "activations and logits estimated)")
