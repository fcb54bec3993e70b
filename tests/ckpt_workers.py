"""Checkpoint test code that also runs inside spawned ranks: a simulated crash, and a worker that runs a plan."""

from __future__ import annotations

import contextlib
import json
import os
import traceback


class SimulatedCrash(Exception):
    pass


@contextlib.contextmanager
def crash_after(step: int):
    """Make training stop dead right after step `step`'s checkpoint hook (as a kill would, but in-process)."""
    from automodel.checkpoint import dcp

    original = dcp.DCPCheckpoint.after_step

    def after_step(self, s, state, run_dir):
        original(self, s, state, run_dir)
        if s == step:
            raise SimulatedCrash(s)

    dcp.DCPCheckpoint.after_step = after_step
    try:
        yield
    finally:
        dcp.DCPCheckpoint.after_step = original


def save_full_weights(model, path: str) -> None:
    """Collective: the full (unsharded) weights, written by rank 0 as safetensors."""
    import torch.distributed as dist
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        save_file({k: v.contiguous().clone() for k, v in full.items()}, path)


PROBE = [[1, 40, 41, 42, 43, 44, 45, 46]]


def save_logits(model, path: str) -> None:
    """Collective: the trained model's logits on PROBE, written by rank 0."""
    import torch
    import torch.distributed as dist
    from safetensors.torch import save_file

    model.eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(PROBE)).logits.float()
    if hasattr(logits, "full_tensor"):
        logits = logits.full_tensor()
    if dist.get_rank() == 0:
        save_file({"logits": logits.contiguous()}, path)


def local_expert_numel(model) -> int:
    """Elements of routed-expert parameters this rank holds (its shards)."""
    from automodel.moe.experts import experts_modules

    return sum((p.to_local() if hasattr(p, "to_local") else p).numel()
               for _, m in experts_modules(model) for p in m.parameters(recurse=False))


class _ReadCounter(dict):
    """_READ["numel"]: elements this process read from HF safetensors since the last reset (= 0)."""

    base = 0

    def __getitem__(self, key):
        from automodel.model.hf_weights import HFWeights

        return HFWeights.elements_read - self.base if key == "numel" else super().__getitem__(key)

    def __setitem__(self, key, value):
        from automodel.model.hf_weights import HFWeights

        if key == "numel":
            self.base = HFWeights.elements_read - value
        else:
            super().__setitem__(key, value)


_READ = _ReadCounter()


def count_hf_reads() -> None:
    """Start counting the elements read from HF safetensors (automodel's reader keeps the count)."""
    _READ["numel"] = 0


def run_plan(rank: int, world: int, store_path: str, out_dir: str, plan: list, micro: bool = True) -> None:
    """plan: (name, run_subdir, crash_at or None, overrides), on helpers.MICRO's model (micro=False: the overrides
    alone name the model). Rank 0 writes results.json."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.setdefault("AUTOMODEL_NO_PROGRESS", "1")
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
    results = {}
    count_hf_reads()
    try:
        from helpers import compose
        from helpers import train as train_micro

        from automodel.engine.run import train as train_plain

        train = train_micro if micro else (lambda run, *over: train_plain(compose(*over), run))
        for name, subdir, crash_at, overrides in plan:
            run = os.path.join(out_dir, subdir)
            os.makedirs(run, exist_ok=True)
            if crash_at is not None:
                try:
                    with crash_after(crash_at):
                        train(run, *overrides)
                    raise AssertionError(f"{name}: the run did not crash")
                except SimulatedCrash:
                    results[name] = {"crashed_at": crash_at}
                continue
            result = train(run, *overrides)
            # a rank holding pipeline stages has no whole forward; context parallel's needs the step's sharded rows
            whole_forward = not any((o.startswith("parallel=") and ("pp" in o or "cp" in o))
                                    or (o.startswith("parallel.cp=") and o != "parallel.cp=1") for o in overrides)
            if whole_forward:
                save_full_weights(result.model, os.path.join(out_dir, f"{name}.safetensors"))
                save_logits(result.model, os.path.join(out_dir, f"{name}.logits.safetensors"))
            results[name] = {"losses": [r["loss"] for r in result.records], "steps": [r["step"] for r in result.records],
                             "grad_norms": [r["grad_norm"] for r in result.records], "final_dir": result.final_dir,
                             "records": result.records}
            from layout_workers import replicated_mismatches

            results[name]["replicated_mismatch"] = replicated_mismatches(result.model)
            reads, experts = [None] * world, [None] * world
            dist.all_gather_object(reads, _READ["numel"])
            dist.all_gather_object(experts, local_expert_numel(result.model))
            results[name]["hf_read_numel"], _READ["numel"] = reads, 0
            results[name]["expert_numel"] = experts
    except Exception:
        results["error"] = traceback.format_exc()
        raise
    finally:
        if rank == 0:
            with open(os.path.join(out_dir, "results.json"), "w") as f:
                json.dump(results, f)
        from helpers import leave_group

        leave_group(clean="error" not in results)
