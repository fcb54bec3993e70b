"""Data plugin `squad`: SQuAD question answering, loss on the answer only.

Two layouts are read, so the set works as it is published and as the hub serves it:

    official file (v1.1, v2.0)   {"version", "data": [{"title", "paragraphs": [{"context", "qas": [{"question",
                                 "id", "answers": [{"text", "answer_start"}], "is_impossible"?}]}]}]}
    flat (the hub's rajpurkar/squad)   one record per question: {context, question, answers: {"text": [...],
                                 "answer_start": [...]}}

The official file is flattened into the flat layout, one record per question; `answers` may also be a list
of {"text", "answer_start"} objects (what a naive flattening of the official file gives) or of strings.
Each record becomes prompt "<context> <question> " and completion its first answer (NeMo AutoModel's
`make_squad_dataset` format). SQuAD v2.0's unanswerable questions (is_impossible, or no answer) have nothing
to train on: they are skipped and counted as such in the log.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from automodel.data.checks import text_of
from automodel.data.examples import ExamplesConfig
from automodel.data.loading import Records
from automodel.data.pairs import PairData, is_null
from automodel.errors import UserError

COLUMNS = ("context", "question", "answers")
OFFICIAL = '{"data": [{"title", "paragraphs": [{"context", "qas": [{"question", "id", "answers"}]}]}]}'
ANSWERS = '{"text": [...], "answer_start": [...]} or a list of {"text": ..., "answer_start": ...}'
UNANSWERABLE = "unanswerable questions (SQuAD v2.0)"


@dataclasses.dataclass
class SquadConfig(ExamplesConfig):
    path: str = "rajpurkar/squad"
    val_split: Optional[str] = None  # the preset (conf/data) picks the hub's "validation" where data.path has splits
    add_eos: bool = True
    packing: bool = False


def _list_of(value, key: str, where: str, source: str) -> list:
    items = value.get(key) if isinstance(value, dict) else None
    if not isinstance(items, list) or not all(isinstance(x, dict) for x in items):
        raise UserError(f"{source}: {where} has no list of objects '{key}', so it is not the SQuAD layout "
                        f"{OFFICIAL} (nor one record per question with columns {', '.join(COLUMNS)})")
    return items


def flatten(records: Records) -> Records:
    """The official nested file -> one flat record per question."""
    rows = []
    for d, doc in enumerate(records.rows):
        for a, article in enumerate(_list_of(doc, "data", f"document {d + 1}", records.source)):
            for p, para in enumerate(_list_of(article, "paragraphs", f"data[{a}]", records.source)):
                where = f"data[{a}].paragraphs[{p}]"
                for qa in _list_of(para, "qas", where, records.source):
                    rows.append({"id": qa.get("id"), "title": article.get("title"), "context": para.get("context"),
                                 "question": qa.get("question"), "answers": qa.get("answers"),
                                 "is_impossible": bool(qa.get("is_impossible", False))})
    if not rows:
        raise UserError(f"{records.source}: the SQuAD file holds no question")
    return Records(rows, records.source, list(rows[0]))


def answer_texts(answers, where: str) -> list[str]:
    """The answer texts of one record (`where` names it), whichever of the published shapes `answers` has."""
    if is_null(answers):
        return []
    if isinstance(answers, dict) and "text" in answers:
        texts = answers["text"]
        texts = [texts] if isinstance(texts, str) else texts
        if isinstance(texts, list):
            return [text_of(t, where, "answers.text") for t in texts if not is_null(t)]
    elif isinstance(answers, list) and all(isinstance(x, str) or (isinstance(x, dict) and "text" in x)
                                           for x in answers):
        texts = [x["text"] if isinstance(x, dict) else x for x in answers]
        return [text_of(t, where, "answers.text") for t in texts if not is_null(t)]
    raise UserError(f"{where}: 'answers' is {_shape(answers)}; expected {ANSWERS}")


def _shape(value) -> str:
    if isinstance(value, dict):
        return "an object with keys " + (", ".join(map(str, value)) or "(none)")
    if isinstance(value, list):
        kinds = sorted({type(x).__name__ for x in value})
        return f"a list of {'/'.join(kinds)}"
    return f"a {type(value).__name__}"


class SquadData(PairData):
    Config = SquadConfig

    def columns(self):
        return COLUMNS

    def read_columns(self):
        return ()  # the official file has none of them before it is flattened

    def reshape(self, records):
        if "data" in records.columns and "context" not in records.columns:
            records = flatten(records)
        records.require(COLUMNS)
        return records

    def items(self, records, stats):
        out = []
        for i, r in enumerate(records.rows):
            where = records.where(i)
            texts = [t.strip() for t in answer_texts(r["answers"], where)]
            if r.get("is_impossible") or not any(texts):  # nothing to train on
                stats.skip(UNANSWERABLE)
                continue
            if is_null(r["context"]) or is_null(r["question"]):
                stats.skip("records with a null context or question")
                continue
            context, question = text_of(r["context"], where, "context"), text_of(r["question"], where, "question")
            out.append((i, f"{context} {question} ", next(t for t in texts if t)))
        return out
