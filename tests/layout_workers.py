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


def run_layouts(rank: int, world: int, store_path: str, out_dir: str, checks: list[tuple[str, list[str]]]) -> None:
    """Join a gloo group through a file store, train each named config; rank 0 writes results.json."""
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
            local, full = local_param_bytes(result.model)
            every = [None] * world
            dist.all_gather_object(every, local)
            if rank == 0:
                results[name] = {"losses": [r["loss"] for r in result.records],
                                 "grad_norms": [r["grad_norm"] for r in result.records],
                                 "kd_losses": [r.get("kd_loss") for r in result.records],
                                 "local_param_bytes": every, "full_param_bytes": full,
                                 "seconds": time.perf_counter() - t0, "dir": run}
    except Exception:
        results["error"] = traceback.format_exc()
        raise
    finally:
        if rank == 0:
            with open(os.path.join(out_dir, "results.json"), "w") as f:
                json.dump(results, f)
        from helpers import leave_group

        leave_group(clean="error" not in results)
