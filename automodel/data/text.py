"""Data plugin `text`: pretraining on raw text, tokenized and concatenated into fixed-length blocks.

Every document (a record's text column; a line of a .txt file) becomes [bos] tokens [eos]; the documents
are concatenated and cut into blocks of train.seq_len + 1 tokens overlapping by one (input = block[:-1],
labels = block[1:]), so every token pair is trained on once per epoch and no block needs padding.

`data.streaming=true` reads the source as a `datasets.IterableDataset` (corpora larger than memory): the
order is a seeded shuffle buffer per epoch, every rank reads the stream and keeps its slice of each global
batch, and a run resumed at step k re-reads (and discards) the first k global batches, so it sees exactly
the batches an uninterrupted run saw. Without streaming the blocks are made once and sampled like examples.

A document that is not text (a list, an object) stops the run naming its record; a number becomes its text.
One larger than data.max_record_bytes is refused by its line (or record) before it is tokenized: a stream is
checked in file order, before its shuffle, so the line named is the file's.
"""

from __future__ import annotations

import dataclasses
import logging
import os

from automodel.batch import step_batch
from automodel.data import loading
from automodel.data.checks import check_size, text_of
from automodel.data.examples import EncodeStats, ExampleData, SourceConfig, _pad_id
from automodel.errors import UserError

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TextConfig(SourceConfig):
    text_column: str = "text"
    streaming: bool = False  # read through a datasets IterableDataset, never all in memory
    shuffle_buffer: int = 10_000  # streaming only: documents in the seeded shuffle buffer


class TextData(ExampleData):
    Config = TextConfig
    hint = "name yours with data.text_column"

    def columns(self):
        return (self.cfg.text_column,)

    def _doc_tokens(self, tokenizer, texts: list, where=None) -> list[list[int]]:
        """[bos] tokens [eos] of each non-empty document; `where(i)` names the i-th one's record in a message
        (None: already checked as the stream was read)."""
        if where is not None:
            texts = [self._text(t, where(i)) for i, t in enumerate(texts)]
        texts = [t for t in texts if t is not None and t.strip()]
        if not texts:
            return []
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        return [bos + ids + eos for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def _text(self, value, where: str) -> str | None:
        if value is None:
            return None
        text = text_of(value, where, self.cfg.text_column)
        check_size((text,), where, self.cfg.max_record_bytes)
        return text

    def _checked_row(self, row: dict, index: int) -> dict:
        """A streamed row, checked in file order (before the shuffle): the line named is the file's."""
        path = self.cfg.path
        lines = loading.read_as_lines(os.path.expanduser(path))
        where = f"{path}:{index + 1}" if lines else f"{path}: record {index + 1}"
        return {self.cfg.text_column: self._text(row[self.cfg.text_column], where)}

    def encode(self, tokenizer, records, seq_len):
        stream: list[int] = []
        docs = self._doc_tokens(tokenizer, records.column(self.cfg.text_column), records.where)
        for d in docs:
            stream.extend(d)
        n_blocks = (len(stream) - 1) // seq_len if stream else 0
        if n_blocks == 0:
            raise UserError(f"{records.source}: {len(docs)} non-empty documents of {len(records)} records hold "
                            f"{len(stream)} tokens, fewer than one block of train.seq_len+1={seq_len + 1}; "
                            f"add text or lower train.seq_len")
        blocks = [stream[k * seq_len : k * seq_len + seq_len + 1] for k in range(n_blocks)]
        log.info("%s: %d documents, %d tokens -> %d blocks of %d (%d tail tokens unused)", records.source,
                 len(docs), len(stream), n_blocks, seq_len, len(stream) - 1 - n_blocks * seq_len)
        return [(b[:-1], b[1:]) for b in blocks], EncodeStats(rows=len(records))

    def build(self, tokenizer, *, seq_len, seed, dp_rank, dp_size, global_batch_size, micro_batch_size, start_step=0):
        if not self.cfg.streaming:
            return super().build(tokenizer, seq_len=seq_len, seed=seed, dp_rank=dp_rank, dp_size=dp_size,
                                 global_batch_size=global_batch_size, micro_batch_size=micro_batch_size,
                                 start_step=start_step)
        if self.cfg.val_size:
            raise UserError("data.val_size cannot hold examples out of a stream; set data.val_path or data.val_split")
        return self._stream(tokenizer, seq_len, seed, dp_rank, dp_size, global_batch_size, micro_batch_size, start_step)

    def blocks(self, tokenizer, seq_len: int, seed: int):
        """Endless blocks of seq_len + 1 tokens from the stream, epoch after epoch (a new shuffle each)."""
        ds = loading.load(self.cfg.path, split=self.cfg.split, streaming=True, required=self.columns(), hint=self.hint)
        ds = ds.map(self._checked_row, with_indices=True).shuffle(seed=seed, buffer_size=self.cfg.shuffle_buffer)
        epoch = 0
        while True:
            ds.set_epoch(epoch)
            buf: list[int] = []
            made = 0
            batch = []
            for row in ds:
                batch.append(row[self.cfg.text_column])
                if len(batch) < 256:
                    continue
                for d in self._doc_tokens(tokenizer, batch):
                    buf.extend(d)
                batch = []
                while len(buf) > seq_len:
                    yield buf[: seq_len + 1]
                    buf, made = buf[seq_len:], made + 1
            for d in self._doc_tokens(tokenizer, batch):
                buf.extend(d)
            while len(buf) > seq_len:
                yield buf[: seq_len + 1]
                buf, made = buf[seq_len:], made + 1
            if made == 0:
                raise UserError(f"data.path='{self.cfg.path}' holds fewer than train.seq_len+1={seq_len + 1} tokens; "
                                f"add text or lower train.seq_len")
            epoch += 1

    def _stream(self, tokenizer, seq_len, seed, dp_rank, dp_size, global_batch_size, micro_batch_size, start_step):
        blocks = self.blocks(tokenizer, seq_len, seed)
        for _ in range(start_step * global_batch_size):  # resume: the stream has no random access
            next(blocks)
        from automodel.sampling import rank_share

        pad_id = _pad_id(tokenizer)
        while True:
            step = [next(blocks) for _ in range(global_batch_size)]
            mine = rank_share(step, dp_rank, dp_size, micro_batch_size)
            yield step_batch([(b[:-1], b[1:]) for b in mine], micro_batch_size, pad_id)

    def sample_prompts(self, n):
        return []  # raw text has no prompt/answer pairs (and a stream is not read twice)
