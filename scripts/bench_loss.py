"""Peak memory and throughput of a training step, `loss=ce` against `loss=chunked_ce`, side by side.

    .venv/bin/python scripts/bench_loss.py                        # vocab 128,256, seq 2048, micro-batch 2
    .venv/bin/python scripts/bench_loss.py --hidden 2048 --steps 3 --losses ce chunked_ce "chunked_ce loss.recompute=true"
    .venv/bin/python scripts/bench_loss.py --hidden 4096 --seq 8192 --batch 1 --losses "ce precision=bf16" \
        "chunked_ce precision=bf16" "liger precision=bf16"            # on a GPU: also its peak device memory

The model is Llama-3-shaped (vocabulary 128,256, GQA 4:1, untied head) with 2 decoder layers, random init; the
data is the bundled task set packed into 2048-token rows, 2 rows per step (4096 tokens). Each loss runs the real
`automodel` engine in a fresh process, one after the other (never two at once: they would share the cores).
Reported per loss: the process's peak resident memory (ru_maxrss), the same minus the training state every
loss holds (fp32 weights, gradients and the two AdamW moments: 16 bytes a parameter), tokens/s of the steps
after the first, and the ratios against the first loss given.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GiB = 1024**3

RUNNER = """
import json, resource, sys
import torch
from automodel.compose import compose
from automodel.engine.run import train
result = train(compose(sys.argv[2:]), sys.argv[1])
params = sum(p.numel() for p in result.model.parameters())
device_peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
print("BENCH " + json.dumps({"peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "params": params,
                             "device_peak": device_peak, "records": result.records}))
"""


def run(loss: str, args, out: str) -> dict:
    overrides = [
        *loss.split(), "model.config.vocab_size=128256", f"model.config.hidden_size={args.hidden}",
        f"model.config.intermediate_size={args.hidden * 7 // 2}", "model.config.num_hidden_layers=2",
        f"model.config.num_attention_heads={args.hidden // 64}", f"model.config.num_key_value_heads={args.hidden // 256}",
        "model.config.max_position_embeddings=8192", f"train.seq_len={args.seq}", "data.packing=true",
        f"train.global_batch_size={args.batch}", f"train.micro_batch_size={args.batch}", f"train.max_steps={args.steps}",
        "train.log_every=1", "train.sample_prompts=0", "checkpoint.export_final=false", "checkpoint.every_steps=0",
    ]
    env = {**os.environ, "AUTOMODEL_NO_PROGRESS": "1"}
    proc = subprocess.run([sys.executable, "-c", RUNNER, out, *overrides], cwd=ROOT, env=env, capture_output=True,
                          text=True)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH ")), None)
    if proc.returncode or line is None:
        sys.exit(f"loss={loss} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    report = json.loads(line[len("BENCH "):])
    later = report["records"][1:] or report["records"]
    report["tokens_per_s"] = sum(r["tokens_per_s"] for r in later) / len(later)
    report["loss"] = report["records"][-1]["loss"]
    report["above_state"] = report["peak"] - 16 * report["params"]
    return report


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--losses", nargs="+", default=["ce", "chunked_ce"])
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_loss_") as tmp:
        for i, loss in enumerate(args.losses):
            print(f"running loss={loss} ...", flush=True)
            os.makedirs(os.path.join(tmp, str(i)))
            rows.append((loss, run(f"loss={loss}", args, os.path.join(tmp, str(i)))))
    base = rows[0][1]
    print(f"\nvocab 128,256, hidden {args.hidden}, 2 layers, {args.batch} x {args.seq} tokens a step, "
          f"{base['params'] / 1e6:.0f}M parameters, {args.steps} steps\n")
    print("| loss | peak RSS | ratio | peak above weights+grads+AdamW | ratio | tokens/s | ratio | final loss |")
    print("|---|---|---|---|---|---|---|---|")
    for loss, r in rows:
        print(f"| {loss} | {r['peak'] / GiB:.2f} GiB | {r['peak'] / base['peak']:.2f} | "
              f"{r['above_state'] / GiB:.2f} GiB | {r['above_state'] / base['above_state']:.2f} | "
              f"{r['tokens_per_s']:.0f} | {r['tokens_per_s'] / base['tokens_per_s']:.2f} | {r['loss']:.4f} |")
    if base["device_peak"]:  # on a GPU the step's memory is the device's (torch.cuda.max_memory_allocated)
        print("\n| loss | peak GPU memory allocated | ratio |\n|---|---|---|")
        for loss, r in rows:
            print(f"| {loss} | {r['device_peak'] / GiB:.2f} GiB | {r['device_peak'] / base['device_peak']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
