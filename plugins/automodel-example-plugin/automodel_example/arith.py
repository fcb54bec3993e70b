"""Data plugin `arith`: generated arithmetic prompts ("add: 3 + 4 =>" -> " 7"); no files, no downloads.

It shows the whole data contract (automodel/protocols.py `DataPlugin`):

- `build(...)` yields one `automodel.batch.StepBatch` per optimizer step: this rank's micro-batches, each a
  dict of int64 tensors `input_ids` and `labels` of shape [rows, width]. Labels are already shifted
  (`labels[i]` is the token that follows `input_ids[i]`) and hold -100 (`automodel.batch.IGNORE_INDEX`)
  wherever there is no loss: the prompt and the padding. `automodel.batch.step_batch` pads, splits into
  micro-batches and counts the tokens.
- Which examples a rank reads at a step comes from `automodel.sampling.GlobalBatchSampler`: a pure function
  of (seed, step), so a run resumed at step k reads exactly what an uninterrupted run read at step k.
- `val_batches(...)` (optional) offers held-out data for `train.val_every`; `sample_prompts(n)` gives
  (prompt, expected completion) pairs that the engine tries on the exported model after training.
"""

from __future__ import annotations

import dataclasses
import random

from automodel.errors import UserError

OPS = ("add", "sub", "max")


@dataclasses.dataclass
class ArithConfig:
    num_examples: int = 4096  # training examples
    val_examples: int = 256  # held-out examples, generated from their own stream (0: no validation set)
    max_operand: int = 9
    ops: list[str] = dataclasses.field(default_factory=lambda: list(OPS))  # any of add, sub, max
    data_seed: int = 1234  # fixes which examples exist; train.seed only fixes the order they are read in


Example = tuple[list[int], list[int]]  # (input_ids, labels), labels shifted and masked


class ArithData:
    Config = ArithConfig

    def __init__(self, config: ArithConfig):
        bad = [op for op in config.ops if op not in OPS]
        if bad or not config.ops:
            raise UserError(f"data.ops={list(config.ops)}: choose one or more of {', '.join(OPS)}")
        if config.num_examples < 1 or config.val_examples < 0 or config.max_operand < 1:
            raise UserError("data.num_examples and data.max_operand must be at least 1, data.val_examples at least 0")
        self.cfg = config
        self._encoded: dict = {}

    # ------------------------------------------------------------------ the examples, as text
    def pairs(self, split: str, count: int) -> list[tuple[str, str]]:
        """(prompt, completion) strings; example i of a split depends only on (data_seed, split, i)."""
        out = []
        for i in range(count):
            rng = random.Random(f"{self.cfg.data_seed}:{split}:{i}")
            op = rng.choice(self.cfg.ops)
            a, b = rng.randint(0, self.cfg.max_operand), rng.randint(0, self.cfg.max_operand)
            if op == "add":
                out.append((f"add: {a} + {b} =>", f" {a + b}"))
            elif op == "sub":
                a, b = max(a, b), min(a, b)
                out.append((f"sub: {a} - {b} =>", f" {a - b}"))
            else:
                out.append((f"max: {a} {b} =>", f" {max(a, b)}"))
        return out

    # ------------------------------------------------------------------ tokens: shifted, masked labels
    def examples(self, tokenizer, seq_len: int, split: str) -> list[Example]:
        key = (id(tokenizer), seq_len, split)
        if key not in self._encoded:
            count = self.cfg.num_examples if split == "train" else self.cfg.val_examples
            self._encoded[key] = self._encode(tokenizer, self.pairs(split, count), seq_len)
        return self._encoded[key]

    @staticmethod
    def _encode(tokenizer, pairs: list[tuple[str, str]], seq_len: int) -> list[Example]:
        from automodel.batch import IGNORE_INDEX

        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        prompts = tokenizer([p for p, _ in pairs], add_special_tokens=False)["input_ids"]
        answers = tokenizer([c for _, c in pairs], add_special_tokens=False)["input_ids"]
        out = []
        for p, c in zip(prompts, answers):
            tokens = (bos + p + c + eos)[: seq_len + 1]  # seq_len inputs, each with the token after it
            first_target = len(bos) + len(p)  # the first completion token: the loss starts there
            input_ids = tokens[:-1]
            labels = [t if i + 1 >= first_target else IGNORE_INDEX for i, t in enumerate(tokens[1:])]
            if any(t != IGNORE_INDEX for t in labels):  # cut so short that no completion token is left
                out.append((input_ids, labels))
        if not out:
            raise UserError(f"data: no example keeps a completion token within train.seq_len={seq_len}; raise it")
        return out

    # ------------------------------------------------------------------ the DataPlugin contract
    def build(self, tokenizer, *, seq_len, seed, dp_rank, dp_size, global_batch_size, micro_batch_size,
              start_step=0):
        from automodel.batch import step_batch
        from automodel.sampling import GlobalBatchSampler

        examples = self.examples(tokenizer, seq_len, "train")
        sampler = GlobalBatchSampler(len(examples), global_batch_size, seed)  # refuses fewer than one batch
        pad_id = _pad_id(tokenizer)
        step = start_step
        while True:  # endless: the engine stops after train.max_steps
            mine = [examples[i] for i in sampler.rank_indices(step, dp_rank, dp_size, micro_batch_size)]
            yield step_batch(mine, micro_batch_size, pad_id)
            step += 1

    def val_batches(self, tokenizer, *, seq_len, dp_rank, dp_size, micro_batch_size):
        """This rank's contiguous slice of the held-out set; a short last slice is topped up with copies of
        an example whose labels are all -100, so every rank runs the same number of forward passes and the
        loss (summed over target tokens) is exactly that of the whole set."""
        if not self.cfg.val_examples:
            return None
        from automodel.batch import IGNORE_INDEX, step_batch

        examples = self.examples(tokenizer, seq_len, "val")
        per_rank = -(-len(examples) // dp_size)
        mine = examples[dp_rank * per_rank : (dp_rank + 1) * per_rank]
        blank = (examples[0][0], [IGNORE_INDEX] * len(examples[0][0]))
        mine += [blank] * (per_rank - len(mine))
        pad_id = _pad_id(tokenizer)
        return [step_batch(mine[i : i + micro_batch_size], micro_batch_size, pad_id)
                for i in range(0, len(mine), micro_batch_size)]

    def sample_prompts(self, n: int) -> list[tuple[str, str]]:
        split = "val" if self.cfg.val_examples else "train"
        count = self.cfg.val_examples if self.cfg.val_examples else self.cfg.num_examples
        return self.pairs(split, min(n, count))


def _pad_id(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return tid
    return 0
