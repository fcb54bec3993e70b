"""One spawned group of ranks (gloo, a file:// store) that trains a list of checks in turn: what the matrices
(tests/test_model_matrix.py, tests/test_moe.py, tests/test_vlm.py and their scripts) share, since spawning costs
seconds here. Each check is a list of CLI overrides trained by matrix_runs.run_train on every rank."""

from __future__ import annotations

import os

from matrix_runs import attempt, run_train


def worker(rank: int, world: int, workdir: str, checks: list, pg_timeout_s: float) -> None:
    """One rank: train every (name, overrides) check in turn. A check's failure on any rank is agreed on
    through a FileStore (not the process group, which a failed rank may have left mid-collective): every
    rank then leaves that group and joins a fresh one, so the next check starts clean. Rank 0 appends each
    check's outcome to results.jsonl as soon as it is known."""
    import datetime
    import json
    import time

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.setdefault("AUTOMODEL_NO_PROGRESS", "1")
    import logging

    logging.getLogger("automodel").setLevel(logging.WARNING)
    timeout = datetime.timedelta(seconds=pg_timeout_s)
    store = dist.FileStore(os.path.join(workdir, "agree.store"), world)
    store.set_timeout(datetime.timedelta(seconds=pg_timeout_s * 2 + 60))
    epoch = 0

    def join():
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(workdir, f'pg{epoch}.store')}", rank=rank,
                                world_size=world, timeout=timeout)

    join()
    for i, (name, over) in enumerate(checks):
        out = attempt(run_train, os.path.join(workdir, "runs", name), over)
        out["rank"], out["at"] = rank, time.time()
        if out["status"] == "error" and dist.is_initialized():
            dist.destroy_process_group()  # a peer waiting on this rank in a collective gets an error at once
        store.set(f"{i}/{rank}", json.dumps(out))
        store.wait([f"{i}/{r}" for r in range(world)])
        every = [json.loads(store.get(f"{i}/{r}")) for r in range(world)]
        bad = [o for o in every if o["status"] != "ok"]
        # a refusal on every rank left the group healthy (no rank was inside a collective): it is kept, because
        # a group made again in this process can meet torch's state of the old one (a 4-rank mesh's flattened
        # dims then resolve to a destroyed group)
        if bad and not (all(o["status"] == "refused" for o in every) and dist.is_initialized()):
            if dist.is_initialized():
                dist.destroy_process_group()
            epoch += 1
            join()
        if rank == 0:
            # the first failure in time is the cause; a peer's later error is its consequence
            final = min(bad, key=lambda o: (o["status"] != "refused", o["at"])) if bad else every[0]
            with open(os.path.join(workdir, "results.jsonl"), "a") as f:
                f.write(json.dumps({"name": name, **final}) + "\n")
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _entry(rank, world, workdir, checks, pg_timeout_s):
    worker(rank, world, workdir, checks, pg_timeout_s)


def run_spawned(checks: list, workdir: str, world: int = 2, pg_timeout_s: float = 120.0,
                deadline_s: float = 3600.0) -> dict:
    """{check name: outcome} of every (name, overrides) check, run by one spawned group of `world` ranks.
    Should a rank die (a crash, not an exception), the check it was running is marked failed and a new
    group runs the rest."""
    import json
    import time

    import torch.multiprocessing as mp

    os.makedirs(workdir, exist_ok=True)
    results, todo, start, attempt_no = {}, list(checks), time.time(), 0
    while todo:
        sub = os.path.join(workdir, f"group{attempt_no}")
        os.makedirs(sub, exist_ok=True)
        ctx = mp.start_processes(_entry, args=(world, sub, todo, pg_timeout_s), nprocs=world, join=False,
                                 start_method="spawn")
        crash = None
        try:
            while not ctx.join(timeout=5):
                if time.time() - start > deadline_s:
                    for p in ctx.processes:
                        if p.is_alive():
                            p.kill()
                    crash = f"the matrix ran past its deadline of {deadline_s:.0f}s"
                    break
        except Exception as e:  # a rank exited abnormally; torch has terminated the others
            crash = "a rank died: " + " ".join(str(e).split())[:200]
        got = {}
        path = os.path.join(sub, "results.jsonl")
        if os.path.isfile(path):
            with open(path) as f:
                for line in f:
                    r = json.loads(line)
                    got[r.pop("name")] = r
        results.update(got)
        rest = [c for c in todo if c[0] not in got]
        if not rest:
            break
        if crash is None:
            crash = "the spawned group ended before this check reported"
        results[rest[0][0]] = {"status": "error", "error": crash}
        todo, attempt_no = rest[1:], attempt_no + 1
        if time.time() - start > deadline_s:
            for name, _ in todo:
                results[name] = {"status": "error", "error": "not run: the matrix ran past its deadline"}
            break
    return results
