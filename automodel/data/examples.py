"""What the data plugins share: the source fields of their configs, the held-out split, packing, sampling.

A plugin subclasses `ExampleData` and implements `encode(tokenizer, records, seq_len)`, which turns a
`Records` table into (input_ids, labels) pairs (labels already shifted, IGNORE_INDEX where there is no loss)
and counts what it truncated and dropped. Everything else (which examples a rank reads at a step, packing,
validation batches, messages about unusable data) lives here once.
"""

from __future__ import annotations

import dataclasses
import os
import logging
from typing import Optional

from automodel.batch import IGNORE_INDEX, pack, packed_step_batch, step_batch
from automodel.data import checks, loading, samples
from automodel.errors import UserError
from automodel.sampling import GlobalBatchSampler

log = logging.getLogger(__name__)

Example = tuple[list[int], list[int]]
VAL_SEED = 20_240_917  # the held-out split does not move when train.seed changes


@dataclasses.dataclass
class SourceConfig:
    path: str = "???"  # a jsonl/json/parquet/csv/txt file, a save_to_disk folder, or a hub id
    split: str = "train"  # the split of a hub id or DatasetDict folder to train on
    val_path: Optional[str] = None  # held-out data in its own file/folder/hub id
    val_split: Optional[str] = None  # ... or a split of `path` (e.g. validation)
    val_size: int = 0  # ... or this many examples held out of the training data (seeded)
    # a record (a line of a JSON-lines or .txt file) larger than this is refused before it is tokenized
    max_record_bytes: int = 64 << 20


@dataclasses.dataclass
class ExamplesConfig(SourceConfig):
    """The source of a plugin whose examples are records (pairs, conversations), each cut to train.seq_len."""

    # more than this fraction of the examples longer than train.seq_len (cut, or left out) stops the run
    max_dropped_fraction: float = 0.2


@dataclasses.dataclass
class EncodeStats:
    rows: int = 0
    truncated: int = 0  # longer than train.seq_len: cut
    dropped: int = 0  # records that gave no example, whatever the reason (`skipped` names some of them)
    # records left out for a reason of their own, by that reason ("unanswerable questions (SQuAD v2.0)",
    # "records with a null completion"): counted and logged apart, not lumped into "no target token left"
    skipped: dict = dataclasses.field(default_factory=dict)
    # the record each example came from (filled by plugins whose examples are records): the held-out
    # examples' records are where the sample prompts come from
    origin: list = dataclasses.field(default_factory=list)
    # the input length in tokens of every example tokenized (kept, cut or left out): its percentiles say which
    # train.seq_len the data needs
    lengths: list = dataclasses.field(default_factory=list)
    empty: int = 0  # examples kept whose completion is empty: the end-of-sequence token is their only target

    def skip(self, reason: str, n: int = 1) -> None:
        if n:
            self.skipped[reason] = self.skipped.get(reason, 0) + n
            self.dropped += n

    def skip_notes(self) -> list[str]:
        return [f"skipped {n} {reason}" for reason, n in self.skipped.items()]

    def message(self, seq_len: int) -> str:
        no_target = self.dropped - sum(self.skipped.values())
        empty = (f", {self.empty} with an empty completion (only the end-of-sequence token to learn)"
                 if self.empty else "")
        return "; ".join([f"{self.rows} examples: {self.truncated} longer than train.seq_len={seq_len} were "
                          f"truncated, {no_target} dropped (no target token left){empty}", *self.skip_notes()])


class ExampleData:
    """Base of the tokenize-everything plugins (instruction, chat, squad, hellaswag)."""

    packing = False  # subclasses whose Config has `packing` read it from there
    hint = ""  # appended to a missing-column message, e.g. which keys map columns
    target = "completion"  # what the loss is on, as messages name it

    def __init__(self, config):
        _check_source(config)
        self.cfg = config
        self._cache: dict = {}
        self._fit = (None, None)  # (tokenizer, seq_len) of the last build: the sample prompts are cut to it
        self._origin = self._held_rows = None  # the record of each example; the records val_size held out

    # ------------------------------------------------ what subclasses provide
    def columns(self) -> tuple[str, ...]:
        return ()

    def encode(self, tokenizer, records: loading.Records, seq_len: int) -> tuple[list[Example], EncodeStats]:
        raise NotImplementedError

    def prompts(self, records: loading.Records, n: int) -> list[tuple[str, str]]:
        return []

    def read_columns(self) -> tuple[str, ...]:
        """The columns every record must have as read (before `reshape`)."""
        return self.columns()

    def reshape(self, records: loading.Records) -> loading.Records:
        """A published layout -> one record per example (SQuAD's nested file); as read by default."""
        return records

    # ------------------------------------------------ loading
    def records(self, which: str = "train") -> loading.Records | None:
        c = self.cfg
        if which == "train":
            where = dict(path=c.path, key="data.path", split=c.split)
        elif c.val_path:
            where = dict(path=c.val_path, key="data.val_path", split=c.split)
        elif c.val_split:
            where = dict(path=c.path, key="data.path", split=c.val_split)
        else:
            return None
        return self.reshape(loading.load(where.pop("path"), **where, required=self.read_columns(), hint=self.hint,
                                         max_record_bytes=c.max_record_bytes))

    def _encoded(self, tokenizer, seq_len: int, which: str) -> list[Example] | None:
        self._fit = (tokenizer, seq_len)
        key = (id(tokenizer), seq_len, which)
        if key not in self._cache:
            self._cache[key] = self._encode_split(tokenizer, seq_len, which)
        return self._cache[key]

    def _encode_split(self, tokenizer, seq_len: int, which: str) -> list[Example] | None:
        c = self.cfg
        if which == "val" and not (c.val_path or c.val_split):
            if not c.val_size:
                return None
            return self._held_out(tokenizer, seq_len)[1]
        if which == "train" and c.val_size and not (c.val_path or c.val_split):
            return self._held_out(tokenizer, seq_len)[0]
        records = self.records(which)
        return self._checked(tokenizer, records, seq_len, "data.val_path" if which == "val" else "data.path")

    def _checked(self, tokenizer, records: loading.Records, seq_len: int, key: str) -> list[Example]:
        examples, stats = self.encode(tokenizer, records, seq_len)
        checks.refuse_too_long(stats.lengths, seq_len, getattr(self.cfg, "max_dropped_fraction", None),
                               f"{key}='{records.source}'")
        if not examples:
            raise UserError(f"{key}='{records.source}' has no usable example: of {stats.message(seq_len)}; "
                            f"raise train.seq_len or check the data")
        if stats.empty == len(examples):
            raise UserError(f"{key}='{records.source}': all {len(examples)} usable examples have nothing in their "
                            f"{self.target}, so there is nothing to learn but the end-of-sequence token; check the "
                            f"data{f' ({self.hint})' if self.hint else ''}")
        for note in stats.skip_notes():
            log.warning("%s: %s", records.source, note)
        if stats.truncated or stats.empty or stats.dropped > sum(stats.skipped.values()):
            log.warning("%s: of %s", records.source, stats.message(seq_len))
        self._origin = stats.origin if len(stats.origin) == len(examples) else None
        return examples

    def _held_out(self, tokenizer, seq_len: int) -> tuple[list[Example], list[Example]]:
        import torch

        key = (id(tokenizer), seq_len, "held_out")
        if key not in self._cache:
            examples = self._checked(tokenizer, self.records("train"), seq_len, "data.path")
            n = self.cfg.val_size
            if n >= len(examples):
                raise UserError(f"data.val_size={n} leaves nothing to train on ({len(examples)} usable examples); "
                                f"lower it or set data.val_path")
            origin = self._origin
            perm = torch.randperm(len(examples), generator=torch.Generator().manual_seed(VAL_SEED)).tolist()
            held = set(perm[:n])
            self._held_rows = sorted(origin[i] for i in held) if origin else None
            self._cache[key] = ([e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)])
        return self._cache[key]

    # ------------------------------------------------ the DataPlugin contract
    def units(self, examples: list[Example], seq_len: int, what: str = "training") -> list:
        """What one sequence slot of a batch holds: an example, or (packing) a row of several."""
        if not self.packing:
            return examples
        rows = pack([len(ids) for ids, _ in examples], seq_len)
        tokens = sum(len(ids) for ids, _ in examples)
        log.info("packing: %d %s examples into %d rows of %d tokens: %.1f%% padding (%.1f%% when every example "
                 "is padded to train.seq_len)", len(examples), what, len(rows), seq_len,
                 100 * (1 - tokens / (len(rows) * seq_len)), 100 * (1 - tokens / (len(examples) * seq_len)))
        return [[examples[i] for i in row] for row in rows]

    def collate(self, units: list, micro_batch_size: int, pad_id: int):
        if self.packing:
            return packed_step_batch(units, micro_batch_size, pad_id)
        return step_batch(units, micro_batch_size, pad_id)

    def build(self, tokenizer, *, seq_len, seed, dp_rank, dp_size, global_batch_size, micro_batch_size, start_step=0):
        units = self.units(self._encoded(tokenizer, seq_len, "train"), seq_len)
        sampler = GlobalBatchSampler(len(units), global_batch_size, seed)
        pad_id = _pad_id(tokenizer)
        step = start_step
        while True:
            picked = [units[i] for i in sampler.rank_indices(step, dp_rank, dp_size, micro_batch_size)]
            yield self.collate(picked, micro_batch_size, pad_id)
            step += 1

    def val_batches(self, tokenizer, *, seq_len, dp_rank, dp_size, micro_batch_size):
        """This rank's micro-batches of the held-out data, or None. The set is split over the dp ranks in
        contiguous slices; a short last slice is topped up with target-free copies of a row, so every rank
        runs the same number of forward passes and the loss is exactly that of the whole set for any dp."""
        examples = self._encoded(tokenizer, seq_len, "val")
        if examples is None:
            return None
        units = self.units(examples, seq_len, "validation")
        per_rank = -(-len(units) // dp_size)
        mine = units[dp_rank * per_rank : (dp_rank + 1) * per_rank]
        mine = mine + [self.blank(units[0])] * (per_rank - len(mine))
        return [self.collate(mine[i : i + micro_batch_size], micro_batch_size, _pad_id(tokenizer))
                for i in range(0, len(mine), micro_batch_size)]

    def blank(self, unit):
        """A copy of `unit` without targets: the top-up of a short last validation slice."""
        if self.packing:
            return [(ids, [IGNORE_INDEX] * len(ids)) for ids, _ in unit]
        return unit[0], [IGNORE_INDEX] * len(unit[0])

    def sample_prompts(self, n: int) -> list[tuple[str, str]]:
        """Up to n (prompt, expected) pairs from the held-out data when there is any (val_path, val_split, or
        the records val_size held out), else from the training data; no prompt longer than train.seq_len
        tokens. Asked for after training: a problem here never fails the run."""
        tokenizer, seq_len = self._fit
        wanted = n if tokenizer is None else n * samples.CANDIDATES
        pairs = None
        try:  # held-out data that validation never read may hold what training refuses: then the training data
            if self.cfg.val_path or self.cfg.val_split:
                pairs = self.prompts(self.records("val"), wanted)
            elif self.cfg.val_size and tokenizer is not None:
                self._held_out(tokenizer, seq_len)
                rows = self._held_rows
                train = self.records("train")
                if rows:
                    pairs = self.prompts(train.subset(rows, f"{train.source} (held out)"), wanted)
        except UserError:
            pairs = None
        pairs = pairs or self.prompts(self.records("train"), wanted)
        return pairs if tokenizer is None else samples.fitting(tokenizer, pairs, n, seq_len)


def _check_source(config) -> None:
    """The source settings that are wrong whatever the data holds."""
    if config.val_size < 0:
        raise UserError(f"data.val_size={config.val_size} must be >= 0 (examples held out for validation; 0: none)")
    if config.max_record_bytes < 1:
        raise UserError(f"data.max_record_bytes={config.max_record_bytes} must be at least 1 (bytes; default 64 MiB)")
    fraction = getattr(config, "max_dropped_fraction", 0.0)
    if not 0 <= fraction <= 1:
        raise UserError(f"data.max_dropped_fraction={fraction} must be in [0, 1] (the share of examples longer than "
                        "train.seq_len that may be cut or left out)")
    chosen = [k for k in ("val_path", "val_split", "val_size") if getattr(config, k)]
    if len(chosen) > 1:
        given = " and ".join(f"data.{k}={getattr(config, k)!r}" for k in chosen)
        keep = " ".join([*(f"data.{k}={0 if k == 'val_size' else 'null'}" for k in chosen[:-1]),
                         f"data.{chosen[-1]}={getattr(config, chosen[-1])}"])
        raise UserError(f"{given} both choose the held-out data; keep one, e.g. {keep}")
    path, val_split = str(config.path), config.val_split
    if val_split and os.path.isfile(os.path.expanduser(path)):
        raise UserError(f"data.val_split={val_split!r}: data.path='{path}' is one file, which has no split "
                        f"'{val_split}'; hold examples out of it with data.val_split=null data.val_size=N, or give "
                        "a held-out file with data.val_split=null data.val_path=FILE")


def _pad_id(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if tid is not None:
            return tid
    return 0


def mask_before(full: list[int], start: int, seq_len: int, stats: EncodeStats) -> Example | None:
    """(input_ids, labels) for a token sequence whose targets begin at token `start`, cut to seq_len."""
    stats.lengths.append(len(full) - 1)
    if len(full) - 1 > seq_len:
        stats.truncated += 1
        full = full[: seq_len + 1]
    labels = [t if i + 1 >= start else IGNORE_INDEX for i, t in enumerate(full[1:])]
    if not any(t != IGNORE_INDEX for t in labels):
        stats.dropped += 1
        return None
    return full[:-1], labels
