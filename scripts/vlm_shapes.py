"""A tiny image-text model learns the bundled shapes task: held-out accuracy before and after training.

    .venv/bin/python scripts/vlm_shapes.py [--steps 2000] [--family llava]

Builds a small random LLaVA (or Gemma 3) checkpoint with its processor (tests/vlm_zoo.py), asks it the 60 held-out
questions (`automodel generate --image`'s greedy answer, exact match), trains it with
`automodel model=hf model.path=<it> data=shapes` (3,000 conversations; its vision tower frozen, the default) and
asks again, printing the accuracy per kind of question.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
SHAPES = os.path.join(HERE, "..", "automodel", "resources", "shapes")


def accuracy(folder: str) -> tuple[float, dict]:
    from automodel.generate import answer, load

    model, processor = load(folder)
    with open(os.path.join(SHAPES, "val.jsonl")) as f:
        records = [json.loads(line) for line in f]
    right, kinds = 0, {}
    for r in records:
        question = r["messages"][0]["content"][1]["text"]
        expected = r["messages"][1]["content"][0]["text"]
        ok = answer(model, processor, os.path.join(SHAPES, r["images"][0]), question, 8).strip() == expected
        right += ok
        kind = kinds.setdefault(question, [0, 0])
        kind[0], kind[1] = kind[0] + ok, kind[1] + 1
    return right / len(records), {q: f"{a}/{n}" for q, (a, n) in kinds.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--family", default="llava", choices=("gemma3", "llava"))
    args = ap.parse_args()
    import vlm_zoo

    with tempfile.TemporaryDirectory(prefix="vlm_shapes_") as tmp:
        folder = vlm_zoo.build(tmp, args.family, text=dict(hidden_size=128, intermediate_size=256),
                               vision=dict(hidden_size=64, intermediate_size=128), name="start")
        before = accuracy(folder)
        t0 = time.perf_counter()
        run = os.path.join(tmp, "run")
        done = subprocess.run([sys.executable, "-m", "automodel", "model=hf", f"model.path={folder}", "data=shapes",
                               f"train.max_steps={args.steps}", f"train.val_every={args.steps // 4}",
                               "train.global_batch_size=16", "train.seq_len=64", "train.sample_prompts=0",
                               "optim.lr=3e-3", f"hydra.run.dir={run}"],
                              capture_output=True, text=True, env={**os.environ, "AUTOMODEL_NO_PROGRESS": "1"})
        if done.returncode:
            sys.exit(done.stderr[-3000:])
        seconds = time.perf_counter() - t0
        after = accuracy(os.path.join(run, "final"))
        with open(os.path.join(run, "metrics.jsonl")) as f:
            records = [json.loads(line) for line in f]
    val = [r["val_loss"] for r in records if "val_loss" in r]
    print(f"{args.family}: held-out accuracy {before[0]:.1%} before {before[1]}, {after[0]:.1%} after {args.steps} "
          f"steps {after[1]} ({seconds:.0f} s); loss {records[0]['loss']:.3f} -> {records[-1]['loss']:.3f}; "
          f"val_loss {', '.join(f'{v:.3f}' for v in val)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
