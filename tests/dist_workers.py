"""Code that runs inside spawned ranks (importable by torch.multiprocessing's spawn)."""

from __future__ import annotations

import contextlib
import json
import os
import time
import traceback


class _TickingClock:
    """Stands in for the `time` module inside automodel.engine.loop: perf_counter() advances exactly 1.0 s per
    reading (everything else is the real module). With log_every=1 the loop reads it once at the start and once
    per logged step, so each record's tokens_per_s must be its token count over exactly 1 s."""

    def __init__(self):
        self.reads = 0

    def perf_counter(self) -> float:
        self.reads += 1
        return float(self.reads)

    def __getattr__(self, name):
        return getattr(time, name)


@contextlib.contextmanager
def ticking_loop_clock():
    from automodel.engine import loop

    assert getattr(loop, "time", None) is time, "automodel.engine.loop no longer reads the clock as time.perf_counter"
    clock = _TickingClock()
    loop.time = clock
    try:
        yield clock
    finally:
        loop.time = time


def run_checks(rank: int, world: int, store_path: str, out_dir: str, checks: list[tuple]) -> None:
    """Join a gloo group through a file store, run each named training config, rank 0 records results.

    A check is (name, overrides) or (name, overrides, {"ticking_clock": True}): the latter trains under
    ticking_loop_clock() and records how often the loop read it."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.setdefault("AUTOMODEL_NO_PROGRESS", "1")
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
    results = {}
    try:
        from helpers import train

        for name, overrides, *options in checks:
            opts = options[0] if options else {}
            run = os.path.join(out_dir, name)
            os.makedirs(run, exist_ok=True)
            with (ticking_loop_clock() if opts.get("ticking_clock") else contextlib.nullcontext()) as clock:
                result = train(run, *overrides)
            entry = {"losses": [r["loss"] for r in result.records], "records": result.records}
            if clock is not None:
                entry["clock_reads"] = clock.reads
            if any("export_final=true" in o for o in overrides) or not any("export_final" in o for o in overrides):
                entry["logits_check"] = _export_logits_diff(result, run)
            if rank == 0:
                results[name] = entry
    except Exception:
        results["error"] = traceback.format_exc()
        raise
    finally:
        if rank == 0:
            with open(os.path.join(out_dir, "results.json"), "w") as f:
                json.dump(results, f)
        from helpers import leave_group

        leave_group(clean="error" not in results)


def _export_logits_diff(result, run_dir: str):
    """Max |logits(exported HF folder) - logits(trained sharded model)| on rank 0 (all ranks run forward)."""
    import torch
    import torch.distributed as dist

    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46]])
    result.model.eval()
    with torch.no_grad():
        trained = result.model(input_ids=ids).logits.float()  # FSDP forward is collective
    diff = None
    if dist.get_rank() == 0:
        from transformers import AutoModelForCausalLM

        loaded = AutoModelForCausalLM.from_pretrained(os.path.join(run_dir, "final")).eval()
        with torch.no_grad():
            diff = (loaded(input_ids=ids).logits.float() - trained).abs().max().item()
    dist.barrier()
    return diff
