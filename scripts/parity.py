#!/usr/bin/env python
"""Loss parity between two configurations: two override sets in, two loss curves and their largest
difference out.

    python scripts/parity.py "parallel=none" "parallel=fsdp2_tp" --nproc-b 4
    python scripts/parity.py "parallel=fsdp2" "parallel=hsdp" --nproc 4 -- model=tiny train.seq_len=64

usage: parity.py A B [--nproc N] [--nproc-a N] [--nproc-b N] [--steps S] [--tol T] [--out DIR] [-- COMMON ...]
    python scripts/parity.py "precision=fp32" "precision=bf16" --steps 20

Each side is one `automodel` run (under torchrun when it uses more than one process) on the same
seed, so both see the same global batches; `train.log_every=1` records every step's loss. Anything after
`--` is passed to both sides. Exit status 0 when the largest difference is within --tol, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile


def _run(overrides: list[str], nproc: int, out_dir: str) -> list[dict]:
    base = [sys.executable, "-m", "automodel"]
    if nproc > 1:
        base = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                "-m", "automodel"]
    cmd = [*base, *overrides, f"hydra.run.dir={out_dir}"]
    print("$", " ".join(shlex.quote(c) for c in cmd), flush=True)
    env = {**os.environ, "AUTOMODEL_NO_PROGRESS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _nproc(overrides: list[str], default: int) -> int:
    return 1 if "parallel=none" in overrides or not any(o.startswith("parallel=") for o in overrides) else default


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", help="overrides of run A, one string (e.g. 'parallel=none')")
    ap.add_argument("b", help="overrides of run B, one string (e.g. 'parallel=fsdp2_tp')")
    ap.add_argument("--nproc", type=int, default=2, help="processes for a side that names a parallel layout")
    ap.add_argument("--nproc-a", type=int, help="processes for run A (default: 1 for parallel=none, else --nproc)")
    ap.add_argument("--nproc-b", type=int, help="processes for run B (default: 1 for parallel=none, else --nproc)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--tol", type=float, default=1e-5)
    ap.add_argument("--out", help="folder for both runs (default: a temporary one)")
    argv = list(sys.argv[1:] if argv is None else argv)
    common = argv[argv.index("--") + 1:] if "--" in argv else []
    args = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)

    fixed = [f"train.max_steps={args.steps}", "train.log_every=1", "train.sample_prompts=0",
             "checkpoint.export_final=false", *common]
    a, b = shlex.split(args.a) + fixed, shlex.split(args.b) + fixed
    na = args.nproc_a or _nproc(a, args.nproc)
    nb = args.nproc_b or _nproc(b, args.nproc)
    out = args.out or tempfile.mkdtemp(prefix="parity-")
    ra = _run(a, na, os.path.join(out, "a"))
    rb = _run(b, nb, os.path.join(out, "b"))
    if [r["step"] for r in ra] != [r["step"] for r in rb]:
        sys.exit("the two runs logged different steps")
    print(f"\n{'step':>5} {'A loss (' + str(na) + ' proc)':>18} {'B loss (' + str(nb) + ' proc)':>18} {'|A-B|':>10}")
    worst = 0.0
    for x, y in zip(ra, rb):
        d = abs(x["loss"] - y["loss"])
        worst = max(worst, d)
        print(f"{x['step']:>5} {x['loss']:>18.7f} {y['loss']:>18.7f} {d:>10.2e}")
    verdict = "within" if worst <= args.tol else "OVER"
    print(f"\nlargest loss difference: {worst:.3e} ({verdict} tolerance {args.tol:g}); runs in {out}")
    return 0 if worst <= args.tol else 1


if __name__ == "__main__":
    sys.exit(main())
