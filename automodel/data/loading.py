"""Where data plugins read their records: local files, `save_to_disk` folders and hub ids, through one function.

    jsonl / json     read here, line by line, so a malformed line is named by file and line number (and the
                     bundled default set loads without importing `datasets`); a JSON array of objects, or
                     one JSON object spread over many lines (a published file such as SQuAD's), is one document
    parquet / csv / txt        `datasets.load_dataset(<builder>, data_files=path)`
    a folder         `datasets.load_from_disk` (a `save_to_disk` folder; a DatasetDict is indexed by split)
    anything else    a hub id: `datasets.load_dataset(path, split=...)`; offline it stops with one line

`streaming=True` returns a `datasets.IterableDataset` (every format goes through `datasets` then) for corpora
larger than memory; otherwise a `Records` table held in memory.

Text is read as UTF-8 with or without a byte-order mark: Windows editors start a UTF-8 file with one, and
it would otherwise make the first line invalid JSON (or the first document begin with U+FEFF).

A line longer than `max_record_bytes` (data.max_record_bytes) of a JSON-lines or .txt file is refused by file
and line before anything else reads it: a JSON-lines line is read at most that many bytes deep, and a .txt
file is scanned in bounded chunks before `datasets` reads it, so a 1 GB line costs neither 1 GB of memory nor
a tokenizer's out-of-memory abort. (A whole JSON document, an array or one object, is parsed whole; its
records' texts are measured before tokenizing, as every other format's are: see examples.check_size.)
"""

from __future__ import annotations

import json
import os
from typing import Any

from automodel.errors import UserError

BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".tsv": "csv", ".txt": "text",
            ".text": "text"}


class Records:
    """An in-memory table: rows as dicts, with the source named for messages. `lines` holds the line of the
    file each row was read from, where rows are lines (JSON lines, .txt), so a message can say file:line."""

    def __init__(self, rows: list[dict], source: str, columns: list[str], lines: list[int] | None = None):
        self.rows, self.source, self.columns, self.lines = rows, source, columns, lines

    def where(self, i: int) -> str:
        """Row i as a message names it: `file:line`, or `source: record N` where rows are not lines."""
        if self.lines is not None:
            return f"{self.source}:{self.lines[i]}"
        return f"{self.source}: record {i + 1}"

    def subset(self, indices: list[int], source: str) -> "Records":
        return Records([self.rows[i] for i in indices], source, self.columns,
                       [self.lines[i] for i in indices] if self.lines is not None else None)

    def __len__(self) -> int:
        return len(self.rows)

    def column(self, name: str) -> list:
        return [r[name] for r in self.rows]

    def require(self, columns: tuple[str, ...], hint: str = "") -> None:
        """Stop with one line naming the columns that exist when one we need is missing."""
        for c in columns:
            if c not in self.columns:
                raise UserError(f"{self.source}: no column '{c}'; the columns are: {', '.join(self.columns)}"
                                + (f" ({hint})" if hint else ""))


def _looks_local(path: str) -> bool:
    """A path the user meant as a local file (a hub id is `name` or `owner/name`, without a file extension)."""
    return (os.path.isabs(path) or path.startswith(("./", "../", "~")) or path.count("/") > 1
            or os.path.splitext(path)[1].lower() in BUILDERS)


def _datasets():
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    return datasets


def load(path: str, *, key: str = "data.path", split: str = "train", streaming: bool = False,
         required: tuple[str, ...] = (), hint: str = "", max_record_bytes: int | None = None) -> Any:
    """The records at `path` (a Records table, or an IterableDataset when streaming); never empty.
    `~` is the user's home, as in a shell (a quoted override or a YAML value reaches here unexpanded)."""
    path = os.path.expanduser(path)
    if os.path.isdir(path):
        data = _from_disk(path, key, split, streaming)
    elif os.path.isfile(path):
        if split != "train":
            raise UserError(f"{key}='{path}' is one file, which has no split '{split}' (hub ids and save_to_disk "
                            f"folders have splits): it is all data.split=train; held-out data: data.val_path or "
                            "data.val_size")
        ext = os.path.splitext(path)[1].lower()
        if ext not in BUILDERS:
            raise UserError(f"{key}='{path}': unknown file type '{ext or '(none)'}'; use one of: "
                            f"{', '.join(sorted(BUILDERS))}, or a save_to_disk folder")
        if BUILDERS[ext] == "json" and not streaming:
            data = _read_json(path, required, hint, max_record_bytes)
        else:
            if BUILDERS[ext] == "text" and max_record_bytes and not streaming:  # streams are checked as read
                _refuse_long_line(path, max_record_bytes)
            data = _builder(BUILDERS[ext], path, key, streaming)
    elif _looks_local(path):
        raise UserError(f"{key}='{path}' does not exist or is not a file")
    else:
        data = _hub(path, key, split, streaming)
    if isinstance(data, Records):
        if not len(data):
            raise UserError(f"{key}='{path}' holds no examples")
        data.require(required, hint)
        return data
    if streaming:
        names = list(data.column_names or []) or list(next(iter(data), {}) or {})
        if not names:
            raise UserError(f"{key}='{path}' holds no examples")
    else:
        names = list(data.column_names)
    rec_hint = f" ({hint})" if hint else ""
    for c in required:
        if c not in names:
            raise UserError(f"{path}: no column '{c}'; the columns are: {', '.join(names)}{rec_hint}")
    if streaming:
        return data
    if len(data) == 0:
        raise UserError(f"{key}='{path}' holds no examples")
    lines = list(range(1, len(data) + 1)) if read_as_lines(path) else None
    return Records(data.to_list(), path, names, lines)  # a .txt file's rows are its lines, empty ones included


def read_as_lines(path: str) -> bool:
    """A .txt file: `datasets` reads one row per line, empty lines included, so row i is line i + 1."""
    return os.path.isfile(path) and BUILDERS.get(os.path.splitext(path)[1].lower()) == "text"


def too_long(where: str, limit: int, size: int | None = None, what: str = "line") -> UserError:
    """One line for a record over data.max_record_bytes (`size` when it is known: a line is not read whole)."""
    how = f"is {size} bytes, more than" if size is not None else "is longer than"
    return UserError(f"{where}: this {what} {how} data.max_record_bytes={limit} ({_human(limit)}); split it into "
                     "smaller records or remove it, or raise data.max_record_bytes")


def _human(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def _refuse_long_line(path: str, limit: int, chunk: int = 1 << 20) -> None:
    """Stop at the first line longer than `limit` bytes, reading the file in chunks (never a whole line)."""
    lineno, run = 1, 0  # the line being read, and its bytes so far
    with open(path, "rb") as f:
        while block := f.read(chunk):
            pieces = block.split(b"\n")
            if run + len(pieces[0]) > limit or max(map(len, pieces[1:]), default=0) > limit:
                for k, piece in enumerate(pieces):  # rare: find which line
                    run = (run if k == 0 else 0) + len(piece)
                    if run > limit:
                        raise too_long(f"{path}:{lineno + k}", limit)
            lineno += len(pieces) - 1
            run = run + len(pieces[0]) if len(pieces) == 1 else len(pieces[-1])


BOM = b"\xef\xbb\xbf"


def _read_json(path: str, required: tuple[str, ...], hint: str, max_bytes: int | None) -> Records:
    """A JSON-lines file line by line (each line read at most max_bytes deep), or a whole JSON document: an
    array of objects, or one object over many lines (a published file such as SQuAD's)."""
    with open(path, "rb") as f:
        first = _first_char(f)
        if first == b"[":
            return _read_array(path, f.read())
        rows, lines = [], []
        for lineno, raw in _lines(f, path, max_bytes):
            line = _decode(raw, path, lineno)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                if not rows and first == b"{" and e.pos >= len(line.rstrip()):  # a first line that is only the
                    whole = _one_object(_decode(raw + f.read(), path, lineno))  # start of one document
                    if whole is not None:
                        return Records([whole], path, list(whole))
                raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            missing = [c for c in required if c not in row]
            if missing:
                raise UserError(f"{path}:{lineno}: no column '{missing[0]}'; the columns are: {', '.join(row)}"
                                + (f" ({hint})" if hint else ""))
            rows.append(row)
            lines.append(lineno)
    return Records(rows, path, list(rows[0]) if rows else [], lines)


def _first_char(f) -> bytes:
    """The first byte that is not white space (b"" for none), the file left at its start past a BOM."""
    start = 3 if f.read(3) == BOM else 0
    f.seek(start)
    while block := f.read(1 << 16):
        stripped = block.lstrip()
        if stripped:
            f.seek(start)
            return stripped[:1]
    f.seek(start)
    return b""


def _lines(f, path: str, max_bytes: int | None):
    """(line number, bytes) of each line; a line longer than max_bytes is refused after max_bytes + 1 bytes."""
    lineno = 0
    while True:
        raw = f.readline(max_bytes + 1) if max_bytes else f.readline()
        if not raw:
            return
        lineno += 1
        if max_bytes and len(raw.rstrip(b"\r\n")) > max_bytes:
            raise too_long(f"{path}:{lineno}", max_bytes)
        yield lineno, raw


def _decode(raw: bytes, path: str, lineno: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}:{lineno}: not UTF-8 text (byte {e.start} of the line is 0x{raw[e.start]:02x}); "
                        "JSON lines must be UTF-8 text, one JSON object per line") from None


def _read_array(path: str, raw: bytes) -> Records:
    try:
        rows = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start} is 0x{raw[e.start]:02x}); a JSON file must be "
                        "UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise UserError(f"{path}: item {i} of the array is a {type(row).__name__}, expected a JSON object")
    return Records(rows, path, list(rows[0]) if rows else [])


def _one_object(text: str) -> dict | None:
    """The object, when the whole text is one JSON object spread over several lines; else None."""
    stripped = text.strip()
    if not stripped.startswith("{") or "\n" not in stripped:
        return None
    try:
        obj = json.loads(stripped)
    except json.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None


def _first_line(e: BaseException) -> str:
    """The innermost cause's first line: `datasets` wraps the parser's message (which names the line)."""
    while e.__cause__ is not None or (e.__context__ is not None and not e.__suppress_context__):
        e = e.__cause__ or e.__context__
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _builder(builder: str, path: str, key: str, streaming: bool):
    datasets = _datasets()
    kwargs = {"sample_by": "line", "encoding": "utf-8-sig"} if builder == "text" else {}
    if builder == "csv" and path.lower().endswith(".tsv"):
        kwargs["sep"] = "\t"
    try:
        return datasets.load_dataset(builder, data_files=path, split="train", streaming=streaming, **kwargs)
    except Exception as e:  # pandas / pyarrow parse errors carry the line where they have one
        if "corresponds to no data" in str(e) or "at least one example" in _first_line(e):  # a file without rows
            raise UserError(f"{key}='{path}' holds no examples") from None
        raise UserError(f"{path}: could not be read as {builder} ({_first_line(e)})") from None


def _from_disk(path: str, key: str, split: str, streaming: bool):
    datasets = _datasets()
    try:
        ds = datasets.load_from_disk(path)
    except Exception as e:
        raise UserError(f"{key}='{path}' is a folder but not a datasets save_to_disk folder ({_first_line(e)})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise UserError(f"{key}='{path}' has no split '{split}'; its splits are: {', '.join(ds)}")
        ds = ds[split]
    elif split != "train":  # one Dataset: taking it for any split would validate on the training data
        raise UserError(f"{key}='{path}' holds one Dataset, which has no split '{split}' (a DatasetDict folder has "
                        "splits): it is all data.split=train; held-out data: data.val_path or data.val_size")
    return ds.to_iterable_dataset() if streaming else ds


def _hub(path: str, key: str, split: str, streaming: bool):
    datasets = _datasets()
    online = _hub_reachable()
    try:
        with _offline(not online):  # unreachable: the local cache only, at once (no 25 s of retries)
            return datasets.load_dataset(path, split=split, streaming=streaming)
    except Exception as e:
        why = "the hub cannot be reached from here" if not online else _first_line(e)
        raise UserError(f"{key}='{path}' is not a local file or folder, and loading it as a Hugging Face hub data "
                        f"set failed: {why} (offline? use a local jsonl/json/parquet/csv/txt file or a "
                        f"save_to_disk folder)") from None


def _hub_reachable() -> bool:
    """False when offline mode is set or the hub's host does not resolve (a quick check, no request)."""
    import socket
    import urllib.parse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    try:
        socket.getaddrinfo(urllib.parse.urlparse(constants.ENDPOINT).hostname, 443)
        return True
    except OSError:
        return False


class _offline:
    """Switch datasets and huggingface_hub to offline mode for one call (they read the flag at import)."""

    def __init__(self, on: bool):
        self.on, self.saved = on, None

    def __enter__(self):
        if self.on:
            import datasets.config
            from huggingface_hub import constants

            self.saved = (datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE)
            datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True

    def __exit__(self, *exc):
        if self.saved is not None:
            import datasets.config
            from huggingface_hub import constants

            datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = self.saved
