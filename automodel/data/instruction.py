"""Data plugin `instruction`: prompt/completion pairs from a JSON-lines file, loss on the completion only.

Each line is an object with a prompt and a completion column (names configurable). The sequence is
[bos] prompt completion [eos]; labels mask the prompt, so the model is trained to answer, not to ask.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Optional

from automodel.batch import IGNORE_INDEX, step_batch
from automodel.errors import UserError
from automodel.sampling import GlobalBatchSampler

log = logging.getLogger(__name__)


@dataclasses.dataclass
class InstructionConfig:
    path: str = "???"
    val_path: Optional[str] = None  # held-out pairs; used for the end-of-run sample generations
    prompt_column: str = "prompt"
    completion_column: str = "completion"
    add_eos: bool = True


def read_jsonl(path: str, columns: tuple[str, ...], key: str = "data.path") -> list[dict]:
    """Rows of a JSON-lines file; a bad line or missing column stops with its file and line number."""
    if not os.path.isfile(path):
        raise UserError(f"{key}='{path}' does not exist or is not a file")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            missing = [c for c in columns if c not in row]
            if missing:
                raise UserError(
                    f"{path}:{lineno}: no column '{missing[0]}'; the columns are: {', '.join(row)} "
                    f"(map yours with data.prompt_column / data.completion_column)"
                )
            rows.append(row)
    if not rows:
        raise UserError(f"{key}='{path}' holds no examples")
    return rows


class InstructionData:
    Config = InstructionConfig

    def __init__(self, config: InstructionConfig):
        self.cfg = config

    def _columns(self) -> tuple[str, str]:
        return self.cfg.prompt_column, self.cfg.completion_column

    def tokenize(self, tokenizer, rows: list[dict], seq_len: int) -> list[tuple[list[int], list[int]]]:
        """(input_ids, labels) per row, shifted for next-token prediction and truncated to seq_len."""
        p_col, c_col = self._columns()
        prompts = tokenizer([str(r[p_col]) for r in rows], add_special_tokens=False)["input_ids"]
        answers = tokenizer([str(r[c_col]) for r in rows], add_special_tokens=False)["input_ids"]
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        eos = [tokenizer.eos_token_id] if self.cfg.add_eos and tokenizer.eos_token_id is not None else []
        examples, truncated = [], 0
        for p, c in zip(prompts, answers):
            prompt, full = bos + p, bos + p + c + eos
            if len(full) - 1 > seq_len:
                truncated += 1
                full = full[: seq_len + 1]
            labels = [t if i + 1 >= len(prompt) else IGNORE_INDEX for i, t in enumerate(full[1:])]
            if all(t == IGNORE_INDEX for t in labels):
                continue  # the completion was cut off entirely: nothing to learn from
            examples.append((full[:-1], labels))
        if truncated:
            log.warning("%d of %d examples were longer than train.seq_len=%d and were truncated", truncated, len(rows), seq_len)
        if not examples:
            raise UserError(
                f"every one of the {len(rows)} examples in {self.cfg.path} lost its whole completion to "
                f"train.seq_len={seq_len}; raise train.seq_len"
            )
        return examples

    def build(self, tokenizer, *, seq_len, seed, dp_rank, dp_size, global_batch_size, micro_batch_size, start_step=0):
        examples = self.tokenize(tokenizer, read_jsonl(self.cfg.path, self._columns()), seq_len)
        sampler = GlobalBatchSampler(len(examples), global_batch_size, seed)
        pad_id = tokenizer.pad_token_id
        step = start_step
        while True:
            picked = [examples[i] for i in sampler.rank_indices(step, dp_rank, dp_size)]
            yield step_batch(picked, micro_batch_size, pad_id)
            step += 1

    def sample_prompts(self, n: int) -> list[tuple[str, str]]:
        path = self.cfg.val_path or self.cfg.path
        rows = read_jsonl(path, self._columns(), "data.val_path" if self.cfg.val_path else "data.path")
        p_col, c_col = self._columns()
        return [(str(r[p_col]), str(r[c_col])) for r in rows[:n]]
