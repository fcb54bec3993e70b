"""Loss curves of the default run under each precision, side by side: how far lower precision moves training.

    .venv/bin/python scripts/bench_precision.py                           # fp32, bf16, fp16 over 100 steps
    .venv/bin/python scripts/bench_precision.py --steps 300 --precisions fp32 fp16 "fp8 precision.emulate=true"

Each precision is a fresh `automodel` process (the embedded default, `train.max_steps=--steps`, the same seed and
batches), one after the other. Printed: the loss every 10 steps for each, and at the last step each one's
relative difference from the first precision given, plus overflow-skipped steps (fp16).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(out: str, precision: str, steps: int) -> list[dict]:
    env = {**os.environ, "AUTOMODEL_NO_PROGRESS": "1"}
    args = [f"precision={precision.split()[0]}", *precision.split()[1:], f"train.max_steps={steps}",
            "train.sample_prompts=0", "checkpoint.export_final=false", f"hydra.run.dir={out}"]
    proc = subprocess.run([sys.executable, "-m", "automodel", *args], cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"precision={precision} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16", "fp16"])
    args = ap.parse_args()
    curves = {}
    with tempfile.TemporaryDirectory(prefix="bench_precision_") as tmp:
        for i, precision in enumerate(args.precisions):
            print(f"running precision={precision} ...", flush=True)
            curves[precision] = run(os.path.join(tmp, str(i)), precision, args.steps)
    steps = [r["step"] for r in curves[args.precisions[0]]]
    print("\n| step | " + " | ".join(args.precisions) + " |")
    print("|---|" + "---|" * len(args.precisions))
    for j, step in enumerate(steps):
        print(f"| {step} | " + " | ".join(f"{curves[p][j]['loss']:.4f}" for p in args.precisions) + " |")
    base = curves[args.precisions[0]][-1]["loss"]
    for p in args.precisions[1:]:
        last = curves[p][-1]
        skipped = sum(1 for r in curves[p] if "skipped" in r)
        print(f"{p}: loss at step {last['step']} {last['loss']:.4f} vs {base:.4f} ({(last['loss'] - base) / base:+.2%})"
              + (f"; {skipped} logged step(s) skipped for overflow, final loss scale {last['loss_scale']:g}"
                 if "loss_scale" in last else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
