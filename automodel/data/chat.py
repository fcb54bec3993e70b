"""Data plugin `chat`: OpenAI-style conversations rendered with the tokenizer's chat template, loss on the
assistant turns only.

Each record holds a list of {"role", "content"} messages. The conversation is rendered once with the chat
template; each assistant turn's characters are found by rendering the conversation up to that turn (with
the generation prompt) and up to its end, and the tokens whose characters fall inside those spans are the
targets (the template's closing tag included, so the model learns to stop). data.chat_template overrides
the tokenizer's template ("chatml" names a built-in one); the template used is saved with the export.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from automodel.batch import IGNORE_INDEX
from automodel.data.examples import EncodeStats, ExampleData, SourceConfig
from automodel.errors import UserError

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@dataclasses.dataclass
class ChatConfig(SourceConfig):
    messages_column: str = "messages"
    chat_template: Optional[str] = None  # null: the tokenizer's own; "chatml"; or a Jinja template
    packing: bool = False


class ChatData(ExampleData):
    Config = ChatConfig
    hint = "name yours with data.messages_column"

    def __init__(self, config: ChatConfig):
        super().__init__(config)
        self.packing = config.packing

    def columns(self):
        return (self.cfg.messages_column,)

    def template(self, tokenizer) -> str:
        t = self.cfg.chat_template
        if t == "chatml":
            t = CHATML
        t = t or getattr(tokenizer, "chat_template", None)
        if not t:
            raise UserError("data=chat: the tokenizer has no chat template; set data.chat_template=chatml "
                            "(or a Jinja template)")
        tokenizer.chat_template = t  # exported with the model, so generation renders prompts the same way
        return t

    def _conversations(self, records) -> list[list[dict]]:
        out = []
        for i, conv in enumerate(records.column(self.cfg.messages_column)):
            if not isinstance(conv, list) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                                     for m in conv):
                raise UserError(f"{records.source}: record {i + 1}: '{self.cfg.messages_column}' must be a list of "
                                f"{{\"role\": ..., \"content\": ...}} messages")
            out.append([{"role": str(m["role"]), "content": str(m["content"])} for m in conv])
        return out

    def render(self, tokenizer, template, messages, generation_prompt=False) -> str:
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=generation_prompt)

    def encode(self, tokenizer, records, seq_len):
        template, self._tokenizer = self.template(tokenizer), tokenizer
        convs = self._conversations(records)
        stats = EncodeStats(rows=len(convs))
        texts, spans = [], []
        for conv in convs:
            full = self.render(tokenizer, template, conv)
            mine = []
            for i, m in enumerate(conv):
                if m["role"] != "assistant":
                    continue
                start = len(self.render(tokenizer, template, conv[:i], generation_prompt=True))
                end_text = self.render(tokenizer, template, conv[: i + 1])
                if not full.startswith(end_text):
                    raise UserError("the chat template does not render a conversation's turns as prefixes of the "
                                    "whole conversation, so assistant turns cannot be located; set data.chat_template")
                mine.append((start, len(end_text)))
            texts.append(full)
            spans.append(mine)
        enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        examples = []
        for ids, offsets, mine in zip(enc["input_ids"], enc["offset_mapping"], spans):
            target = [any(s <= a < e for s, e in mine) for a, _ in offsets]
            if len(ids) - 1 > seq_len:
                stats.truncated += 1
                ids, target = ids[: seq_len + 1], target[: seq_len + 1]
            labels = [t if is_t else IGNORE_INDEX for t, is_t in zip(ids[1:], target[1:])]
            if not any(t != IGNORE_INDEX for t in labels):
                stats.dropped += 1
                continue
            examples.append((ids[:-1], labels))
        return examples, stats

    def prompts(self, records, n):
        tokenizer = getattr(self, "_tokenizer", None)  # set by encode(); sample prompts come after training
        if tokenizer is None:
            return []
        template, out = self.template(tokenizer), []
        for conv in self._conversations(records):
            last = max((i for i, m in enumerate(conv) if m["role"] == "assistant"), default=0)
            if last:
                out.append((self.render(tokenizer, template, conv[:last], generation_prompt=True), conv[last]["content"]))
            if len(out) == n:
                break
        return out
