"""Will it fit? A refusal in one line before a model too large for this machine is built.

The estimate counts what training holds per rank: fp32 master weights, gradients and AdamW's two moments
for trainable parameters, with FSDP dividing the sharded part. Every rank first builds the full model on
the host before sharding it, so the host also needs the full fp32 weights once per local rank.
Activations are not counted, so a run that passes can still run out of memory on long sequences.
"""

from __future__ import annotations

import os

from automodel.errors import UserError

GiB = 1024**3


def available_host_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def check_fits(total: int, trainable: int, *, shard: int, device_type: str, model_name: str) -> None:
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    build = total * 4 * local_ranks  # full fp32 weights per local rank during the build
    train = (total * 4 + trainable * 12) / shard  # weights + grads + 2 AdamW moments, sharded
    need_host = max(build, train * local_ranks if device_type == "cpu" else 0)
    host = available_host_bytes()
    if host and need_host > host:
        raise UserError(
            f"model '{model_name}' ({total / 1e9:.2f}B parameters, {trainable / 1e9:.2f}B trainable) needs about "
            f"{need_host / GiB:.1f} GiB of host memory on this machine ({local_ranks} local rank(s), fp32 weights, grads "
            f"and AdamW state over {shard}-way sharding); {host / GiB:.1f} GiB is available. {_advice(total, trainable)}"
        )
    if device_type == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info()
        if train > free:
            raise UserError(
                f"model '{model_name}' needs about {train / GiB:.1f} GiB per GPU for weights, grads and AdamW state "
                f"over {shard}-way sharding; {free / GiB:.1f} GiB is free. {_advice(total, trainable)}"
            )


def _advice(total: int, trainable: int) -> str:
    lora = "" if trainable < total else ", peft=lora"
    return f"Shard over more devices (parallel=fsdp2 on more ranks){lora}, or use a smaller model"
