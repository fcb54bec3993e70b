"""Data plugin `chat`: OpenAI-style conversations rendered with the tokenizer's chat template, loss on the
assistant turns only.

Each record holds a list of {"role", "content"} messages. The conversation is rendered once with the chat
template; each assistant turn's characters are found by rendering the conversation up to that turn (with
the generation prompt) and up to its end, and the tokens whose characters fall inside those spans are the
targets (the template's closing tag included, so the model learns to stop). data.chat_template overrides
the tokenizer's template ("chatml" names a built-in one); the template used is saved with the export.
A conversation with a null message content is left out (and counted), not trained on as the text "None".
A content is a string or, as OpenAI's format allows, a list of {"type": "text", "text": ...} parts (joined, as
the chat templates of transformers join them); a number becomes its text; anything else (an object, an
image part: that is data=vlm) stops the run naming the record and the message.
`sharegpt` (sharegpt.py) is this plugin reading ShareGPT's {"conversations": [{"from", "value"}]} records.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from automodel.batch import IGNORE_INDEX
from automodel.data import samples
from automodel.data.checks import check_size, text_of
from automodel.data.examples import EncodeStats, ExampleData, ExamplesConfig
from automodel.errors import UserError

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@dataclasses.dataclass
class ChatConfig(ExamplesConfig):
    messages_column: str = "messages"
    chat_template: Optional[str] = None  # null: the tokenizer's own; "chatml"; or a Jinja template
    packing: bool = False


class ChatData(ExampleData):
    Config = ChatConfig
    hint = "name yours with data.messages_column"
    option = "chat"  # named in messages
    target = "assistant turns"

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
            raise UserError(f"data={self.option}: the tokenizer has no chat template; set data.chat_template=chatml "
                            "(or a Jinja template)")
        tokenizer.chat_template = t  # exported with the model, so generation renders prompts the same way
        return t

    def conversations(self, records, stats: EncodeStats) -> list[tuple[int, list[dict]]]:
        """(record index, messages) of the usable records; a conversation with a null content is counted out."""
        out = []
        for i, conv in enumerate(records.column(self.cfg.messages_column)):
            if not isinstance(conv, list) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                                     for m in conv):
                raise UserError(f"{records.source}: record {i + 1}: '{self.cfg.messages_column}' must be a list of "
                                f"{{\"role\": ..., \"content\": ...}} messages")
            if any(m["content"] is None for m in conv):
                stats.skip("conversations with a null message content")
                continue
            where = records.where(i)
            out.append((i, [{"role": str(m["role"]), "content": content_text(m["content"], f"{where}: message {k + 1}")}
                            for k, m in enumerate(conv)]))
        return out

    def _conversations(self, records) -> list[list[dict]]:
        return [conv for _, conv in self.conversations(records, EncodeStats())]

    def render(self, tokenizer, template, messages, generation_prompt=False) -> str:
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=generation_prompt)

    def encode(self, tokenizer, records, seq_len):
        template, self._tokenizer = self.template(tokenizer), tokenizer
        stats = EncodeStats(rows=len(records))
        convs = self.conversations(records, stats)
        texts, spans = [], []
        for row, conv in convs:
            check_size([m["content"] for m in conv], records.where(row), self.cfg.max_record_bytes)
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
        enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True) if texts else {
            "input_ids": [], "offset_mapping": []}
        examples = []
        for (row, conv), ids, offsets, mine in zip(convs, enc["input_ids"], enc["offset_mapping"], spans):
            target = [any(s <= a < e for s, e in mine) for a, _ in offsets]
            stats.lengths.append(len(ids) - 1)
            if len(ids) - 1 > seq_len:
                stats.truncated += 1
                ids, target = ids[: seq_len + 1], target[: seq_len + 1]
            labels = [t if is_t else IGNORE_INDEX for t, is_t in zip(ids[1:], target[1:])]
            if not any(t != IGNORE_INDEX for t in labels):
                stats.dropped += 1
                continue
            examples.append((ids[:-1], labels))
            stats.origin.append(row)
            stats.empty += not any(m["content"] for m in conv if m["role"] == "assistant")
        return examples, stats

    def prompts(self, records, n):
        """The conversations up to their last assistant turn (rendered with the generation prompt), and that
        turn. A conversation too long for the model trained here loses whole turns from its start first."""
        tokenizer = getattr(self, "_tokenizer", None)  # set by encode(); sample prompts come after training
        if tokenizer is None:
            return []
        seq_len = self._fit[1]
        room = samples.budget(tokenizer, seq_len) if seq_len else None
        template, out = self.template(tokenizer), []
        for conv in self._conversations(records):
            last = max((i for i, m in enumerate(conv) if m["role"] == "assistant"), default=0)
            if not last:
                continue
            starts = [k for k in range(last) if k == 0 or conv[k]["role"] != "assistant"]
            for k in starts:  # the longest tail of the conversation that fits (else the whole: cut later)
                prompt = self.render(tokenizer, template, conv[k:last], generation_prompt=True)
                if room is None or samples.n_tokens(tokenizer, prompt) <= room:
                    break
            else:
                prompt = self.render(tokenizer, template, conv[:last], generation_prompt=True)
            out.append((prompt, conv[last]["content"]))
            if len(out) == n:
                break
        return out


def content_text(content, where: str) -> str:
    """A message's content as text: a string, a number's text, or the texts of a list of text parts, joined."""
    if isinstance(content, list) and content and all(isinstance(p, dict) for p in content):
        texts = []
        for p in content:
            if p.get("type") != "text" or "text" not in p:
                raise UserError(f"{where}: a content part of type {p.get('type')!r}; data=chat trains on text parts "
                                "{\"type\": \"text\", \"text\": ...} (conversations with images: data=vlm)")
            texts.append(text_of(p["text"], where, "content"))
        return "".join(texts)
    return text_of(content, where, "content")
