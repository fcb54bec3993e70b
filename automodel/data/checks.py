"""Checks of what a data set holds, shared by the plugins: values that are not text, records too large to
tokenize, and sets whose examples mostly do not fit train.seq_len.

Each stops the run with one line naming the record (file:line where rows are lines, else the record's
number) and what would be right, because each of these otherwise trains without a word on something other
than the data: a list's Python repr (`"[' 12']"`), a tokenizer's out-of-memory abort, or the few short
examples left after the long ones were cut (the loss then looks excellent: memorisation).
"""

from __future__ import annotations

import json
import math

from automodel.data.loading import too_long
from automodel.errors import UserError

KINDS = {list: "a list", dict: "an object", bool: "a boolean", type(None): "null"}


def text_of(value, where: str, column: str) -> str:
    """A text value as the text to train on: a string as it is, a number as its decimal text (12 -> "12");
    anything else (a list, an object, true/false) is refused: its repr is not what anyone meant to train on,
    and which text a boolean stands for ("true", "True", "yes") is the data's choice, not ours."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    kind = kind_of(value)
    shown = json.dumps(value, default=str)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    raise UserError(f"{where}: '{column}' is {kind} ({shown}), not text; write it as a JSON string (numbers "
                    "become text; lists, objects and booleans are not read)")


def kind_of(value) -> str:
    """A value's JSON type as a message says it: "a list", "an object", ..."""
    return next((name for t, name in KINDS.items() if isinstance(value, t)), f"a {type(value).__name__}")


def check_size(texts, where: str, limit: int | None) -> None:
    """Refuse a record whose texts together are more than `limit` bytes (UTF-8), before any tokenizer sees it."""
    if not limit:
        return
    chars = sum(len(t) for t in texts)
    if chars * 4 <= limit:  # a character is at most 4 bytes: no need to encode
        return
    size = sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)
    if size > limit:
        raise too_long(where, limit, size, "record's text")


def percentile(ordered: list[int], p: float) -> int:
    """The nearest-rank percentile: at least p% of the values are <= it."""
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def refuse_too_long(lengths: list[int], seq_len: int, max_fraction: float | None, where: str) -> None:
    """Stop when more than max_fraction of the examples are longer than seq_len (cut, or left out when nothing
    of their target survives the cut), with the lengths' percentiles and the seq_len that keeps 95% of them."""
    if max_fraction is None or not lengths:
        return
    long = sum(n > seq_len for n in lengths)
    if long <= max_fraction * len(lengths):
        return
    ordered = sorted(lengths)
    p95 = percentile(ordered, 95)
    raise UserError(
        f"{where}: {long} of {len(lengths)} examples ({100 * long / len(lengths):.0f}%) are longer than "
        f"train.seq_len={seq_len} tokens and would be cut or left out, more than data.max_dropped_fraction="
        f"{max_fraction}; their lengths in tokens: p50 {percentile(ordered, 50)}, p90 {percentile(ordered, 90)}, "
        f"p95 {p95}, max {ordered[-1]}; train.seq_len={p95} keeps 95% of them (or raise "
        "data.max_dropped_fraction to train on what fits)")
