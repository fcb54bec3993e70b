"""Data plugins `instruction`, `squad`, `hellaswag`: prompt/completion pairs, loss on the completion only.

Each record gives a prompt and a completion (`instruction` reads two columns, named by data.prompt_column
and data.completion_column; `squad` and `hellaswag` build them from those public sets' record formats, as
NeMo AutoModel's recipes do). The sequence is [bos] prompt completion [eos]; labels mask the prompt, so
the model is trained to answer, not to ask.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from automodel.data.examples import EncodeStats, ExampleData, SourceConfig, mask_before


@dataclasses.dataclass
class InstructionConfig(SourceConfig):
    prompt_column: str = "prompt"
    completion_column: str = "completion"
    add_eos: bool = True
    packing: bool = False  # several examples per row, no attention across them (position_ids restart)


class PairData(ExampleData):
    """Anything that yields (prompt, completion) strings per record."""

    def __init__(self, config):
        super().__init__(config)
        self.packing = config.packing

    def pairs(self, records) -> tuple[list[str], list[str], int]:
        """(prompts, completions, records skipped as unusable)."""
        raise NotImplementedError

    def encode(self, tokenizer, records, seq_len):
        prompts, answers, skipped = self.pairs(records)
        stats = EncodeStats(rows=len(records), dropped=skipped)
        p_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"] if prompts else []
        c_ids = tokenizer(answers, add_special_tokens=False)["input_ids"] if answers else []
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        eos = [tokenizer.eos_token_id] if self.cfg.add_eos and tokenizer.eos_token_id is not None else []
        examples = []
        for p, c in zip(p_ids, c_ids):
            ex = mask_before(bos + p + c + eos, len(bos) + len(p), seq_len, stats)
            if ex is not None:
                examples.append(ex)
        return examples, stats

    def prompts(self, records, n):
        prompts, answers, _ = self.pairs(records)
        return list(zip(prompts, answers))[:n]


class InstructionData(PairData):
    Config = InstructionConfig
    hint = "map yours with data.prompt_column / data.completion_column"

    def columns(self):
        return self.cfg.prompt_column, self.cfg.completion_column

    def pairs(self, records):
        return ([str(x) for x in records.column(self.cfg.prompt_column)],
                [str(x) for x in records.column(self.cfg.completion_column)], 0)


@dataclasses.dataclass
class SquadConfig(SourceConfig):
    path: str = "rajpurkar/squad"
    val_split: Optional[str] = "validation"
    add_eos: bool = True
    packing: bool = False


class SquadData(PairData):
    """SQuAD records {context, question, answers: {text: [...]}}: prompt "<context> <question> ", completion the
    first answer (NeMo AutoModel's `make_squad_dataset` format)."""

    Config = SquadConfig

    def columns(self):
        return "context", "question", "answers"

    def pairs(self, records):
        prompts, answers, skipped = [], [], 0
        for r in records.rows:
            texts = (r["answers"] or {}).get("text") or []
            if not texts:  # SQuAD v2 unanswerable questions: nothing to train on
                skipped += 1
                continue
            prompts.append(f"{r['context']} {r['question']} ")
            answers.append(str(texts[0]).strip())
        return prompts, answers, skipped


@dataclasses.dataclass
class HellaSwagConfig(SourceConfig):
    path: str = "Rowan/hellaswag"
    val_split: Optional[str] = "validation"
    add_eos: bool = True
    packing: bool = False


class HellaSwagData(PairData):
    """HellaSwag records {ctx, endings: [4 strings], label}: prompt the context, completion the right ending
    (NeMo AutoModel's `HellaSwag` dataset: context, then target = endings[label])."""

    Config = HellaSwagConfig

    def columns(self):
        return "ctx", "endings", "label"

    def pairs(self, records):
        prompts, answers, skipped = [], [], 0
        for r in records.rows:
            label = str(r["label"]).strip()
            if not label.isdigit() or int(label) >= len(r["endings"]):  # the test split has no labels
                skipped += 1
                continue
            prompts.append(str(r["ctx"]))
            answers.append(" " + str(r["endings"][int(label)]))
        return prompts, answers, skipped
