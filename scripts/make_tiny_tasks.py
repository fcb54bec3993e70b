#!/usr/bin/env python
"""Generate the bundled `tiny_tasks` instruction set and train its byte-level BPE tokenizer.

Five small algorithmic tasks a ~2M-parameter model visibly learns in a minute on a CPU:
    sort: 7 2 9 4 =>      2 4 7 9        reverse: cat red sun =>   sun red cat
    max: 3 8 1 =>         8              add: 4 + 3 =>             7
    last: fox owl bee =>  bee
Output (deterministic for a seed): automodel/resources/tiny_tasks/{train,val}.jsonl and tokenizer/
(a PreTrainedTokenizerFast that AutoTokenizer loads, with <pad> <bos> <eos> <unk>).

    python scripts/make_tiny_tasks.py [--train 20000] [--val 200] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "automodel" / "resources" / "tiny_tasks"
WORDS = ("cat dog fox owl bee ant cow pig hen elk red blue green gold pink gray sun moon star rain snow wind "
         "tree leaf rock sand lake hill road door").split()
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]


def example(rng: random.Random) -> dict:
    task = rng.choice(("sort", "reverse", "max", "add", "last"))
    if task == "sort":
        xs = [rng.randint(0, 9) for _ in range(rng.randint(3, 6))]
        return {"prompt": f"sort: {' '.join(map(str, xs))} =>", "completion": " " + " ".join(map(str, sorted(xs)))}
    if task == "reverse":
        ws = rng.sample(WORDS, rng.randint(3, 5))
        return {"prompt": f"reverse: {' '.join(ws)} =>", "completion": " " + " ".join(reversed(ws))}
    if task == "max":
        xs = [rng.randint(0, 9) for _ in range(rng.randint(3, 6))]
        return {"prompt": f"max: {' '.join(map(str, xs))} =>", "completion": f" {max(xs)}"}
    if task == "add":
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        return {"prompt": f"add: {a} + {b} =>", "completion": f" {a + b}"}
    ws = rng.sample(WORDS, rng.randint(3, 5))
    return {"prompt": f"last: {' '.join(ws)} =>", "completion": f" {ws[-1]}"}


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    # digits one by one (so arithmetic sees digits), then GPT-2 style byte-level BPE: exact round trips
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>", model_max_length=256)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=int, default=20000)
    ap.add_argument("--val", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab-size", type=int, default=512)
    args = ap.parse_args()

    rng = random.Random(args.seed)
    seen, train = set(), []
    val = []
    while len(val) < args.val:  # held-out prompts never appear in train
        ex = example(rng)
        if ex["prompt"] not in seen:
            seen.add(ex["prompt"])
            val.append(ex)
    while len(train) < args.train:
        ex = example(rng)
        if ex["prompt"] not in seen:  # seen holds exactly the held-out prompts
            train.append(ex)
    OUT.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("val", val)):
        with open(OUT / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    tok = train_tokenizer([r["prompt"] + r["completion"] for r in train], args.vocab_size)
    tok.save_pretrained(OUT / "tokenizer")
    print(f"wrote {len(train)} train / {len(val)} val examples and a {len(tok)}-token tokenizer to {OUT}")


if __name__ == "__main__":
    main()
