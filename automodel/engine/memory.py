"""Will it fit? A refusal in one line before a model too large for this layout is materialized.

Every rank builds the model on the meta device and materializes only its own shards (materialize.py),
so what a rank holds is its share of the training state: fp32 weights (sharded by FSDP x TP x PP), and
for trainable parameters their gradients and AdamW's two moments, plus, during set-up, the largest
single tensor held whole. On CPU that is host memory, once per local rank; on a GPU it is device memory
and the host needs only the set-up overhead. Activations are not counted, so a run that passes can still
run out of memory on long sequences.
"""

from __future__ import annotations

import os

from automodel.errors import UserError

GiB = 1024**3
SETUP_OVERHEAD = int(1.5 * GiB)  # Python, torch, transformers and the set-up's bookkeeping per process


def available_host_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def per_rank_bytes(total: int, trainable: int, shard: int, weight_bytes: int | None = None) -> int:
    """Weights (fp32 unless `weight_bytes` says otherwise: a 4-bit base) + (grads + 2 AdamW moments) of the
    trainable part, over `shard` ways."""
    weights = total * 4 if weight_bytes is None else weight_bytes
    return (weights + trainable * 12) // max(shard, 1)


def check_fits(total: int, trainable: int, dims, *, device_type: str, model_name: str,
               largest_tensor: int = 0, weight_bytes: int | None = None) -> None:
    shard = dims.dp_shard * dims.cp * dims.tp * dims.pp  # every way FSDP, TP and PP split the weights
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    train = per_rank_bytes(total, trainable, shard, weight_bytes)
    quantized = weight_bytes is not None and weight_bytes < 3 * total  # e.g. QLoRA's 4-bit base
    setup = largest_tensor * 4 + SETUP_OVERHEAD
    need_host = local_ranks * ((train if device_type == "cpu" else 0) + setup)
    host = available_host_bytes()
    if host and need_host > host:
        raise UserError(
            f"model '{model_name}' ({total / 1e9:.2f}B parameters, {trainable / 1e9:.2f}B trainable) needs about "
            f"{need_host / GiB:.1f} GiB of host memory here ({local_ranks} local rank(s) x {train / GiB:.1f} GiB of "
            f"weights, grads and AdamW state over {shard}-way sharding{' on the CPU' if device_type == 'cpu' else ''} "
            f"+ set-up); {host / GiB:.1f} GiB is available. {_advice(total, trainable, shard, dims.world_size, local_ranks, quantized)}"
        )
    if device_type == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info()
        if train > free:
            raise UserError(
                f"model '{model_name}' needs about {train / GiB:.1f} GiB per GPU for weights, grads and AdamW state "
                f"over {shard}-way sharding; {free / GiB:.1f} GiB is free. {_advice(total, trainable, shard, 0, 0, quantized)}"
            )


def _advice(total: int, trainable: int, shard: int, world: int, local_ranks: int, quantized: bool = False) -> str:
    lora = "" if trainable < total else ", train adapters only (peft=lora)"
    if trainable < total and shard == 1 and not quantized:  # adapters on one process: the base can be 4-bit
        lora = ", store the base in 4 bits (peft=qlora)"
    if world and local_ranks >= world:  # every shard is on this host: more local ranks only add set-up copies
        return f"This host holds every rank's shard: add hosts or GPUs{lora}, or use a smaller model"
    return (f"Shard over more ranks (e.g. parallel=fsdp2 on {2 * shard} ranks halves the share){lora}, "
            "or use a smaller model")


def peak_host_bytes() -> int:
    """This process's peak resident memory so far (Linux: ru_maxrss is in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def shard_bytes(model) -> tuple[int, int, int]:
    """(bytes of parameters this rank holds, of those trainable, bytes of the whole model's parameters)."""
    seen, local, trainable, full = set(), 0, 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        t = p.to_local() if hasattr(p, "to_local") else p
        local += t.numel() * t.element_size()
        trainable += t.numel() * t.element_size() if p.requires_grad else 0
        full += p.numel() * p.element_size()
    return local, trainable, full


def log_setup(model, device) -> None:
    import logging

    local, _, full = shard_bytes(model)
    logging.getLogger("automodel").info(
        "set-up done: this rank holds %.1f MiB of parameters (%.1f%% of %.1f MiB); peak host memory so far %.2f GiB",
        local / 2**20, 100 * local / max(full, 1), full / 2**20, peak_host_bytes() / GiB)


def report_rehearsal(model, world_size: int, device) -> None:
    """What the rehearsal is for: rank 0's measured peak against the shard arithmetic."""
    import logging

    local, trainable, full = shard_bytes(model)
    state = local + trainable * 3  # weights + grads + two AdamW moments (fp32)
    line = (f"rehearsal of rank 0 of {world_size}: peak host memory {peak_host_bytes() / GiB:.2f} GiB; shard arithmetic: "
            f"{local / GiB:.2f} GiB of weights (1/{full / max(local, 1):.1f} of {full / GiB:.1f} GiB) + "
            f"{trainable * 3 / GiB:.2f} GiB grads and AdamW state = {state / GiB:.2f} GiB")
    if getattr(device, "type", "cpu") == "cuda":
        import torch

        line += f"; peak GPU memory {torch.cuda.max_memory_allocated() / GiB:.2f} GiB"
    logging.getLogger("automodel").warning(line)
