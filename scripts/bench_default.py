"""The embedded default run, timed start to exit, and what it learned: exact answers on held-out prompts.

    .venv/bin/python scripts/bench_default.py                       # the default as shipped
    .venv/bin/python scripts/bench_default.py train.max_steps=500   # the same with any overrides

Runs `automodel` (export included) as a user would, then greedy-decodes the first --prompts prompts of the
bundled held-out set (automodel/resources/tiny_tasks/val.jsonl) with the exported model and prints the wall
time, the final loss and the exact-match rate, per task and overall.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--prompts", type=int, default=300)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_default_") as tmp:
        run = os.path.join(tmp, "run")
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "automodel", *args.overrides, f"hydra.run.dir={run}"],
                              cwd=REPO, capture_output=True, text=True, env={**os.environ, "AUTOMODEL_NO_PROGRESS": "1"})
        wall = time.perf_counter() - t0
        if proc.returncode:
            print(proc.stdout[-2000:], proc.stderr[-3000:])
            return 1
        with open(os.path.join(run, "metrics.jsonl")) as f:
            final_loss = [json.loads(ln) for ln in f][-1]["loss"]
        with open(os.path.join(run, "train.log")) as f:
            trained = next((ln.split(" in ")[1].split(";")[0] for ln in f if "] trained " in ln), "?")
        from automodel.generate import greedy, load

        model, tok = load(os.path.join(run, "final"))
        right, total = collections.Counter(), collections.Counter()
        with open(os.path.join(REPO, "automodel", "resources", "tiny_tasks", "val.jsonl")) as f:
            rows = [json.loads(ln) for ln in f][: args.prompts]
        for row in rows:
            task = row["prompt"].split(":")[0]
            total[task] += 1
            right[task] += greedy(model, tok, row["prompt"]).strip() == row["completion"].strip()
    per_task = "  ".join(f"{t} {right[t]}/{total[t]}" for t in sorted(total))
    print(f"wall {wall:.1f}s (training {trained})  final loss {final_loss:.4f}  held-out exact {sum(right.values())}/{sum(total.values())}"
          f"  ({per_task})  overrides: {' '.join(args.overrides) or '(default)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
