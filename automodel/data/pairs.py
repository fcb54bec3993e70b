"""What the prompt/completion plugins share (instruction, squad, hellaswag): tokenize [bos] prompt completion
[eos] with labels on the completion only, so the model is trained to answer, not to ask.

A subclass turns records into (record index, prompt, completion) items and counts, by reason, the records it
leaves out (a null completion, an unanswerable question), so each reason is logged with its own count instead
of vanishing into "no target token left". Values reach the items through `checks.text_of` (a list or an
object is refused, a number becomes its text), and each record's texts are measured against
data.max_record_bytes before the tokenizer sees them. A completion that is empty leaves the end-of-sequence
token as the only target: such examples are counted, and a set of nothing else is refused (checked in
ExampleData._checked).
"""

from __future__ import annotations

from automodel.data.checks import check_size
from automodel.data.examples import EncodeStats, ExampleData, mask_before

Item = tuple[int, str, str]  # (index of the record, prompt, completion)


def is_null(value) -> bool:
    """A missing value: None (JSON null, an empty parquet/csv cell), or NaN (pandas' empty cell)."""
    return value is None or (isinstance(value, float) and value != value)


class PairData(ExampleData):
    """Anything that yields (prompt, completion) strings per record."""

    def __init__(self, config):
        super().__init__(config)
        self.packing = config.packing

    def items(self, records, stats: EncodeStats) -> list[Item]:
        """The usable records as items; the others counted with stats.skip(reason)."""
        raise NotImplementedError

    def pairs(self, records) -> tuple[list[str], list[str], int]:
        """(prompts, completions, records left out)."""
        stats = EncodeStats(rows=len(records))
        items = self.items(records, stats)
        return [p for _, p, _ in items], [c for _, _, c in items], stats.dropped

    def encode(self, tokenizer, records, seq_len):
        stats = EncodeStats(rows=len(records))
        items = self.items(records, stats)
        for row, p, c in items:
            check_size((p, c), records.where(row), self.cfg.max_record_bytes)
        p_ids = tokenizer([p for _, p, _ in items], add_special_tokens=False)["input_ids"] if items else []
        c_ids = tokenizer([c for _, _, c in items], add_special_tokens=False)["input_ids"] if items else []
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        eos = [tokenizer.eos_token_id] if self.cfg.add_eos and tokenizer.eos_token_id is not None else []
        examples = []
        for (row, _, _), p, c in zip(items, p_ids, c_ids):
            ex = mask_before(bos + p + c + eos, len(bos) + len(p), seq_len, stats)
            if ex is not None:
                examples.append(ex)
                stats.origin.append(row)
                stats.empty += not c
        return examples, stats

    def prompts(self, records, n):
        return [(p, c) for _, p, c in self.items(records, EncodeStats())[:n]]
