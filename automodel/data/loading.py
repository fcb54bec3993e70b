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
"""

from __future__ import annotations

import json
import os
from typing import Any

from automodel.errors import UserError

BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".tsv": "csv", ".txt": "text",
            ".text": "text"}


class Records:
    """An in-memory table: rows as dicts, with the source named for messages."""

    def __init__(self, rows: list[dict], source: str, columns: list[str]):
        self.rows, self.source, self.columns = rows, source, columns

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
         required: tuple[str, ...] = (), hint: str = "") -> Any:
    """The records at `path` (a Records table, or an IterableDataset when streaming); never empty."""
    if os.path.isdir(path):
        data = _from_disk(path, key, split, streaming)
    elif os.path.isfile(path):
        if split != "train":
            raise UserError(f"{key}='{path}' is one file, which has no split '{split}' (hub ids and save_to_disk "
                            f"folders have splits); use data.val_path or data.val_size for held-out data")
        ext = os.path.splitext(path)[1].lower()
        if ext not in BUILDERS:
            raise UserError(f"{key}='{path}': unknown file type '{ext or '(none)'}'; use one of: "
                            f"{', '.join(sorted(BUILDERS))}, or a save_to_disk folder")
        if BUILDERS[ext] == "json" and not streaming:
            data = _read_json(path, required, hint)
        else:
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
    return Records(data.to_list(), path, names)


def _read_json(path: str, required: tuple[str, ...], hint: str) -> Records:
    try:
        with open(path, encoding="utf-8-sig") as f:  # -sig: a leading byte-order mark is dropped, not refused
            text = f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start} is 0x{e.object[e.start]:02x}); JSON lines must be "
                        "UTF-8 text, one JSON object per line") from None
    whole = _one_object(text)
    if whole is not None:  # one JSON object over many lines (a published file: {"version", "data": [...]})
        return Records([whole], path, list(whole))
    if text.lstrip().startswith("["):  # one JSON array of objects
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                raise UserError(f"{path}: item {i} of the array is a {type(row).__name__}, expected a JSON object")
        return Records(rows, path, list(rows[0]) if rows else [])
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise UserError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        missing = [c for c in required if c not in row]
        if missing:
            raise UserError(f"{path}:{lineno}: no column '{missing[0]}'; the columns are: {', '.join(row)}"
                            + (f" ({hint})" if hint else ""))
        rows.append(row)
    return Records(rows, path, list(rows[0]) if rows else [])


def _one_object(text: str) -> dict | None:
    """The object, when the whole text is one JSON object spread over several lines; else None.

    A JSON-lines file fails this at once (json stops at the end of the first object: "Extra data"), and
    a one-line object is left to the line reader, which gives the same single record."""
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
