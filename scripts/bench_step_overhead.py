#!/usr/bin/env python
"""Does the engine's training step cost anything over a hand-written PyTorch loop?

Both run the same model (same init), the same batches, AdamW with the same LR schedule, clipping, and
the same fp32 cross-entropy; the hand-written loop is the textbook one (mean loss, backward, clip, step).
Runs alternate A/B/A/B to spread machine noise. Prints steps/s for each and the engine's overhead.

    .venv/bin/python scripts/bench_step_overhead.py [--steps 30] [--rounds 3] [--hidden 256] [--seq 256] [--batch 8]
        [--device cpu|cuda] [--bf16]

On a GPU a small model is bound by kernel launches and host syncs, which is where a loop that reads
the loss back every step loses most; the engine reads it only on logged steps (every 10 here).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

warnings.filterwarnings("ignore")


def make_model(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1000, hidden_size=args.hidden, intermediate_size=args.hidden * 4, num_hidden_layers=4,
                      num_attention_heads=max(4, args.hidden // 128), num_key_value_heads=max(4, args.hidden // 128),
                      max_position_embeddings=args.seq, use_cache=False)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg).to(args.device)


def autocast(args):
    if args.bf16:
        return torch.autocast(args.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _sync(args):
    if args.device.type == "cuda":
        torch.cuda.synchronize()


def batches(args):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(args.steps):
        tok = torch.randint(0, 1000, (args.batch, args.seq + 1), generator=g)
        out.append((tok[:, :-1].contiguous().to(args.device), tok[:, 1:].contiguous().to(args.device)))
    return out


def optimizer(model, steps):
    from automodel.optim.adamw import AdamW, AdamWConfig

    return AdamW(AdamWConfig(lr=1e-3, warmup_steps=2)).build([p for p in model.parameters()], steps)


def hand_written(args, data) -> float:
    model = make_model(args)
    opt, sched = optimizer(model, len(data))
    _sync(args)
    t0 = time.perf_counter()
    for x, y in data:
        with autocast(args):
            logits = model(input_ids=x).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    _sync(args)
    return len(data) / (time.perf_counter() - t0)


def engine(args, data) -> float:
    from automodel.batch import StepBatch
    from automodel.engine.loop import StepRunner, run_loop
    from automodel.losses.ce import CrossEntropy

    model = make_model(args)
    opt, sched = optimizer(model, len(data))
    step = StepRunner(model, opt, sched, lambda: autocast(args), args.device, max_grad_norm=1.0,
                      loss=CrossEntropy(CrossEntropy.Config()))
    stream = iter([StepBatch([{"input_ids": x, "labels": y}], y.numel(), x.numel()) for x, y in data])
    _sync(args)
    t0 = time.perf_counter()
    run_loop(step, stream, len(data), log_every=10, on_step=lambda s: None, on_log=lambda r: None)
    _sync(args)
    return len(data) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast in both loops")
    args = ap.parse_args()
    args.device = torch.device(args.device)
    data = batches(args)
    hand_written(args, data[:3]), engine(args, data[:3])  # warm-up: allocator, kernels, imports
    results = {"hand-written": [], "engine": []}
    for _ in range(args.rounds):
        results["hand-written"].append(hand_written(args, data))
        results["engine"].append(engine(args, data))
    med = {k: statistics.median(v) for k, v in results.items()}
    tokens = args.batch * args.seq
    where = torch.cuda.get_device_name() if args.device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"model hidden={args.hidden} x 4 layers, batch {args.batch} x seq {args.seq}, {args.steps} steps x "
          f"{args.rounds} rounds, {'bf16 autocast' if args.bf16 else 'fp32'}, {where}")
    for k, v in results.items():
        print(f"  {k:13s} median {med[k]:6.3f} steps/s ({med[k] * tokens:8.0f} tok/s)   rounds: "
              + ", ".join(f"{x:.3f}" for x in v))
    print(f"engine overhead vs hand-written: {100 * (med['hand-written'] / med['engine'] - 1):+.1f}%")


if __name__ == "__main__":
    main()
