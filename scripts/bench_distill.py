"""Does distillation help? A small student trained on the bundled tasks with CE alone vs distilled from a
larger trained teacher, at equal steps, compared on the held-out loss (CE on the bundled val set).

    .venv/bin/python scripts/bench_distill.py                    # teacher: the default model, 600 steps
    .venv/bin/python scripts/bench_distill.py --steps 200 --kd-ratio 0.5 --temperature 2.0

    .venv/bin/python scripts/bench_distill.py --student-examples 500   # students see 500 examples, the teacher all

1. the teacher: the default tiny model (hidden --teacher-hidden, --teacher-layers layers) trained for
   --teacher-steps, exported (or reused from --keep-teacher);
2. the student (hidden 128, MLP 128, 2 layers), --steps steps, CE on the labels only;
3. the same student, same seed and batches, distilled: teacher=hf teacher.model.path=<1.>.
Each is a fresh `automodel` process, one after the other. Printed: each run's held-out loss (val_loss at the
last step) and final training loss, as a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUDENT = ["model.config.hidden_size=128", "model.config.intermediate_size=128", "model.config.num_hidden_layers=2",
           "model.config.num_attention_heads=4", "model.config.num_key_value_heads=2"]


def run(out: str, *overrides: str) -> dict:
    env = {**os.environ, "AUTOMODEL_NO_PROGRESS": "1"}
    proc = subprocess.run([sys.executable, "-m", "automodel", *overrides, f"hydra.run.dir={out}", "train.sample_prompts=0"],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"automodel {' '.join(overrides)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return {"val_loss": records[-1]["val_loss"], "loss": records[-1]["loss"], "ce_loss": records[-1].get("ce_loss"),
            "kd_loss": records[-1].get("kd_loss")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher-steps", type=int, default=600)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--kd-ratio", type=float, default=0.5)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--teacher-hidden", type=int, default=256)
    ap.add_argument("--teacher-layers", type=int, default=4)
    ap.add_argument("--keep-teacher", default=None, help="a run dir: train the teacher there once, reuse it after")
    ap.add_argument("--student-examples", type=int, default=0,
                    help="train both students on only the first N bundled training examples (0: all 20,000); the "
                         "teacher always sees all of them")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_distill_") as tmp:
        teacher_dir = args.keep_teacher or os.path.join(tmp, "teacher")
        if os.path.isdir(os.path.join(teacher_dir, "final")):
            print(f"reusing the teacher in {teacher_dir}", flush=True)
            with open(os.path.join(teacher_dir, "metrics.jsonl")) as f:
                last = [json.loads(line) for line in f][-1]
            teacher = {"val_loss": last["val_loss"], "loss": last["loss"]}
        else:
            print(f"training the teacher ({args.teacher_steps} steps) ...", flush=True)
            teacher = run(teacher_dir, f"train.max_steps={args.teacher_steps}", f"train.val_every={args.teacher_steps}",
                          f"model.config.hidden_size={args.teacher_hidden}",
                          f"model.config.intermediate_size={args.teacher_hidden}",
                          f"model.config.num_hidden_layers={args.teacher_layers}")
        common = [*STUDENT, f"train.max_steps={args.steps}", f"train.val_every={args.steps}",
                  "checkpoint.export_final=false"]
        if args.student_examples:  # the regime distillation is for: a teacher that saw more than the student
            subset = os.path.join(tmp, "subset.jsonl")
            with open(os.path.join(ROOT, "automodel", "resources", "tiny_tasks", "train.jsonl")) as f, \
                    open(subset, "w") as out:
                out.writelines(line for _, line in zip(range(args.student_examples), f))
            common.append(f"data.path={subset}")
        print(f"training the student on CE alone ({args.steps} steps) ...", flush=True)
        alone = run(os.path.join(tmp, "alone"), *common)
        print("training the same student distilled ...", flush=True)
        kd = run(os.path.join(tmp, "kd"), *common, "teacher=hf", f"teacher.model.path={teacher_dir}/final",
                 f"teacher.kd_ratio={args.kd_ratio}", f"teacher.temperature={args.temperature}")
    print(f"\n| run | steps | held-out loss | final training loss |\n|---|---|---|---|")
    print(f"| teacher (hidden {args.teacher_hidden}, {args.teacher_layers} layers) | {args.teacher_steps} | {teacher['val_loss']:.4f} | {teacher['loss']:.4f} |")
    seen = f", {args.student_examples} examples" if args.student_examples else ""
    print(f"| student (hidden 128, 2 layers{seen}), CE alone | {args.steps} | {alone['val_loss']:.4f} | {alone['loss']:.4f} |")
    print(f"| same student, distilled (kd_ratio {args.kd_ratio}, T {args.temperature}) | {args.steps} | "
          f"{kd['val_loss']:.4f} | {kd['loss']:.4f} (CE {kd['ce_loss']:.4f}, KL {kd['kd_loss']:.4f}) |")
    print(f"\nheld-out loss, distilled / alone: {kd['val_loss'] / alone['val_loss']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
