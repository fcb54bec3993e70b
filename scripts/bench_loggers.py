"""What logging costs: the embedded default run with all four loggers on vs metrics.jsonl alone, side by side.

    .venv/bin/python scripts/bench_loggers.py               # 2 rounds, alternating the two settings
    .venv/bin/python scripts/bench_loggers.py --rounds 3 train.max_steps=100

wandb runs offline (no account), MLflow into a sqlite store in the bench's temporary folder, created before the
rounds (a tracking store is set up once per machine, not once per run). Each run is timed from start to exit,
as a user waits for it; the "training" column is the loop's own time from train.log. Prints one line per run and
the median ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALL = "logger=[jsonl,wandb,tensorboard,mlflow]"


def _run(tmp: str, name: str, overrides: list[str]) -> tuple[float, float]:
    run = os.path.join(tmp, name)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "automodel", *overrides, f"hydra.run.dir={run}"], cwd=tmp,
                          capture_output=True, text=True,
                          env={**os.environ, "AUTOMODEL_NO_PROGRESS": "1", "WANDB_MODE": "offline"})
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    with open(os.path.join(run, "train.log")) as f:
        trained = next(float(ln.split(" in ")[1].split("s;")[0]) for ln in f if "] trained " in ln)
    return wall, trained


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_loggers_") as tmp:
        store = f"logger.mlflow.tracking_uri=sqlite:///{tmp}/mlflow.db"
        _run(tmp, "store_setup", [ALL, store, "train.max_steps=1", "train.sample_prompts=0"])  # tables, once
        settings = {"jsonl only": list(args.overrides), "all four": [ALL, store, *args.overrides]}
        times: dict[str, list[tuple[float, float]]] = {k: [] for k in settings}
        for r in range(args.rounds):
            order = list(settings) if r % 2 == 0 else list(reversed(settings))  # neither always runs first
            for name in order:
                wall, trained = _run(tmp, f"{name.replace(' ', '_')}_{r}", settings[name])
                times[name].append((wall, trained))
                print(f"round {r}  {name:10s}  wall {wall:6.1f}s  training {trained:6.1f}s", flush=True)
    base, full = (statistics.median(w for w, _ in times[k]) for k in settings)
    base_t, full_t = (statistics.median(t for _, t in times[k]) for k in settings)
    print(f"median wall: jsonl only {base:.1f}s, all four {full:.1f}s -> {full / base:.3f}x; "
          f"training loop {base_t:.1f}s vs {full_t:.1f}s -> {full_t / base_t:.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
