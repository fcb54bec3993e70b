"""Data plugin `vlm`: conversations with images, for image-text models, rendered by the model's own processor.

Each record holds OpenAI-style `messages` whose content is a string or a list of parts ({"type": "image"},
{"type": "text", "text": ...}) and, in `images`, one image per image part, in order: a local path (relative to
the data file's folder, or data.image_root), or a `datasets` Image (decoded to PIL). URLs are refused (this
reads no network). The processor renders the chat template, expands each image into the model's image tokens
and resizes the image as it prescribes. The loss is on the assistant turns only: each turn's token span is
found by running the processor on the conversation up to the turn (with the generation prompt) and up to its
end, which must be prefixes of the whole; image tokens are never targets. An example is never cut (a cut
through an image's tokens breaks the model's forward): one longer than train.seq_len is left out and counted.

Only text and the images' references are held in memory: each micro-batch runs the processor again on its own
examples, so a large image set costs its files, not its decoded pixels. Packing is refused (each row would mix
several conversations' images and image-token layouts).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import NamedTuple, Optional

from automodel.batch import IGNORE_INDEX, StepBatch, collate as collate_text
from automodel.data.checks import check_size, text_of
from automodel.data.examples import EncodeStats, ExampleData, ExamplesConfig
from automodel.errors import UserError
from automodel.images import open_image

log = logging.getLogger(__name__)


@dataclasses.dataclass
class VLMConfig(ExamplesConfig):
    messages_column: str = "messages"
    images_column: str = "images"
    image_root: Optional[str] = None  # relative image paths are under this folder; null: the data file's folder
    bad_images: str = "refuse"  # refuse | skip: a missing, corrupt or non-image file stops the run, or its record is left out
    packing: bool = False


class VLMExample(NamedTuple):
    ids: list  # input_ids (the full sequence but its last token)
    labels: list  # already shifted; IGNORE_INDEX off the assistant turns
    text: str  # the rendered conversation (image placeholders not yet expanded)
    images: tuple  # the record's image references: paths or PIL images


class VLMData(ExampleData):
    Config = VLMConfig
    option = "vlm"
    hint = "name yours with data.messages_column / data.images_column"

    def __init__(self, config: VLMConfig):
        super().__init__(config)
        if config.packing:
            raise UserError("data=vlm: packing is not supported for image-text conversations (each packed row would "
                            "mix several conversations' images); set data.packing=false")
        if config.bad_images not in ("refuse", "skip"):
            raise UserError(f"data.bad_images='{config.bad_images}' is not one of: refuse, skip")
        self.processor = None

    def use_processor(self, processor) -> None:
        """Called by the engine with the model plugin's processor before any batch is built."""
        self.processor = processor

    def columns(self):
        return (self.cfg.messages_column, self.cfg.images_column)

    # ------------------------------------------------ encoding
    def encode(self, tokenizer, records, seq_len):
        if self.processor is None:
            raise UserError("data=vlm needs an image-text model (its processor renders the images); the model "
                            "chosen is a text-only model: use data=chat for text conversations")
        stats = EncodeStats(rows=len(records))
        root = self._image_root(records.source)
        examples, first_bad = [], None
        never = self._image_token_ids()  # never a target
        for row, record in enumerate(records.rows):
            messages = _messages(record.get(self.cfg.messages_column), records.where(row), self.cfg.messages_column)
            images = _references(record.get(self.cfg.images_column), records.source, row, self.cfg.images_column,
                                 root)
            wanted = sum(1 for m in messages for part in _parts(m) if part.get("type") == "image")
            if wanted != len(images):
                raise UserError(f"{records.source}: record {row + 1} has {wanted} image part(s) in its messages but "
                                f"{len(images)} image(s) in '{self.cfg.images_column}'; they must match, in order")
            bad = _first_unreadable(images)
            if bad is not None:
                where = f"{records.source}: record {row + 1}: image {bad[0]!r} {bad[1]}"
                if self.cfg.bad_images == "refuse":
                    raise UserError(f"{where}; fix or remove it, or set data.bad_images=skip to leave such records out")
                first_bad = first_bad or where
                stats.skip("records with an unreadable image")
                continue
            check_size([p["text"] if isinstance(p, dict) else p for m in messages for p in _texts(m)],
                       records.where(row), self.cfg.max_record_bytes)
            example = self._encode_one(messages, images, seq_len, stats, records.source, row, never)
            if example is not None:
                examples.append(example)
                stats.origin.append(row)
        if first_bad:
            log.warning("data.bad_images=skip: the first one: %s", first_bad)
        return examples, stats

    def _encode_one(self, messages, images, seq_len, stats, source, row, never: set) -> VLMExample | None:
        text = self._render(messages)
        full = self._ids(text, images)
        stats.lengths.append(len(full) - 1)
        if len(full) - 1 > seq_len:
            stats.skip(f"examples longer than train.seq_len={seq_len} (an image-text example is not cut)")
            return None
        target = [False] * len(full)
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            # where the turn's tokens start and end: where the conversation rendered up to it (with the generation
            # prompt) and through it stop agreeing with the whole. A boundary token may merge text on both sides
            # ("ASSISTANT: " + "circle" -> "▁c"): that token starts the targets, and ends them when it holds the
            # turn's last characters
            start = _common_prefix(self._ids(self._render(messages[:i], generation_prompt=True),
                                             _images_in(messages[:i], images)), full)
            through = full if i == len(messages) - 1 else self._ids(self._render(messages[: i + 1]),
                                                                    _images_in(messages[: i + 1], images))
            end = _common_prefix(through, full)
            end += end < len(through)
            if end <= start:
                raise UserError(f"{source}: record {row + 1}: the processor's chat template does not render the "
                                "conversation up to an assistant turn as the start of the whole, so the turn cannot "
                                "be located")
            for k in range(start, end):
                target[k] = True
        labels = [t if is_t and t not in never else IGNORE_INDEX for t, is_t in zip(full[1:], target[1:])]
        if not any(t != IGNORE_INDEX for t in labels):
            stats.dropped += 1
            return None
        return VLMExample(full[:-1], labels, text, tuple(images))

    def _render(self, messages, generation_prompt: bool = False) -> str:
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def _ids(self, text: str, images) -> list[int]:
        return self._process(text, images)["input_ids"][0].tolist()

    def _process(self, text: str, images) -> dict:
        pictures = [open_image(i) for i in images] or None
        return dict(self.processor(text=[text], images=pictures, return_tensors="pt", add_special_tokens=False))

    def _image_token_ids(self) -> set:
        """The ids of the tokens that stand for images (never a target)."""
        tok, found = self.processor.tokenizer, set()
        for owner in (self.processor, tok):
            for name in dir(owner):
                if not name.endswith("_token") or not any(w in name for w in ("image", "vision", "boi", "eoi")):
                    continue
                value = getattr(owner, name, None)
                if isinstance(value, str):
                    tid = tok.convert_tokens_to_ids(value)
                    if isinstance(tid, int) and tid != tok.unk_token_id:
                        found.add(tid)
        tid = getattr(self.processor, "image_token_id", None)
        if isinstance(tid, int):
            found.add(tid)
        return found

    def _image_root(self, source: str) -> str:
        if self.cfg.image_root:
            return os.path.expanduser(self.cfg.image_root)
        path = os.path.expanduser(str(self.cfg.path))
        return path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))

    # ------------------------------------------------ batches
    def collate(self, units: list, micro_batch_size: int, pad_id: int) -> StepBatch:
        micro = [self._micro_batch(units[i : i + micro_batch_size], pad_id)
                 for i in range(0, len(units), micro_batch_size)]
        targets = sum(sum(1 for t in u.labels if t != IGNORE_INDEX) for u in units)
        return StepBatch(micro, targets, sum(len(u.ids) for u in units))

    def _micro_batch(self, units: list, pad_id: int) -> dict:
        """input_ids and labels right-padded as for text; the processor's per-token tensors (e.g. token_type_ids)
        padded the same way; its image tensors (pixel_values, image_grid_thw, ...) concatenated, in order."""
        import torch

        batch = collate_text([(u.ids, u.labels) for u in units], pad_id)
        width = batch["input_ids"].shape[1]
        media = [self._process(u.text, u.images) for u in units]
        for unit, m in zip(units, media):
            if m["input_ids"][0, :-1].tolist() != list(unit.ids):
                raise RuntimeError("the processor tokenized an example differently the second time")
        for key in media[0]:
            if key in ("input_ids", "attention_mask"):
                continue
            values = [m[key] for m in media]
            if all(v.dim() == 2 and v.shape[0] == 1 and v.shape[1] == len(u.ids) + 1 for v, u in zip(values, units)):
                rows = torch.zeros((len(units), width), dtype=values[0].dtype)
                for r, (v, u) in enumerate(zip(values, units)):
                    rows[r, : len(u.ids)] = v[0, : len(u.ids)]
                batch[key] = rows
            else:
                batch[key] = torch.cat(values, dim=0)
        return batch

    def blank(self, unit):
        return unit._replace(labels=[IGNORE_INDEX] * len(unit.labels))

    def sample_prompts(self, n: int) -> list[tuple[str, str]]:
        return []  # greedy samples are text-only here; `automodel generate` does not take images yet


def _common_prefix(a: list, b: list) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _messages(value, where: str, column: str) -> list[dict]:
    """The record's messages; a content is text (a number becomes its text) or a list of parts whose text
    parts hold text: anything else would reach the chat template as its Python repr."""
    if not isinstance(value, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        raise UserError(f"{where}: '{column}' must be a list of {{\"role\": ..., \"content\": ...}} messages")
    out = []
    for n, m in enumerate(value):
        content, at = m["content"], f"{where}: message {n + 1}"
        if isinstance(content, list):
            if not all(isinstance(part, dict) for part in content):
                raise UserError(f"{at}: a content part is not an object; parts are {{\"type\": \"image\"}} or "
                                "{\"type\": \"text\", \"text\": ...}")
            content = [{k: v for k, v in part.items() if v is not None} for part in content]
            for part in content:
                if part.get("type") == "text":
                    part["text"] = text_of(part.get("text"), at, "text")
        elif content is not None:
            content = text_of(content, at, "content")
        out.append({"role": str(m["role"]), "content": content})
    return out


def _parts(message: dict) -> list:
    return message["content"] if isinstance(message["content"], list) else []


def _texts(message: dict) -> list:
    """The message's texts: its content, or its text parts."""
    return [message["content"]] if isinstance(message["content"], str) else [
        p for p in _parts(message) if p.get("type") == "text"]


def _images_in(messages: list[dict], images: list) -> list:
    n = sum(1 for m in messages for part in _parts(m) if part.get("type") == "image")
    return images[:n]


def _references(value, source: str, row: int, column: str, root: str) -> list:
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        value = [value]
    out = []
    for item in value:
        if isinstance(item, dict):  # a datasets Image column read without decoding: {"path", "bytes"}
            item = item.get("bytes") or item.get("path")
        if isinstance(item, str):
            if "://" in item:
                raise UserError(f"{source}: record {row + 1}: image '{item}' is a URL; automodel reads images from "
                                f"local files (or a datasets Image column): download them first")
            item = item if os.path.isabs(item) else os.path.join(root, item)
        out.append(item)
    return out


def _first_unreadable(images: list) -> tuple[str, str] | None:
    """(the image, why) for the first image that cannot be decoded; None when all can."""
    for reference in images:
        label = reference if isinstance(reference, str) else type(reference).__name__
        if isinstance(reference, str) and not os.path.isfile(reference):
            return label, "does not exist"
        try:
            open_image(reference).load()
        except Exception as e:  # PIL raises several types for a corrupt or non-image file
            return label, f"cannot be read as an image ({type(e).__name__})"
    return None
