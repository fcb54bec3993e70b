"""Code that runs inside the spawned ranks of tests/test_parallel_layouts.py."""

from __future__ import annotations

import json
import os
import traceback


def local_param_bytes(model) -> tuple[int, int]:
    """(bytes of parameters this rank holds, bytes of the full model), counting shared tensors once."""
    from automodel.engine.memory import shard_bytes

    local, _, full = shard_bytes(model)
    return local, full


def _plain(t):
    """A plain fp32 CPU copy of a (local) tensor, also of a tensor subclass (e.g. float8 training's weight wrapper)."""
    import torch

    out = torch.empty(t.shape, dtype=torch.float32)
    out.copy_(t.detach())
    return out


def full_weights(model) -> dict:
    """Collective: every parameter whole (gathered over dp/tp/ep shards), merged over the ranks on rank 0 (pipeline
    stages hold different ones); {} on the other ranks."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    part = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    part = {k: _plain(v) for k, v in part.items()}
    parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(part, parts, dst=0)
    return {k: v for p in parts for k, v in p.items()} if parts else {}


def replicated_mismatches(model) -> list[str]:
    """Collective. Names of the parameters whose copies differ between ranks that should hold the same values:
    a DTensor's local tensor on the ranks that differ only in the mesh dims it is Replicate on (a sequence-parallel
    norm on every tp rank), a plain tensor on every rank that holds it (a norm left out of the layout). A
    replicated parameter that drifts apart means its gradient was not reduced where its input was split."""
    import hashlib

    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Replicate

    mine = {}
    for name, p in model.named_parameters():
        t = p.detach()
        if isinstance(t, DTensor):
            coord = t.device_mesh.get_coordinate() or []
            key = tuple(c for c, pl in zip(coord, t.placements) if not isinstance(pl, Replicate))
            t = t.to_local()
        else:
            key = ()
        mine[name] = (key, hashlib.sha256(_plain(t).numpy().tobytes()).hexdigest())
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    copies = {}
    for held in every:
        for name, (key, digest) in held.items():
            copies.setdefault((name, key), set()).add(digest)
    return sorted({name for (name, _), digests in copies.items() if len(digests) > 1})


def run_layouts(rank: int, world: int, store_path: str, out_dir: str, checks: list[tuple[str, list[str]]]) -> None:
    """Join a gloo group through a file store, train each named config; rank 0 writes results.json, and each check's
    whole trained weights as <name>.weights.safetensors."""
    import time

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.setdefault("AUTOMODEL_NO_PROGRESS", "1")
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
    results = {}
    try:
        from helpers import train

        for name, overrides in checks:
            run = os.path.join(out_dir, name)
            os.makedirs(run, exist_ok=True)
            t0 = time.perf_counter()
            result = train(run, *overrides)
            seconds = time.perf_counter() - t0
            local, full = local_param_bytes(result.model)
            every = [None] * world
            dist.all_gather_object(every, local)
            replicated = replicated_mismatches(result.model)
            weights = full_weights(result.model)
            if rank == 0:
                from safetensors.torch import save_file

                save_file(weights, os.path.join(out_dir, f"{name}.weights.safetensors"))
                results[name] = {"losses": [r["loss"] for r in result.records],
                                 "grad_norms": [r["grad_norm"] for r in result.records],
                                 "kd_losses": [r.get("kd_loss") for r in result.records],
                                 "local_param_bytes": every, "full_param_bytes": full,
                                 "seconds": seconds, "dir": run,
                                 "replicated_mismatch": replicated,
                                 "weights": os.path.join(out_dir, f"{name}.weights.safetensors")}
    except Exception:
        results["error"] = traceback.format_exc()
        raise
    finally:
        if rank == 0:
            with open(os.path.join(out_dir, "results.json"), "w") as f:
                json.dump(results, f)
        from helpers import leave_group

        leave_group(clean="error" not in results)
