#!/usr/bin/env python
"""Does the engine's training step cost anything over a hand-written loop, for an image-text model?

The same small random LLaVA (or Gemma 3: tests/vlm_zoo.py), the same batches of the bundled shapes conversations
(collated once by data=shapes: input_ids, labels, pixel_values), AdamW, clipping and fp32 cross-entropy in both;
rounds alternate A/B and B/A. Prints steps/s for each and the engine's overhead.

    .venv/bin/python scripts/bench_vlm_step.py [--family llava] [--steps 30] [--rounds 3] [--batch 8]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch
import torch.nn.functional as F

warnings.filterwarnings("ignore")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))


def optimizer(model, steps):
    from automodel.optim.adamw import AdamW, AdamWConfig

    return AdamW(AdamWConfig(lr=1e-3, warmup_steps=2)).build([p for p in model.parameters() if p.requires_grad], steps)


def load(folder):
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(0)
    return AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).train()


def hand_written(folder, data) -> float:
    model = load(folder)
    opt, sched = optimizer(model, len(data))
    t0 = time.perf_counter()
    for batch in data:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = model(**inputs).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return len(data) / (time.perf_counter() - t0)


def engine(folder, data) -> float:
    import contextlib

    from automodel.batch import StepBatch
    from automodel.engine.loop import StepRunner, run_loop
    from automodel.losses.ce import CrossEntropy

    model = load(folder)
    opt, sched = optimizer(model, len(data))
    step = StepRunner(model, opt, sched, contextlib.nullcontext, torch.device("cpu"), max_grad_norm=1.0,
                      loss=CrossEntropy(CrossEntropy.Config()))
    stream = iter([StepBatch([b], int((b["labels"] != -100).sum()), b["input_ids"].numel()) for b in data])
    t0 = time.perf_counter()
    run_loop(step, stream, len(data), log_every=10, on_step=lambda s: None, on_log=lambda r: None)
    return len(data) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", default="llava", choices=("llava", "gemma3"))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    import vlm_zoo

    from automodel.compose import compose
    from automodel.config import validate

    with tempfile.TemporaryDirectory(prefix="bench_vlm_") as tmp:
        folder = vlm_zoo.build(tmp, args.family, text=dict(hidden_size=256, intermediate_size=512),
                               vision=dict(hidden_size=128, intermediate_size=256))
        checked = validate(compose(["model=hf", f"model.path={folder}", "data=shapes", "train.seq_len=64",
                                    "model.freeze=[]"]))
        model_plugin, data_plugin = checked.plugins["model"], checked.plugins["data"]
        data_plugin.use_processor(model_plugin.processor())
        stream = data_plugin.build(model_plugin.tokenizer(), seq_len=64, seed=0, dp_rank=0, dp_size=1,
                                   global_batch_size=args.batch, micro_batch_size=args.batch)
        data = [next(stream).micro_batches[0] for _ in range(args.steps)]
        hand_written(folder, data[:3]), engine(folder, data[:3])  # warm-up
        results = {"hand-written": [], "engine": []}
        runs = {"hand-written": hand_written, "engine": engine}
        for r in range(args.rounds):  # neither always runs first
            for name in (list(runs) if r % 2 == 0 else list(reversed(runs))):
                results[name].append(runs[name](folder, data))
    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"{args.family} (text 256 x 2 layers, vision 128 x 2 layers), batch {args.batch} conversations with one "
          f"32x32 image, {args.steps} steps x {args.rounds} rounds, fp32, cpu {torch.get_num_threads()} threads")
    for k, v in results.items():
        print(f"  {k:13s} median {med[k]:6.3f} steps/s   rounds: " + ", ".join(f"{x:.3f}" for x in v))
    print(f"engine overhead vs hand-written: {100 * (med['hand-written'] / med['engine'] - 1):+.1f}%")


if __name__ == "__main__":
    main()
