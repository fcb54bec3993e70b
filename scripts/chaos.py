"""kill -9 a training job at random moments, resume it until it finishes, and compare with a run never killed.

    .venv/bin/python scripts/chaos.py --trials 10            # 10 trials each of 1 process and 2 ranks
    .venv/bin/python scripts/chaos.py --trials 5 --kinds 2   # 2 ranks only
    .venv/bin/python scripts/chaos.py --trials 5 --kinds sigint-1 sigterm-2 sigint2-2 disk-1 disk-2 stale

Besides kill -9 (kinds 1 and 2: the number of ranks), faults that automodel must turn into one line
(scripts/chaos_faults.py): `sigint-N` / `sigterm-N` (a Ctrl-C or SIGTERM to the job's process group, as a
terminal or a scheduler sends it, at a random point of set-up or training; `sigint2-N`: a second one
soon after), `disk-N` (the disk fills after the first checkpoint: a sync save, an async one, and the final
export each fail on a small tmpfs, then the run resumes once space is back; root, or skipped with the
reason) and `stale` (WORLD_SIZE/RANK left in the environment). Each checks: exit code, exactly one line,
no traceback, no process left, and that resuming ends bitwise equal to the uninterrupted run. And what a run does
to a folder it does not own (scripts/chaos_rundir.py): `userdir` (a refused run into a user's folder),
`finished` (a fresh run into a finished one), `changed` (a setting changed on resume), `simultaneous` (two jobs
started at once into one dir); these count the files of a user's or another run's that changed (must be 0).

Every process of the job dies at once (the job's whole session gets SIGKILL: the launcher and, with
`launcher.nproc_per_node=2`, its ranks), at a random point: during start-up, or a random fraction of a second
after a random step is logged (a checkpoint is saved every 3 steps, so some kills land in a save). The job is then started again with `checkpoint.resume=auto` in the same run dir (and killed again if the
trial drew several kills) until it exits 0. A trial passes when the resumed run's `metrics.jsonl` equals the
uninterrupted run's line for line (every field but the timing) and the exported weights are bitwise equal.
Prints a table; exit 1 if any trial failed. tests/test_chaos.py runs one trial of each kind.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MICRO = ["model.config.hidden_size=64", "model.config.intermediate_size=128", "model.config.num_attention_heads=4",
         "model.config.num_key_value_heads=2", "model.config.num_hidden_layers=2", "train.sample_prompts=0",
         "train.seq_len=48", "train.global_batch_size=8", "train.log_every=1", "checkpoint.every_steps=3",
         "checkpoint.keep_last=2", "checkpoint.resume=auto"]
KINDS = {1: [], 2: ["launcher.nproc_per_node=2", "parallel=fsdp2"]}
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from automodel.engine.throughput import MEASURED as TIMING  # noqa: E402  (clocks and memory differ run to run)


def _start(run_dir: str, ranks: int, steps: int) -> subprocess.Popen:
    env = {**os.environ, "AUTOMODEL_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "automodel", *MICRO, *KINDS[ranks], f"train.max_steps={steps}",
           f"hydra.run.dir={run_dir}"]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def reference(workdir: str, ranks: int, steps: int) -> str:
    run = os.path.join(workdir, f"reference_{ranks}")
    code, out = _finish(_start(run, ranks, steps))
    if code != 0:
        raise RuntimeError(f"the uninterrupted {ranks}-rank run failed:\n{out[-3000:]}")
    return run


def _records(run: str) -> list[dict]:
    with open(os.path.join(run, "metrics.jsonl"), encoding="utf-8") as f:
        return [{k: v for k, v in json.loads(ln).items() if k not in TIMING} for ln in f if ln.strip()]


def _same_weights(a: str, b: str) -> bool:
    from safetensors.torch import load_file

    x, y = (load_file(os.path.join(r, "final", "model.safetensors")) for r in (a, b))
    return x.keys() == y.keys() and all(x[k].dtype == y[k].dtype and x[k].equal(y[k]) for k in x)


def _kill_point(run: str, steps: int, rng: random.Random) -> str:
    """Where to kill: during start-up (before any step is logged) or some time after a random step."""
    logged = _last_step(run)
    step = rng.randint(logged, max(logged, steps - 1))  # all steps logged already: a kill in start-up or export
    return f"start-up+{rng.uniform(0, 3):.1f}s" if step == logged else f"step {step}+{rng.uniform(0, 0.4):.2f}s"


def _last_step(run: str) -> int:
    try:
        with open(os.path.join(run, "metrics.jsonl"), encoding="utf-8") as f:
            lines = [ln for ln in f if ln.strip()]
        return json.loads(lines[-1])["step"] if lines else 0
    except (OSError, ValueError, KeyError):
        return 0


def _wait_for(proc: subprocess.Popen, run: str, when: str) -> bool:
    """Block until the kill point (True), or until the job exits first (False)."""
    what, _, extra = when.partition("+")
    delay = float(extra.rstrip("s"))
    if what.startswith("step"):
        target = int(what.split()[1])
        while _last_step(run) < target:
            if proc.poll() is not None:
                return False
            time.sleep(0.02)
    try:
        proc.wait(timeout=delay)
        return False
    except subprocess.TimeoutExpired:
        return True


def trial(workdir: str, ranks: int, steps: int, ref: str, rng: random.Random, kills: int = 1,
          points: list[str] | None = None) -> dict:
    """One run killed `kills` times at random moments (or at `points`, e.g. "step 3+0.05s"), resumed to the
    end; the outcome as a table row."""
    run = os.path.join(workdir, f"trial_{ranks}_{rng.randrange(10**9)}")
    killed_at, restarts = [], 0
    for k in range(len(points) if points else kills):
        proc = _start(run, ranks, steps)
        when = points[k] if points else _kill_point(run, steps, rng)
        if _wait_for(proc, run, when):
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher and every rank: the whole session
            proc.communicate()
            killed_at.append(when)
        else:
            proc.communicate()  # it finished before the kill point
    while True:
        restarts += 1
        code, out = _finish(_start(run, ranks, steps))
        if code == 0:
            break
        if restarts > 3:
            return {"ranks": ranks, "killed_at_s": killed_at, "ok": False, "why": f"resume failed:\n{out[-2000:]}"}
    got, want = _records(run), _records(ref)
    why = None
    if [r["step"] for r in got] != sorted({r["step"] for r in got}):
        why = f"metrics.jsonl steps out of order or repeated: {[r['step'] for r in got]}"
    elif [r["step"] for r in got] != [r["step"] for r in want]:
        why = f"metrics.jsonl steps {[r['step'] for r in got]} != {[r['step'] for r in want]}"
    elif got != want:
        why = "metrics.jsonl values differ from the uninterrupted run"
    elif not _same_weights(run, ref):
        why = "exported weights differ from the uninterrupted run"
    leftovers = [n for n in os.listdir(os.path.join(run, "checkpoints")) if n.endswith(".partial")]
    if why is None and leftovers:
        why = f"half-written checkpoints left: {leftovers}"
    shutil.rmtree(run, ignore_errors=True)
    return {"ranks": ranks, "killed_at_s": killed_at, "ok": why is None, "why": why or ""}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--kinds", nargs="+", default=["1", "2"], choices=["1", "2", *faults.KINDS, *rundir.KINDS])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--kills", type=int, default=2, help="most kills per trial (each trial draws 1..N)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    rows, refs = [], {}
    with tempfile.TemporaryDirectory(prefix="chaos_") as workdir:
        for kind in args.kinds:
            ranks = rundir.ranks_of(kind) if kind in rundir.KINDS else faults.ranks_of(kind)
            if ranks and ranks not in refs:
                refs[ranks] = reference(workdir, ranks, args.steps)
            for _ in range(args.trials):
                if kind in ("1", "2"):
                    row = trial(workdir, ranks, args.steps, refs[ranks], rng, kills=rng.randint(1, args.kills))
                    row.update(kind=f"kill9-{kind}", tracebacks=0, resumed=row["ok"])
                elif kind in rundir.KINDS:
                    row = rundir.run(kind, workdir, args.steps, refs[ranks], rng)
                else:
                    row = faults.run(kind, workdir, args.steps, refs.get(ranks), rng)
                rows.append(row)
                outcome = {True: "ok", None: "missed: "}.get(row["ok"], "FAILED: ") + row["why"] * (not row["ok"])
                print(f"| {row['kind']} | {row['killed_at_s']} | {outcome} |", flush=True)
    counted = [r for r in rows if r["ok"] is not None]  # a fault that missed the job (it had finished) tests nothing
    passed = sum(r["ok"] for r in counted)
    missed = f" ({len(rows) - len(counted)} missed the job and are not counted)" if len(counted) < len(rows) else ""
    print(f"\n{passed}/{len(counted)} trials passed{missed}; {sum(r['resumed'] for r in rows)} resumed runs bitwise "
          f"equal to the uninterrupted run; tracebacks seen: {sum(r['tracebacks'] for r in rows)}; files of a user's "
          f"or of another run lost or changed: {sum(r.get('lost', 0) for r in rows)}")
    return 0 if passed == len(counted) else 1


if __name__ == "__main__":
    import chaos_faults as faults  # noqa: E402  (the fault kinds; it imports this module's helpers)
    import chaos_rundir as rundir  # noqa: E402  (the run-directory kinds)

    sys.exit(main())
