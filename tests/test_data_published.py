"""Data as it is published: SQuAD's official files, Alpaca and ShareGPT records, null values, files with a BOM,
and what is shown after training (held-out sample prompts that fit the model, a hint that pastes into a shell).

Most checks run the data plugins in process on tiny files; three run the CLI as a user would.
"""

import json
import logging
import re
import shlex
import subprocess

import pytest

from automodel.batch import IGNORE_INDEX
from automodel.config import RESOURCES
from automodel.data.chat import ChatConfig, ChatData
from automodel.data.instruction import InstructionConfig, InstructionData
from automodel.data.sharegpt import SharegptConfig, SharegptData
from automodel.data.squad import SquadConfig, SquadData
from automodel.data.text import TextConfig, TextData
from automodel.errors import UserError

BOM = "\ufeff"


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(RESOURCES / "tiny_tasks" / "tokenizer"))


@pytest.fixture
def logged():
    """The messages logged under `automodel` (whatever handlers an earlier in-process run left on it)."""
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    logger, handler = logging.getLogger("automodel"), Keep(logging.INFO)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield lines
    logger.removeHandler(handler)
    logger.setLevel(level)


def _option(*overrides):
    """The data plugin a command line's overrides give (the option's YAML, validated as a run does)."""
    from automodel.config import validate
    from helpers import compose

    return validate(compose(*overrides)).plugins["data"]


def _targets(tok, labels) -> str:
    return tok.decode([t for t in labels if t != IGNORE_INDEX])


# ------------------------------------------------------------------ SQuAD
def _qa(i, answer, impossible=None):
    qa = {"question": f"What colour is box {i}?", "id": f"q{i}",
          "answers": [{"text": answer, "answer_start": 9}] if answer else []}
    if impossible is not None:
        qa["is_impossible"] = impossible
        if impossible:
            qa["plausible_answers"] = [{"text": "blue", "answer_start": 9}]
    return qa


def squad_file(version: str, impossible: int = 0) -> dict:
    """A SQuAD file in the official layout: 2 articles, 5 answerable questions (+ `impossible` unanswerable)."""
    v2 = version == "v2.0"
    qas = [_qa(i, "red", False if v2 else None) for i in range(5)] + [_qa(10 + i, None, True) for i in range(impossible)]
    return {"version": version, "data": [
        {"title": "Boxes", "paragraphs": [{"context": "Box 0 is red. Box 1 is red.", "qas": qas[:2]},
                                          {"context": "Box 2 is red.", "qas": qas[2:3]}]},
        {"title": "More boxes", "paragraphs": [{"context": "Boxes 3, 4 are red.", "qas": qas[3:]}]},
    ]}


def test_squad_official_files_v1_1_and_v2_0_are_read_as_published(tmp_path, tok, logged):
    v1 = tmp_path / "train-v1.1.json"
    v1.write_text(json.dumps(squad_file("v1.1"), indent=2))  # pretty-printed, as published
    data = SquadData(SquadConfig(path=str(v1), val_split=None))
    records = data.records()
    assert len(records) == 5 and records.rows[3]["title"] == "More boxes"
    prompts, answers, skipped = data.pairs(records)
    assert prompts[0] == "Box 0 is red. Box 1 is red. What colour is box 0? " and answers == ["red"] * 5 and skipped == 0
    # the same questions in the hub's flat layout give the same examples
    flat = tmp_path / "flat.jsonl"
    flat.write_text("".join(json.dumps({"context": r["context"], "question": r["question"],
                                        "answers": {"text": ["red"], "answer_start": [9]}}) + "\n" for r in records.rows))
    flat_data = SquadData(SquadConfig(path=str(flat), val_split=None))
    assert data.encode(tok, records, 64)[0] == flat_data.encode(tok, flat_data.records(), 64)[0]

    v2 = tmp_path / "train-v2.0.jsonl"  # the official document on one line of a .jsonl works too
    v2.write_text(json.dumps(squad_file("v2.0", impossible=3)) + "\n")
    data = SquadData(SquadConfig(path=str(v2), val_split=None))
    examples = data._checked(tok, data.records(), 64, "data.path")
    assert len(examples) == 5
    assert _targets(tok, examples[0][1]) == "red" + tok.eos_token
    assert f"{v2}: skipped 3 unanswerable questions (SQuAD v2.0)" in logged
    assert not any("no target token left" in m for m in logged), logged
    # nothing but unanswerable questions: one line with the count
    only = tmp_path / "only.json"
    doc = squad_file("v2.0", impossible=2)
    doc["data"] = doc["data"][:1]
    doc["data"][0]["paragraphs"] = [{"context": "Box 9.", "qas": [_qa(10, None, True), _qa(11, None, True)]}]
    only.write_text(json.dumps(doc, indent=1))
    data = SquadData(SquadConfig(path=str(only), val_split=None))
    with pytest.raises(UserError) as e:
        data._checked(tok, data.records(), 64, "data.path")
    assert str(e.value).endswith("0 dropped (no target token left); skipped 2 unanswerable questions (SQuAD v2.0); "
                                 "raise train.seq_len or check the data")


def test_squad_answers_as_a_list_of_objects_and_bad_shapes(tmp_path, tok):
    def write(answers_of):
        p = tmp_path / "naive.jsonl"
        p.write_text("".join(json.dumps({"context": f"Box {i} is red.", "question": "Colour?", "answers": answers_of(i)})
                             + "\n" for i in range(3)))
        return SquadData(SquadConfig(path=str(p), val_split=None))

    as_dict = write(lambda i: {"text": ["red"], "answer_start": [9]})
    as_list = write(lambda i: [{"text": "red", "answer_start": 9}, {"text": "red.", "answer_start": 9}])
    assert as_list.pairs(as_list.records()) == as_dict.pairs(as_dict.records())
    assert as_list.pairs(as_list.records())[1] == ["red"] * 3
    unanswerable = write(lambda i: [] if i else [{"text": "red", "answer_start": 9}])
    assert unanswerable.pairs(unanswerable.records())[2] == 2
    bad = write(lambda i: 5 if i == 2 else [])
    with pytest.raises(UserError) as e:
        bad.pairs(bad.records())
    assert str(e.value) == (f"{tmp_path / 'naive.jsonl'}:3: 'answers' is a int; expected "
                            '{"text": [...], "answer_start": [...]} or a list of {"text": ..., "answer_start": ...}')
    bad = write(lambda i: [{"answer": "red"}])
    with pytest.raises(UserError, match=r"naive.jsonl:1: 'answers' is a list of dict; expected \{\"text\""):
        bad.pairs(bad.records())
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"version": "v1.1", "data": [{"title": "t", "paragraphs": "none"}]}, indent=1))
    with pytest.raises(UserError, match=r"broken.json: data\[0\] has no list of objects 'paragraphs', so it is not "
                                        r"the SQuAD layout"):
        SquadData(SquadConfig(path=str(broken), val_split=None)).records()


def _follow(message: str, **values) -> list[list[str]]:
    """The overrides each piece of advice in an error line names (`..., or ...`), placeholders filled in."""
    advice = message.split("; ", 1)[1]
    out = []
    for alternative in advice.split(", or "):
        found = re.findall(r"data\.\w+=[^\s,;)]+", alternative)
        out.append([f"{a.split('=')[0]}={values.get(a.split('=')[1], a.split('=')[1])}" for a in found])
    return [o for o in out if o]


def test_one_local_squad_file_trains_with_a_part_held_out_and_every_advice_works(tmp_path, tok):
    import datasets

    dev = tmp_path / "dev-v1.1.json"
    dev.write_text(json.dumps(squad_file("v1.1"), indent=1))  # 5 questions
    kw = dict(seq_len=64, dp_rank=0, dp_size=1, micro_batch_size=2)

    def held_out(data) -> int | None:
        next(data.build(tok, seed=1, global_batch_size=2, **kw))
        val = data.val_batches(tok, **kw)
        return None if val is None else sum(int((b.micro_batches[0]["labels"] != IGNORE_INDEX).any(-1).sum())
                                            for b in val)

    # the preset's split is the hub's: one local file trains without it, or with a part held out by size
    assert held_out(_option("data=squad", f"data.path={dev}")) is None
    assert _option("data=hellaswag", f"data.path={dev}").cfg.val_split is None  # the same preset default
    assert held_out(_option("data=squad", f"data.path={dev}", "data.val_size=2")) == 2
    # a split asked of one file by hand is refused, and each piece of advice works when followed
    with pytest.raises(UserError) as e:
        _option("data=squad", f"data.path={dev}", "data.val_split=validation")
    followed = _follow(str(e.value), N="2", FILE=str(dev))
    assert len(followed) == 2, str(e.value)
    for advice in followed:
        assert held_out(_option("data=squad", f"data.path={dev}", "data.val_split=validation", *advice)) in (2, 5)
    # a folder with splits keeps the preset's split, unless val_size or val_path chooses the held-out data
    rows = [{"context": f"Box {i} is red.", "question": "Colour?", "answers": {"text": ["red"], "answer_start": [7]}}
            for i in range(6)]
    folder = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                          "validation": datasets.Dataset.from_list(rows[:3])}).save_to_disk(str(folder))
    assert held_out(_option("data=squad", f"data.path={folder}")) == 3
    assert held_out(_option("data=squad", f"data.path={folder}", "data.val_size=2")) == 2
    assert held_out(_option("data=squad", f"data.path={folder}", f"data.val_path={dev}")) == 5
    with pytest.raises(UserError) as e:  # two choices by hand: one would be silently unused
        _option("data=squad", f"data.path={folder}", "data.val_split=validation", "data.val_size=2")
    assert str(e.value) == ("data.val_split='validation' and data.val_size=2 both choose the held-out data; keep "
                            "one, e.g. data.val_split=null data.val_size=2")
    [advice] = _follow(str(e.value))
    assert held_out(_option("data=squad", f"data.path={folder}", "data.val_split=validation", "data.val_size=2",
                            *advice)) == 2
    # a folder of one Dataset has no splits either: its rows are not served as the validation split
    one = tmp_path / "one"
    datasets.Dataset.from_list(rows).save_to_disk(str(one))
    assert held_out(_option("data=squad", f"data.path={one}")) is None
    data = _option("data=squad", f"data.path={one}", "data.val_split=validation")
    with pytest.raises(UserError, match=r"holds one Dataset, which has no split 'validation'"):
        data.records("val")


# ------------------------------------------------------------------ Alpaca and prompt templates
def test_alpaca_option_drops_the_sections_of_empty_columns(tmp_path, tok):
    rows = [{"instruction": "Sort: c a b", "input": "", "output": "a b c"},
            {"instruction": "Add", "input": "2 + 3", "output": "5"},
            {"instruction": "Say hi", "output": "hi"},  # no input key at all in this record
            {"instruction": "Count", "input": None, "output": "1 2 3"}]
    p = tmp_path / "alpaca_data.json"
    p.write_text(json.dumps(rows, indent=1))
    data = _option("data=alpaca", f"data.path={p}")
    assert isinstance(data, InstructionData)
    prompts, answers, skipped = data.pairs(data.records())
    assert prompts == ["### Instruction:\nSort: c a b\n\n### Response:\n",
                       "### Instruction:\nAdd\n\n### Input:\n2 + 3\n\n### Response:\n",
                       "### Instruction:\nSay hi\n\n### Response:\n",
                       "### Instruction:\nCount\n\n### Response:\n"]
    assert answers == ["a b c", "5", "hi", "1 2 3"] and skipped == 0
    examples, _ = data.encode(tok, data.records(), 128)
    ids, labels = examples[1]
    assert tok.decode(ids[1:]).startswith(prompts[1]) and _targets(tok, labels) == "5" + tok.eos_token
    # a template typed on a command line: `\n` is a newline, {{ }} are braces, a section may hold two columns
    data = _option("data=instruction", f"data.path={p}", "data.completion_column=output",
                   r"data.prompt_template='{{task}} {instruction}\n\n[{input}|{instruction}]\n\nanswer:'")
    assert data.pairs(data.records())[0][:2] == ["{task} Sort: c a b\n\nanswer:",
                                                 "{task} Add\n\n[2 + 3|Add]\n\nanswer:"]


def test_a_template_column_that_no_record_has_is_one_line(tmp_path):
    p = tmp_path / "pairs.jsonl"
    p.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n" + json.dumps({"instruction": "c", "output": "d",
                                                                                       "context": "e"}) + "\n")
    data = InstructionData(InstructionConfig(path=str(p), completion_column="output",
                                             prompt_template="{instruction}\n\n{input}"))
    with pytest.raises(UserError) as e:
        data.pairs(data.records())
    assert str(e.value) == (f"{p}: data.prompt_template names column 'input', which no record has; the columns are: "
                            "instruction, output, context")
    for bad, why in [("{0} and {}", "is not a column name"), ("{instruction", "write a literal brace as"),
                     ("no columns", "names no column")]:
        with pytest.raises(UserError, match=why):
            InstructionData(InstructionConfig(path=str(p), prompt_template=bad))


# ------------------------------------------------------------------ ShareGPT
def test_sharegpt_trains_assistant_turns_like_chat(tmp_path, tok):
    turns = [("system", "be brief"), ("human", "hi"), ("gpt", "hello"), ("human", "more"), ("gpt", "done")]
    p = tmp_path / "sharegpt.json"
    p.write_text(json.dumps([{"id": str(i), "conversations": [{"from": f, "value": f"{v} {i}"} for f, v in turns]}
                             for i in range(4)], indent=1))
    data = _option("data=sharegpt", f"data.path={p}", "data.chat_template=chatml")
    assert isinstance(data, SharegptData)
    examples, stats = data.encode(tok, data.records(), 256)
    assert len(examples) == 4 and stats.dropped == 0
    ids, labels = examples[0]
    assert tok.decode(ids).startswith("<|im_start|>system\nbe brief 0<|im_end|>\n<|im_start|>user\nhi 0<|im_end|>")
    assert _targets(tok, labels) == "hello 0<|im_end|>\ndone 0<|im_end|>\n"  # the assistant turns' tokens only
    roles = {"system": "system", "human": "user", "gpt": "assistant"}
    chats = tmp_path / "chat.jsonl"
    chats.write_text("".join(json.dumps({"messages": [{"role": roles[f], "content": f"{v} {i}"} for f, v in turns]})
                             + "\n" for i in range(4)))
    chat = ChatData(ChatConfig(path=str(chats), chat_template="chatml"))
    assert chat.encode(tok, chat.records(), 256)[0] == examples  # exactly what the same messages give
    p.write_text(json.dumps({"conversations": [{"from": "tool", "value": "{}"}]}) + "\n")
    with pytest.raises(UserError, match=r"record 1: a turn is from 'tool'; the speakers understood are: system, human"):
        data.encode(tok, data.records(), 256)
    p.write_text(json.dumps({"conversations": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(UserError, match=r"record 1: 'conversations' must be a list of \{\"from\": \"human\""):
        data.encode(tok, data.records(), 256)


# ------------------------------------------------------------------ null values
def test_null_completions_and_prompts_are_dropped_with_counts(tmp_path, tok, logged):
    p = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"q{i}", "completion": None if i % 3 == 0 else f"a{i}"} for i in range(9)]
    rows += [{"prompt": None, "completion": "orphan"}]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = InstructionData(InstructionConfig(path=str(p)))
    prompts, answers, skipped = data.pairs(data.records())
    assert "None" not in prompts + answers and len(prompts) == 6 and skipped == 4
    assert len(data._checked(tok, data.records(), 64, "data.path")) == 6
    assert f"{p}: skipped 3 records with a null completion" in logged
    assert f"{p}: skipped 1 records with a null prompt" in logged
    p.write_text("".join(json.dumps({"prompt": "q", "completion": None}) + "\n" for _ in range(3)))
    with pytest.raises(UserError) as e:
        next(data.build(tok, seq_len=64, seed=1, dp_rank=0, dp_size=1, global_batch_size=2, micro_batch_size=2))
    assert str(e.value) == (f"data.path='{p}' has no usable example: of 3 examples: 0 longer than train.seq_len=64 "
                            "were truncated, 0 dropped (no target token left); skipped 3 records with a null "
                            "completion; raise train.seq_len or check the data")


# ------------------------------------------------------------------ byte-order marks
def test_files_that_start_with_a_utf8_bom_are_read(tmp_path, tok):
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(3)]
    variants = {"d.jsonl": "".join(json.dumps(r) + "\n" for r in rows), "d.json": json.dumps(rows, indent=1)}
    for name, text in variants.items():
        plain, bommed = tmp_path / f"plain_{name}", tmp_path / f"bom_{name}"
        plain.write_text(text, encoding="utf-8")
        bommed.write_bytes(b"\xef\xbb\xbf" + text.encode())
        got = InstructionData(InstructionConfig(path=str(bommed))).records()
        assert got.rows == InstructionData(InstructionConfig(path=str(plain))).records().rows == rows
    squad = tmp_path / "dev-v2.0.json"  # Windows editors save the official file with one too
    squad.write_text(BOM + json.dumps(squad_file("v2.0", impossible=1), indent=2), encoding="utf-8")
    assert len(SquadData(SquadConfig(path=str(squad), val_split=None)).records()) == 6
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(BOM + "first document\nsecond document\n", encoding="utf-8")
    assert TextData(TextConfig(path=str(corpus))).records().column("text") == ["first document", "second document"]


# ------------------------------------------------------------------ what is shown after training
def test_sample_prompts_come_from_held_out_records_and_fit_the_model(tmp_path, tok):
    p = tmp_path / "pairs.jsonl"
    p.write_text("".join(json.dumps({"prompt": f"item {i} is", "completion": f" {i}"}) + "\n" for i in range(24)))
    data = InstructionData(InstructionConfig(path=str(p), val_size=6))
    kw = dict(seed=1, dp_rank=0, dp_size=1, global_batch_size=4, micro_batch_size=4)
    next(data.build(tok, seq_len=32, **kw))
    _, held = data._held_out(tok, 32)
    held_answers = sorted(_targets(tok, labels).replace(tok.eos_token, "") for _, labels in held)
    samples = data.sample_prompts(10)
    assert sorted(answer for _, answer in samples) == held_answers  # all 6 held out, none trained on
    assert all(prompt == f"item {answer.strip()} is" for prompt, answer in samples)
    # held-out prompts longer than the model was trained on are cut to their ending that fits, bos included
    long = tmp_path / "long.jsonl"
    long.write_text("".join(json.dumps({"prompt": f"{i} " + "words " * 40 + "the end?", "completion": " yes"}) + "\n"
                            for i in range(8)))
    data = InstructionData(InstructionConfig(path=str(p), val_path=str(long)))
    seq_len = 48
    next(data.build(tok, seq_len=seq_len, **kw))
    samples = data.sample_prompts(2)
    assert len(samples) == 2
    for prompt, answer in samples:
        n = 1 + len(tok(prompt, add_special_tokens=False)["input_ids"])
        assert seq_len - 3 <= n <= seq_len and prompt.endswith("words the end?") and answer == " yes", (n, prompt)
    # a long chat loses whole turns from its start first
    convs = [[{"role": "user", "content": "x" * 40}, {"role": "assistant", "content": "ok"},
              {"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": f"yo {i}"}] for i in range(4)]
    c = tmp_path / "chat.jsonl"
    c.write_text("".join(json.dumps({"messages": m}) + "\n" for m in convs))
    chat = ChatData(ChatConfig(path=str(c), chat_template="chatml", val_size=1, max_dropped_fraction=1.0))  # all cut
    next(chat.build(tok, seq_len=96, seed=1, dp_rank=0, dp_size=1, global_batch_size=2, micro_batch_size=2))
    [(prompt, answer)] = chat.sample_prompts(1)
    assert prompt == f"<|im_start|>user\nhi {answer[3:]}<|im_end|>\n<|im_start|>assistant\n"


def test_held_out_data_that_training_would_refuse_never_fails_the_run_after_training(tmp_path, tok):
    """With train.val_every=0 the held-out file is first read for the sample prompts, after training: a value
    that is not text there gives the training data's prompts, not a failure at the very end."""
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    good.write_text("".join(json.dumps({"prompt": f"item {i} is", "completion": f" {i}"}) + "\n" for i in range(8)))
    bad.write_text(json.dumps({"prompt": "x", "completion": [" 1"]}) + "\n")
    data = InstructionData(InstructionConfig(path=str(good), val_path=str(bad)))
    next(data.build(tok, seq_len=32, seed=1, dp_rank=0, dp_size=1, global_batch_size=4, micro_batch_size=4))
    with pytest.raises(UserError, match=r"bad.jsonl:1: 'completion' is a list"):
        data.val_batches(tok, seq_len=32, dp_rank=0, dp_size=1, micro_batch_size=4)
    assert data.sample_prompts(2) == [("item 0 is", " 0"), ("item 1 is", " 1")]


def test_try_your_own_hint_is_a_command_a_shell_runs(tmp_path, monkeypatch, logged):
    import automodel.generate
    from automodel.engine import export

    final = tmp_path / "my run" / "final"
    final.mkdir(parents=True)
    (final / "config.json").write_text("{}")
    monkeypatch.setattr(automodel.generate, "load", lambda d: (None, None))
    monkeypatch.setattr(automodel.generate, "greedy", lambda model, tok, prompt: "fine")
    monkeypatch.setattr(export, "automodel_command", lambda: "automodel")  # how it is found: tests/test_cli.py
    prompt = "<|im_start|>user\nsay \"hi\", it's $HOME `now`\\n<|im_end|>\n<|im_start|>assistant\n"
    export.show_samples(str(final), [(prompt, "fine")])
    hint = next(m for m in logged if "Try your own:" in m)
    assert hint.startswith("1/1 sample prompts answered exactly.")
    command = hint.split("Try your own:  ", 1)[1]
    assert shlex.split(command) == ["automodel", "generate", str(final), prompt]
    shell = subprocess.run(["sh", "-c", 'automodel() { printf "%s\\0" "$@"; }\n' + command], capture_output=True,
                           text=True, check=True)
    assert shell.stdout.split("\0")[:-1] == ["generate", str(final), prompt]


# ------------------------------------------------------------------ the CLI, as a user runs it
def _output_after(text: str, marker: str) -> list[str]:
    """The printed command from `generate` on (the program before it is the running automodel, as found)."""
    words = shlex.split(text.split(marker, 1)[1], posix=True)
    return words[words.index("generate"):][:3]


def test_cli_sharegpt_and_official_squad_train_and_alpaca_names_a_missing_column(tmp_path):
    from helpers import MICRO, cli

    run = ["train.max_steps=2", "train.global_batch_size=4", "train.log_every=1"]
    sg = tmp_path / "sharegpt.jsonl"
    sg.write_text("".join(json.dumps({"conversations": [{"from": "human", "value": f"it's {i}"},
                                                        {"from": "gpt", "value": f"yo {i}"}]}) + "\n" for i in range(8)))
    proc = cli(*MICRO, *run, "train.seq_len=96", "data=sharegpt", f"data.path={sg}", "data.chat_template=chatml",
               "data.val_size=2", "train.sample_prompts=1", f"hydra.run.dir={tmp_path / 'sg'}", cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    words = _output_after(out, "Try your own:  ")
    assert words[:2] == ["generate", str(tmp_path / "sg" / "final")]
    assert words[2].startswith("<|im_start|>user\nit's ") and words[2].endswith("<|im_end|>\n<|im_start|>assistant\n")

    squad = tmp_path / "train-v2.0.json"
    squad.write_text(BOM + json.dumps(squad_file("v2.0", impossible=2), indent=2), encoding="utf-8")
    # one local file with a part held out by size, as a user types it (the preset's hub split is not asked for)
    proc = cli(*MICRO, *run, "data=squad", f"data.path={squad}", "data.val_size=1", "train.val_every=2",
               "checkpoint.export_final=false", f"hydra.run.dir={tmp_path / 'sq'}", cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert f"{squad}: skipped 2 unanswerable questions (SQuAD v2.0)" in out and "no target token left" not in out
    metrics = [json.loads(line) for line in (tmp_path / "sq" / "metrics.jsonl").read_text().splitlines()]
    assert any("val_loss" in m for m in metrics), metrics

    alpaca = tmp_path / "alpaca.jsonl"
    alpaca.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n")
    proc = cli("data=alpaca", f"data.path={alpaca}", cwd=str(tmp_path / "sq"))  # exists: no run dir to clean up
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "warn" not in ln.lower()]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    assert lines[0] == (f"automodel: error: {alpaca}: data.prompt_template names column 'input', which no record has; "
                        "the columns are: instruction, output")
