"""Data plugin `sharegpt`: ShareGPT-style conversations, trained exactly as `chat` trains OpenAI messages.

A record holds {"conversations": [{"from": "system" | "human" | "gpt", "value": ...}, ...]} (the layout of
ShareGPT exports and of the many sets published in it). Each turn becomes a chat message (human -> user,
gpt -> assistant, system -> system; "user" and "assistant" are taken as they are), and from there on it is
the `chat` plugin: rendered with the tokenizer's chat template or data.chat_template, loss on the
assistant turns only, closing tag included.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from automodel.data.chat import ChatData
from automodel.data.checks import text_of
from automodel.data.examples import EncodeStats, ExamplesConfig
from automodel.errors import UserError

ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
TURN = '{"from": "human" | "gpt" | "system", "value": ...}'


@dataclasses.dataclass
class SharegptConfig(ExamplesConfig):
    conversations_column: str = "conversations"
    chat_template: Optional[str] = None  # null: the tokenizer's own; "chatml"; or a Jinja template
    packing: bool = False


class SharegptData(ChatData):
    Config = SharegptConfig
    hint = "name yours with data.conversations_column"
    option = "sharegpt"

    def columns(self):
        return (self.cfg.conversations_column,)

    def conversations(self, records, stats: EncodeStats) -> list[tuple[int, list[dict]]]:
        col, out = self.cfg.conversations_column, []
        for i, conv in enumerate(records.column(col)):
            if not isinstance(conv, list) or not all(isinstance(t, dict) and "from" in t and "value" in t
                                                     for t in conv):
                raise UserError(f"{records.source}: record {i + 1}: '{col}' must be a list of {TURN} turns")
            unknown = next((t["from"] for t in conv if t["from"] not in ROLES), None)
            if unknown is not None:
                raise UserError(f"{records.source}: record {i + 1}: a turn is from {unknown!r}; the speakers "
                                f"understood are: {', '.join(ROLES)}")
            if any(t["value"] is None for t in conv):
                stats.skip("conversations with a null turn")
                continue
            where = records.where(i)
            out.append((i, [{"role": ROLES[t["from"]], "content": text_of(t["value"], f"{where}: turn {k + 1}", "value")}
                            for k, t in enumerate(conv)]))
        return out
