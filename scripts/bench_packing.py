#!/usr/bin/env python
"""Useful (non-padding) tokens per second with data.packing on and off, through the real engine.

Writes a variable-length prompt/completion set (lengths spread from a few tokens to most of train.seq_len,
like real instruction data), then trains the same model on it with `data=instruction` twice: padded rows
(one example per row, padded to the longest in its micro-batch) and packed rows (several examples per row,
position_ids restarting). The engine's tokens_per_s counts only real tokens, so the two are comparable.
Also reports the padding fraction of the rows each mode actually feeds the model. Runs alternate
off/on/off/on to spread machine noise; the first logged window (warm-up) is left out.

    .venv/bin/python scripts/bench_packing.py [--steps 30] [--rounds 2] [--seq 256] [--batch 16] [--hidden 128]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import statistics
import tempfile
import warnings

warnings.filterwarnings("ignore")


def write_set(path: str, n: int, seq: int) -> None:
    rng = random.Random(0)
    words = "alpha beta gamma delta sun moon red blue green cat dog tree rock lake river stone".split()
    with open(path, "w") as f:
        for _ in range(n):
            # log-uniform lengths in words: many short examples, a few long ones (as in real SFT sets)
            p_len = int(2 ** rng.uniform(1, 6.5))
            c_len = int(2 ** rng.uniform(0, 6.5))
            f.write(json.dumps({"prompt": " ".join(rng.choices(words, k=p_len)) + " =>",
                                "completion": " " + " ".join(rng.choices(words, k=c_len))}) + "\n")


def padding_fraction(path: str, packing: bool, args) -> float:
    from transformers import AutoTokenizer

    from automodel.config import RESOURCES
    from automodel.data.instruction import InstructionConfig, InstructionData

    tok = AutoTokenizer.from_pretrained(str(RESOURCES / "tiny_tasks" / "tokenizer"))
    data = InstructionData(InstructionConfig(path=path, packing=packing))
    it = data.build(tok, seq_len=args.seq, seed=42, dp_rank=0, dp_size=1, global_batch_size=args.batch,
                    micro_batch_size=args.batch)
    real = slots = 0
    for _ in range(args.steps):
        sb = next(it)
        real += sb.num_tokens
        slots += sum(m["input_ids"].numel() for m in sb.micro_batches)
    return 1 - real / slots


def run(path: str, packing: bool, args, out: str) -> float:
    from automodel.compose import compose
    from automodel.engine.run import train

    cfg = compose([
        "data=instruction", f"data.path={path}", f"data.packing={str(packing).lower()}",
        f"model.config.hidden_size={args.hidden}", f"model.config.intermediate_size={args.hidden * 4}",
        f"model.config.max_position_embeddings={args.seq}", f"train.seq_len={args.seq}",
        f"train.max_steps={args.steps}", "train.log_every=5", f"train.global_batch_size={args.batch}",
        f"train.micro_batch_size={args.batch}", "train.sample_prompts=0", "checkpoint.export_final=false",
    ])
    os.makedirs(out, exist_ok=True)
    result = train(cfg, out)
    windows = [r["tokens_per_s"] for r in result.records[1:]]  # the first window holds the warm-up
    return statistics.median(windows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--examples", type=int, default=4000)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("AUTOMODEL_NO_PROGRESS", "1")
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "varlen.jsonl")
        write_set(path, args.examples, args.seq)
        pad = {p: padding_fraction(path, p, args) for p in (False, True)}
        speed: dict[bool, list[float]] = {False: [], True: []}
        for r in range(args.rounds):
            for packing in (False, True):
                speed[packing].append(run(path, packing, args, os.path.join(tmp, f"run{r}{packing}")))
                print(f"round {r + 1} packing={packing}: {speed[packing][-1]:,.0f} useful tokens/s", flush=True)
    off, on = statistics.median(speed[False]), statistics.median(speed[True])
    print(f"\ntiny Llama hidden {args.hidden} x 4 layers, seq_len {args.seq}, {args.batch} rows/step, "
          f"{args.steps} steps, {torch.get_num_threads()} threads, device cpu")
    print(f"padding in the rows fed to the model: off {100 * pad[False]:.1f}%   on {100 * pad[True]:.1f}%")
    print(f"useful tokens/s (median):           off {off:,.0f}   on {on:,.0f}   ({on / off:.2f}x)")


if __name__ == "__main__":
    main()
