"""`automodel plan` against real runs: per-rank peak planned vs measured, side by side, and plan's wall time at scale.

    .venv/bin/python scripts/plan_vs_measured.py                    # qwen3_0_6b on 1, 2 and 4 ranks (CPU, fsdp2)
    .venv/bin/python scripts/plan_vs_measured.py --ranks 1 2 --steps 2
    .venv/bin/python scripts/plan_vs_measured.py --scale-only      # plan's time for Llama-3-70B at 512 and 4096 ranks

Each measured run trains a few steps of the published architecture (random init) with `launcher.nproc_per_node`
ranks on this machine and reads the peak of the most loaded rank from metrics.jsonl (`mem_host_gib`); the plan
is `automodel plan` with the same overrides and plan.gpu=cpu. Prints a table and the largest relative error.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = ["model=qwen3_0_6b", "parallel=fsdp2", "train.seq_len=256", "train.global_batch_size=4", "train.sample_prompts=0",
       "checkpoint.every_steps=0", "checkpoint.export_final=false", "data.packing=false"]


def _automodel(args: list[str], cwd: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "automodel", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "AUTOMODEL_NO_PROGRESS": "1"})
    if proc.returncode:
        sys.exit(f"automodel {' '.join(args)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return proc


def _peak(out: str) -> float:
    return float(re.search(r"^  peak\s+([\d.]+) GiB", out, re.M).group(1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--scale-only", action="store_true")
    args = ap.parse_args()
    worst = 0.0
    with tempfile.TemporaryDirectory(prefix="plan_vs_measured_") as tmp:
        if not args.scale_only:
            print("| ranks | planned peak per rank | measured peak (most loaded rank) | planned / measured |")
            print("|---|---|---|---|")
            for n in args.ranks:
                run = os.path.join(tmp, f"run{n}")
                _automodel([*RUN, f"launcher.nproc_per_node={n}", f"train.max_steps={args.steps}", "train.log_every=1",
                            f"hydra.run.dir={run}"], tmp)
                with open(os.path.join(run, "metrics.jsonl")) as f:
                    measured = max(json.loads(ln)["mem_host_gib"] for ln in f)
                planned = _peak(_automodel(["plan", *RUN, f"plan.world_size={n}", "plan.gpu=cpu"], tmp).stdout)
                worst = max(worst, abs(planned / measured - 1))
                print(f"| {n} | {planned:.2f} GiB | {measured:.2f} GiB | {planned / measured:.3f} |", flush=True)
            print(f"largest error {100 * worst:.1f}%")
        for world in (512, 4096):
            t0 = time.perf_counter()
            out = _automodel(["plan", "model=llama3_70b", "parallel=fsdp2_tp", "parallel.tp=8", "precision=bf16",
                              "train.seq_len=8192", f"train.global_batch_size={world // 8}",
                              "parallel.activation_checkpointing=full", f"plan.world_size={world}"], tmp).stdout
            print(f"plan Llama-3-70B fsdp2_tp (tp=8) at {world} ranks: {time.perf_counter() - t0:.1f}s wall, "
                  f"peak {_peak(out):.1f} GiB per rank; {out.strip().splitlines()[-1]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
