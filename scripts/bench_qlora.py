"""Peak host memory and step time, `peft=lora` against `peft=qlora`, side by side, at real model size.

    PYTHONPATH=.venv/extras .venv/bin/python scripts/bench_qlora.py                      # model=llama3_2_1b
    PYTHONPATH=.venv/extras .venv/bin/python scripts/bench_qlora.py --model llama3_8b --pefts qlora

(bitsandbytes lives in .venv/extras after scripts/setup.sh; a user's `pip install 'automodel[qlora]'` puts it on
the path.) Each PEFT runs the real `automodel` engine in a fresh process, one after the other: random init on
the meta device, materialized one module at a time, a few steps of the bundled tasks, no export. Reported: the
set-up's peak (what the engine logs once the model is materialized), the whole run's peak resident memory
(ru_maxrss), seconds per step after the first, and the ratios against the first PEFT given.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RUNNER = """
import json, logging, resource, sys, time
logging.basicConfig(level=logging.INFO, format="%(message)s")  # the engine's set-up line names its peak
from automodel.compose import compose
from automodel.engine.run import train
t0 = time.perf_counter()
result = train(compose(sys.argv[2:]), sys.argv[1])
print("BENCH " + json.dumps({"peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                             "records": result.records, "wall": time.perf_counter() - t0}))
"""


def run(peft: str, args, out: str) -> dict:
    option, *more = peft.split()
    overrides = [f"model={args.model}", f"peft={option}", *more, f"train.max_steps={args.steps}", "train.log_every=1",
                 f"train.seq_len={args.seq}", "train.global_batch_size=1", "train.sample_prompts=0",
                 "checkpoint.export_final=false", "optim.warmup_steps=0", f"hydra.run.dir={out}"]
    env = {**os.environ, "AUTOMODEL_NO_PROGRESS": "1"}
    proc = subprocess.run([sys.executable, "-c", RUNNER, out, *overrides], cwd=ROOT, capture_output=True, text=True,
                          env=env)
    if proc.returncode:
        sys.exit(f"{peft}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    result = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH "))[6:])
    setup = re.search(r"peak host memory so far ([\d.]+) GiB", proc.stdout + proc.stderr)
    result["setup_peak"] = float(setup.group(1)) if setup else float("nan")
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama3_2_1b", help="a model option (conf/model/)")
    ap.add_argument("--pefts", nargs="+", default=["lora", "qlora"])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--seq", type=int, default=256)
    args = ap.parse_args()
    rows = []
    for peft in args.pefts:
        with tempfile.TemporaryDirectory(prefix="bench_qlora_") as out:
            r = run(peft, args, out)
        later = r["records"][1:]  # the first step also pays one-time costs
        per_step = sum(rec["tokens"] / rec["tokens_per_s"] for rec in later) / len(later) if later else float("nan")
        rows.append((peft, r["setup_peak"], r["peak"] / 1024**3, per_step, r["records"][-1]["loss"]))
        print(f"{peft}: set-up peak {rows[-1][1]:.2f} GiB, run peak {rows[-1][2]:.2f} GiB, {per_step:.2f} s/step",
              flush=True)
    first = rows[0]
    print(f"\nmodel={args.model}, seq {args.seq}, 1 sequence a step, {args.steps} steps\n")
    print(f"| peft | set-up peak | run peak | s/step | final loss |\n|---|---|---|---|---|")
    for peft, setup, peak, step, loss in rows:
        ratio = "" if peft == first[0] else f" ({peak / first[2]:.2f}x)"
        print(f"| {peft} | {setup:.2f} GiB | {peak:.2f} GiB{ratio} | {step:.2f} | {loss:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
