"""Data plugins on local files of every format, hub ids offline, and the messages bad data gets."""

import json

import pytest

from automodel.batch import IGNORE_INDEX
from automodel.config import RESOURCES
from automodel.data.chat import ChatConfig, ChatData
from automodel.data.instruction import (HellaSwagConfig, HellaSwagData, InstructionConfig, InstructionData,
                                        SquadConfig, SquadData)
from automodel.data.text import TextConfig, TextData
from automodel.errors import UserError

ROWS = [{"question": f"add: {i} + {i % 7} =>", "answer": f" = {i + i % 7}"} for i in range(40)]
COLS = dict(prompt_column="question", completion_column="answer")


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(RESOURCES / "tiny_tasks" / "tokenizer"))


def _write(tmp_path, fmt):
    """The same 40 rows in each format the loaders read."""
    import datasets

    table = datasets.Dataset.from_list(ROWS)
    if fmt == "jsonl":
        p = tmp_path / "d.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    elif fmt == "json":
        p = tmp_path / "d.json"
        p.write_text(json.dumps(ROWS, indent=1))
    elif fmt == "parquet":
        p = tmp_path / "d.parquet"
        table.to_parquet(str(p))
    elif fmt == "csv":
        p = tmp_path / "d.csv"
        table.to_csv(str(p), index=False)
    elif fmt == "save_to_disk":
        p = tmp_path / "saved"
        datasets.DatasetDict({"train": table, "validation": table.select(range(8))}).save_to_disk(str(p))
    return str(p)


def _first_batch(plugin, tok, **kw):
    args = dict(seq_len=32, seed=3, dp_rank=0, dp_size=1, global_batch_size=8, micro_batch_size=4) | kw
    return next(plugin.build(tok, **args))


@pytest.mark.parametrize("fmt", ["json", "parquet", "csv", "save_to_disk"])
def test_every_format_gives_the_same_batches_as_jsonl(tmp_path, tok, fmt):
    ref = _first_batch(InstructionData(InstructionConfig(path=_write(tmp_path, "jsonl"), **COLS)), tok)
    got = _first_batch(InstructionData(InstructionConfig(path=_write(tmp_path, fmt), **COLS)), tok)
    assert (got.num_tokens, got.num_target_tokens) == (ref.num_tokens, ref.num_target_tokens)
    for a, b in zip(ref.micro_batches, got.micro_batches):
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    # loss only on the completion: the targets decode to answers
    lab = got.micro_batches[0]["labels"][0]
    assert tok.decode(lab[lab != IGNORE_INDEX], skip_special_tokens=True).strip() in {r["answer"].strip() for r in ROWS}


def test_save_to_disk_split_and_val_split(tmp_path, tok):
    path = _write(tmp_path, "save_to_disk")
    data = InstructionData(InstructionConfig(path=path, val_split="validation", **COLS))
    val = data.val_batches(tok, seq_len=32, dp_rank=0, dp_size=1, micro_batch_size=4)
    assert sum(len(sb.micro_batches[0]["input_ids"]) for sb in val) == 8
    with pytest.raises(UserError, match=r"has no split 'test'; its splits are: train, validation"):
        InstructionData(InstructionConfig(path=path, split="test", **COLS)).records()


def test_hub_id_offline_is_one_clear_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError) as e:
        InstructionData(InstructionConfig(path="nobody/no-such-set")).records()
    msg = str(e.value)
    assert msg.startswith("data.path='nobody/no-such-set' is not a local file or folder, and loading it as a "
                          "Hugging Face hub data set failed:") and "\n" not in msg
    assert "offline?" in msg


@pytest.mark.parametrize("content,expected", [
    ('{"prompt": "a", "completion": "b"}\n{"prompt": "a", oops}\n', ":2: not valid JSON"),
    ('{"prompt": "a", "completion": "b"}\n\n[1, 2]\n', ":3: expected a JSON object, got list"),
    ('{"question": "a", "answer": "b"}\n', ":1: no column 'prompt'; the columns are: question, answer "
                                          "(map yours with data.prompt_column / data.completion_column)"),
    ("\n\n", "holds no examples"),
])
def test_bad_jsonl_names_file_and_line(tmp_path, content, expected):
    p = tmp_path / "bad.jsonl"
    p.write_text(content)
    with pytest.raises(UserError) as e:
        InstructionData(InstructionConfig(path=str(p))).records()
    assert expected in str(e.value) and str(p) in str(e.value), str(e.value)


def test_bad_csv_and_parquet_columns(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text("prompt,completion\na,b\nc,d,e,f\n")
    with pytest.raises(UserError, match=r"bad.csv: could not be read as csv \(.*line 3"):
        InstructionData(InstructionConfig(path=str(p))).records()
    q = _write(tmp_path, "parquet")
    with pytest.raises(UserError) as e:
        InstructionData(InstructionConfig(path=q)).records()
    assert str(e.value) == (f"{q}: no column 'prompt'; the columns are: question, answer "
                            "(map yours with data.prompt_column / data.completion_column)")
    with pytest.raises(UserError, match="does not exist"):
        InstructionData(InstructionConfig(path=str(tmp_path / "missing.parquet"))).records()


def test_every_example_too_long_says_so_with_counts(tmp_path, tok):
    p = tmp_path / "long.jsonl"
    p.write_text("".join(json.dumps({"prompt": "word " * 60, "completion": " yes"}) + "\n" for _ in range(5)))
    n = len(tok("word " * 60 + " yes")["input_ids"]) + 1  # + bos + eos - the shift
    with pytest.raises(UserError) as e:  # all of them too long: stopped by data.max_dropped_fraction first
        _first_batch(InstructionData(InstructionConfig(path=str(p))), tok)
    assert str(e.value).startswith(f"data.path='{p}': 5 of 5 examples (100%) are longer than train.seq_len=32 "
                                   f"tokens") and f"max {n}; train.seq_len={n} keeps 95%" in str(e.value)
    with pytest.raises(UserError) as e:  # every one allowed to drop: still not a set to train on
        _first_batch(InstructionData(InstructionConfig(path=str(p), max_dropped_fraction=1.0)), tok)
    assert str(e.value) == (f"data.path='{p}' has no usable example: of 5 examples: 5 longer than train.seq_len=32 "
                            f"were truncated, 5 dropped (no target token left); raise train.seq_len or check the data")


def test_chat_loss_on_assistant_turns_only(tmp_path, tok):
    convs = [[{"role": "system", "content": "be brief"}, {"role": "user", "content": f"hi {i}"},
              {"role": "assistant", "content": f"hello {i}"}, {"role": "user", "content": "more"},
              {"role": "assistant", "content": "done"}] for i in range(8)]
    p = tmp_path / "chat.jsonl"
    p.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    data = ChatData(ChatConfig(path=str(p), chat_template="chatml"))
    examples, stats = data.encode(tok, data.records(), 256)
    assert len(examples) == 8 and stats.truncated == stats.dropped == 0
    ids, labels = examples[0]
    assert tok.decode(ids).startswith("<|im_start|>system\nbe brief<|im_end|>")
    targets = tok.decode([t for t in labels if t != IGNORE_INDEX])
    assert targets == "hello 0<|im_end|>\ndone<|im_end|>\n"
    assert tok.chat_template  # the template is kept on the tokenizer, so the export carries it
    prompt, answer = data.prompts(data.records(), 1)[0]
    assert prompt.endswith("<|im_start|>user\nmore<|im_end|>\n<|im_start|>assistant\n") and answer == "done"
    # no template anywhere: one line saying what to set
    from transformers import AutoTokenizer

    bare = AutoTokenizer.from_pretrained(str(RESOURCES / "tiny_tasks" / "tokenizer"))
    with pytest.raises(UserError, match="the tokenizer has no chat template; set data.chat_template=chatml"):
        ChatData(ChatConfig(path=str(p))).encode(bare, data.records(), 128)
    p.write_text(json.dumps({"messages": "hello"}) + "\n")
    bad = ChatData(ChatConfig(path=str(p), chat_template="chatml"))
    with pytest.raises(UserError, match="record 1: 'messages' must be a list of"):
        bad.encode(tok, bad.records(), 128)


def test_text_blocks_cover_the_token_stream(tmp_path, tok):
    p = tmp_path / "corpus.txt"
    docs = [f"document {i} says {'la ' * (i % 9)}" for i in range(60)]
    p.write_text("\n".join(docs) + "\n\n")
    data = TextData(TextConfig(path=str(p)))
    examples, _ = data.encode(tok, data.records(), 16)
    stream = [t for d in docs for t in [tok.bos_token_id, *tok(d, add_special_tokens=False)["input_ids"], tok.eos_token_id]]
    assert all(len(ids) == 16 and ids[1:] == lab[:-1] for ids, lab in examples)
    assert [t for ids, _ in examples for t in ids] == stream[: 16 * len(examples)]
    assert len(examples) == (len(stream) - 1) // 16
    short = tmp_path / "short.txt"
    short.write_text("tiny\n")
    with pytest.raises(UserError, match=r"1 non-empty documents of 1 records hold 5 tokens, fewer than one block of "
                                        r"train.seq_len\+1=17"):
        TextData(TextConfig(path=str(short))).encode(tok, TextData(TextConfig(path=str(short))).records(), 16)


def test_text_streaming_is_deterministic_resumable_and_sharded(tmp_path, tok):
    p = tmp_path / "corpus.jsonl"
    p.write_text("".join(json.dumps({"body": f"doc {i} " + "w " * (i % 11)}) + "\n" for i in range(80)))
    data = TextData(TextConfig(path=str(p), text_column="body", streaming=True, shuffle_buffer=16))
    kw = dict(seq_len=16, seed=5, global_batch_size=4, micro_batch_size=2)
    full = data.build(tok, dp_rank=0, dp_size=1, **kw)
    steps = [next(full) for _ in range(12)]  # runs past one epoch (about 60 blocks / 4 per step)
    resumed = data.build(tok, dp_rank=0, dp_size=1, start_step=9, **kw)
    for want in steps[9:]:
        got = next(resumed)
        assert all((a["input_ids"] == b["input_ids"]).all() for a, b in zip(want.micro_batches, got.micro_batches))
    r0 = next(data.build(tok, dp_rank=0, dp_size=2, start_step=2, **kw))
    r1 = next(data.build(tok, dp_rank=1, dp_size=2, start_step=2, **kw))
    import torch

    whole = torch.cat([m["input_ids"] for m in steps[2].micro_batches])
    assert (torch.cat([r0.micro_batches[0]["input_ids"], r1.micro_batches[0]["input_ids"]]) == whole).all()
    with pytest.raises(UserError, match="no column 'text'; the columns are: body"):
        next(TextData(TextConfig(path=str(p), streaming=True)).build(tok, dp_rank=0, dp_size=1, **kw))


def test_squad_and_hellaswag_record_formats(tmp_path, tok):
    squad = tmp_path / "squad.jsonl"
    squad.write_text("".join(json.dumps({
        "id": str(i), "title": "t", "context": f"Paris is in France {i}.", "question": "Where is Paris?",
        "answers": {"text": [" France "] if i else [], "answer_start": [12] if i else []}}) + "\n" for i in range(6)))
    data = SquadData(SquadConfig(path=str(squad), val_split=None))
    prompts, answers, skipped = data.pairs(data.records())
    assert prompts[0] == "Paris is in France 1. Where is Paris? " and answers[0] == "France" and skipped == 1
    ex, stats = data.encode(tok, data.records(), 64)
    assert len(ex) == 5 and stats.dropped == 1
    assert tok.decode([t for t in ex[0][1] if t != IGNORE_INDEX]) == "France" + tok.eos_token
    hs = tmp_path / "hellaswag.jsonl"
    hs.write_text("".join(json.dumps({"ctx": "He picks up the ball and", "endings": ["sings", "throws it", "x", "y"],
                                      "label": lab}) + "\n" for lab in ["1", 1, ""]))
    data = HellaSwagData(HellaSwagConfig(path=str(hs), val_split=None))
    prompts, answers, skipped = data.pairs(data.records())
    assert prompts == ["He picks up the ball and"] * 2 and answers == [" throws it"] * 2 and skipped == 1
    with pytest.raises(UserError, match="no column 'ctx'"):
        HellaSwagData(HellaSwagConfig(path=str(squad), val_split=None)).records()


def test_cli_offline_hub_id_and_unusable_data_stop_with_one_line(tmp_path):
    from helpers import cli

    def one_line(proc):
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "warn" not in ln.lower()]
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("automodel: error: "), proc.stderr
        return lines[0][len("automodel: error: "):]

    msg = one_line(cli("data=squad", cwd=str(tmp_path), env={"HF_HUB_OFFLINE": "1"}))
    assert msg.startswith("data.path='rajpurkar/squad' is not a local file or folder, and loading it as a Hugging "
                          "Face hub data set failed")
    empty = tmp_path / "empty.parquet"
    import datasets

    datasets.Dataset.from_list([{"text": "x"}]).select([]).to_parquet(str(empty))
    assert one_line(cli("data=text", f"data.path={empty}", cwd=str(tmp_path))) == f"data.path='{empty}' holds no examples"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.parquet"]  # no run directory left behind


@pytest.mark.parametrize("plugin", ["text", "chat", "squad", "hellaswag", "alpaca", "sharegpt"])
def test_every_plugin_trains_through_the_engine(tmp_path, plugin):
    from automodel.config import validate
    from helpers import MICRO, compose, train

    p = tmp_path / "d.jsonl"
    rows = {
        "text": lambda i: {"text": f"story {i}: " + "the cat sat " * (i % 5)},
        "chat": lambda i: {"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": f"yo {i}"}]},
        "squad": lambda i: {"context": f"Box {i} is red.", "question": f"What colour is box {i}?",
                            "answers": {"text": ["red"], "answer_start": [9]}},
        "hellaswag": lambda i: {"ctx": f"Step {i}: he opens", "endings": ["the door", "a", "b", "c"], "label": "0"},
        "alpaca": lambda i: {"instruction": f"Repeat {i}", "input": "" if i % 2 else "twice", "output": f"{i} {i}"},
        "sharegpt": lambda i: {"conversations": [{"from": "human", "value": f"hi {i}"}, {"from": "gpt", "value": f"yo {i}"}]},
    }[plugin]
    p.write_text("".join(json.dumps(rows(i)) + "\n" for i in range(64)))
    # chat, sharegpt and alpaca examples are up to 61 tokens: a seq_len that holds them (MICRO's 48 would cut
    # most of them, which data.max_dropped_fraction refuses)
    extra = {"chat": ["data.chat_template=chatml", "train.seq_len=64"], "squad": ["data.val_size=8"],
             "hellaswag": ["data.val_size=8"], "text": ["data.val_size=4"],
             "alpaca": ["data.val_size=8", "train.seq_len=64"],
             "sharegpt": ["data.chat_template=chatml", "train.seq_len=64"]}[plugin]
    overrides = [f"data={plugin}", f"data.path={p}", *extra, "train.max_steps=6", "train.log_every=1",
                 "train.val_every=6" if "chat" not in plugin and plugin != "sharegpt" else "train.val_every=0",
                 "train.global_batch_size=4", "train.micro_batch_size=4", "optim.warmup_steps=0",
                 "checkpoint.export_final=false"]
    result = train(str(tmp_path), *overrides)
    assert [r["step"] for r in result.records] == [1, 2, 3, 4, 5, 6]
    # the engine trained on exactly the batches the plugin builds (tokens per step, padding excluded) ...
    cfg = compose(*MICRO, *overrides)
    data, t = validate(cfg).plugins["data"], cfg.train
    built = data.build(result.tokenizer, seq_len=t.seq_len, seed=t.seed, dp_rank=0, dp_size=1, global_batch_size=4,
                       micro_batch_size=4)
    want = [next(built) for _ in range(6)]
    assert [r["tokens"] for r in result.records] == [b.num_tokens for b in want]
    assert all(b.num_target_tokens > 0 for b in want)
    # ... and learned from them: six steps on these repetitive sets take the loss down by 0.75 to 1.5 nats
    losses = [r["loss"] for r in result.records]
    assert all(loss > 0 for loss in losses) and losses[-1] < losses[0] - 0.4, losses
    assert "val_loss" not in result.records[-1] or result.records[-1]["val_loss"] < losses[0] - 0.4


@pytest.mark.parametrize("fmt", ["txt", "parquet", "save_to_disk"])
def test_text_streams_the_same_blocks_from_every_source(tmp_path, tok, fmt):
    import datasets

    docs = [f"line {i} " + "ab " * (i % 6) for i in range(50)]
    ref = tmp_path / "ref.jsonl"
    ref.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    if fmt == "txt":
        path = tmp_path / "c.txt"
        path.write_text("\n".join(docs) + "\n")
    elif fmt == "parquet":
        path = tmp_path / "c.parquet"
        datasets.Dataset.from_list([{"text": d} for d in docs]).to_parquet(str(path))
    else:
        path = tmp_path / "saved"
        datasets.Dataset.from_list([{"text": d} for d in docs]).save_to_disk(str(path))
    kw = dict(seq_len=16, seed=1, dp_rank=0, dp_size=1, global_batch_size=4, micro_batch_size=4)
    want = next(TextData(TextConfig(path=str(ref), streaming=True, shuffle_buffer=8)).build(tok, **kw))
    got = next(TextData(TextConfig(path=str(path), streaming=True, shuffle_buffer=8)).build(tok, **kw))
    assert (want.micro_batches[0]["input_ids"] == got.micro_batches[0]["input_ids"]).all()


def test_hub_id_without_network_fails_at_once_without_offline_flag(monkeypatch):
    import socket
    import time

    def no_dns(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    t0 = time.perf_counter()
    with pytest.raises(UserError, match=r"failed: the hub cannot be reached from here \(offline\? use a local"):
        InstructionData(InstructionConfig(path="nobody/no-such-set")).records()
    assert time.perf_counter() - t0 < 5  # huggingface_hub's own retries would take about 25 s


# ------------------------------------------------------------------ data wrong in shape (issue 25)
def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _chat(content):
    return {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": content}]}


NOT_TEXT = [  # (plugin, config keys, the bad record, where the message points, the type found)
    ("instruction", {}, {"prompt": "add 1 =>", "completion": [" 12"]}, "completion", "a list ([\" 12\"])"),
    ("instruction", {}, {"prompt": {"text": "add 1 =>"}, "completion": " 12"}, "prompt", "an object"),
    ("instruction", {}, {"prompt": "add 1 =>", "completion": True}, "completion", "a boolean"),
    ("alpaca", {"completion_column": "output", "prompt_template": "{instruction}\n\n{input}"},
     {"instruction": "add", "input": ["1", "2"], "output": "3"}, "input", "a list"),
    ("squad", {}, {"context": ["Box 1 is red."], "question": "Colour?", "answers": {"text": ["red"]}}, "context",
     "a list"),
    ("squad", {}, {"context": "Box 1 is red.", "question": "Colour?", "answers": {"text": [["red"]]}},
     "answers.text", "a list"),
    ("hellaswag", {}, {"ctx": {"a": 1}, "endings": ["x", "y"], "label": "0"}, "ctx", "an object"),
    ("hellaswag", {}, {"ctx": "He", "endings": [["x"], "y"], "label": "0"}, "endings", "a list"),
    ("chat", {"chat_template": "chatml"}, _chat({"text": "yo"}), "content", "an object"),
    ("sharegpt", {"chat_template": "chatml"}, {"conversations": [{"from": "human", "value": "hi"},
                                                                 {"from": "gpt", "value": ["yo"]}]}, "value", "a list"),
    ("text", {}, {"text": ["a", "b"]}, "text", "a list"),
]


def _plugin(name, path, **kw):
    from automodel.data.sharegpt import SharegptConfig, SharegptData

    cls, cfg = {"instruction": (InstructionData, InstructionConfig), "alpaca": (InstructionData, InstructionConfig),
                "squad": (SquadData, SquadConfig), "hellaswag": (HellaSwagData, HellaSwagConfig),
                "chat": (ChatData, ChatConfig), "sharegpt": (SharegptData, SharegptConfig),
                "text": (TextData, TextConfig)}[name]
    return cls(cfg(path=path, **kw))


@pytest.mark.parametrize("plugin,keys,bad,column,kind", NOT_TEXT, ids=[f"{c[0]}-{c[3]}-{c[4].split()[1]}"
                                                                        for c in NOT_TEXT])
def test_a_value_that_is_not_text_is_refused_by_file_and_line(tmp_path, tok, plugin, keys, bad, column, kind):
    good = {"instruction": {"prompt": "add 1 =>", "completion": " 2"},
            "alpaca": {"instruction": "add", "input": "1 1", "output": "2"},
            "squad": {"context": "Box 1 is red.", "question": "Colour?", "answers": {"text": ["red"]}},
            "hellaswag": {"ctx": "He", "endings": ["x", "y"], "label": "0"}, "chat": _chat("yo"),
            "sharegpt": {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
            "text": {"text": "a b c d e f g h i j k l m n o p q r s t u v"}}[plugin]
    path = _jsonl(tmp_path / "d.jsonl", [good, good, bad, good])
    data = _plugin(plugin, path, **keys)
    with pytest.raises(UserError) as e:
        data.encode(tok, data.records(), 64)
    msg = str(e.value)
    assert msg.startswith(f"{path}:3: ") and f"'{column}' is {kind}" in msg and "\n" not in msg, msg
    # a parquet file of such records (a column holds one type): named by record number, parquet has no lines
    if plugin in ("instruction", "text"):
        import datasets

        pq = str(tmp_path / "d.parquet")
        datasets.Dataset.from_list([bad, bad]).to_parquet(pq)
        data = _plugin(plugin, pq, **keys)
        with pytest.raises(UserError, match=rf"d.parquet: record 1: '{column}' is {kind.split(' (')[0]} "):
            data.encode(tok, data.records(), 64)


def test_numbers_become_text_and_content_parts_are_joined(tmp_path, tok):
    data = _plugin("instruction", _jsonl(tmp_path / "n.jsonl", [{"prompt": 7, "completion": 12},
                                                                 {"prompt": "x", "completion": 0.5}]))
    assert data.pairs(data.records())[:2] == (["7", "x"], ["12", "0.5"])
    parts = [{"type": "text", "text": "yo"}, {"type": "text", "text": " there"}]
    joined = _plugin("chat", _jsonl(tmp_path / "p.jsonl", [_chat(parts)]), chat_template="chatml")
    plain = _plugin("chat", _jsonl(tmp_path / "s.jsonl", [_chat("yo there")]), chat_template="chatml")
    assert joined.encode(tok, joined.records(), 64)[0] == plain.encode(tok, plain.records(), 64)[0]
    image = _plugin("chat", _jsonl(tmp_path / "i.jsonl", [_chat([{"type": "image"}])]), chat_template="chatml")
    with pytest.raises(UserError, match=r"i.jsonl:1: message 2: a content part of type 'image'; .*data=vlm"):
        image.encode(tok, image.records(), 64)


def test_empty_completions_are_counted_and_a_set_of_only_those_is_refused(tmp_path, tok, caplog):
    rows = [{"prompt": f"q{i} =>", "completion": "" if i % 4 == 0 else f" a{i}"} for i in range(12)]
    data = _plugin("instruction", _jsonl(tmp_path / "some.jsonl", rows))
    with caplog.at_level("WARNING", logger="automodel"):
        examples = data._checked(tok, data.records(), 32, "data.path")
    assert len(examples) == 12
    assert any("12 examples: 0 longer than train.seq_len=32 were truncated, 0 dropped (no target token left), 3 "
               "with an empty completion (only the end-of-sequence token to learn)" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]
    path = _jsonl(tmp_path / "none.jsonl", [{"prompt": f"q{i} =>", "completion": ""} for i in range(5)])
    with pytest.raises(UserError) as e:
        _first_batch(_plugin("instruction", path), tok)
    assert str(e.value) == (f"data.path='{path}': all 5 usable examples have nothing in their completion, so there "
                            "is nothing to learn but the end-of-sequence token; check the data (map yours with "
                            "data.prompt_column / data.completion_column)")
    chats = _plugin("chat", _jsonl(tmp_path / "c.jsonl", [_chat("")] * 3), chat_template="chatml")
    with pytest.raises(UserError, match="all 3 usable examples have nothing in their assistant turns"):
        chats._checked(tok, chats.records(), 64, "data.path")


def test_the_same_column_as_prompt_and_completion_is_refused(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", ROWS)
    with pytest.raises(UserError) as e:
        InstructionData(InstructionConfig(path=path, prompt_column="answer", completion_column="answer"))
    assert str(e.value) == ("data.prompt_column and data.completion_column are both 'answer': the model would learn "
                            "to repeat its prompt; name the prompt's column and the answer's column")
    with pytest.raises(UserError, match="data.prompt_template names 'answer', which is data.completion_column"):
        InstructionData(InstructionConfig(path=path, completion_column="answer", prompt_template="{question} {answer}"))


def _lengths(tok, rows):
    return sorted(len(tok(r["prompt"] + r["completion"], add_special_tokens=False)["input_ids"]) + 1 for r in rows)


def test_a_set_mostly_longer_than_seq_len_stops_with_percentiles_and_the_advice_works(tmp_path, tok):
    rows = [{"prompt": "word " * (2 + i), "completion": " yes"} for i in range(40)]  # 1 + 2..41 words + yes + eos
    path = _jsonl(tmp_path / "long.jsonl", rows)
    lengths = _lengths(tok, rows)
    seq_len = lengths[len(lengths) // 2]  # about half of them longer
    longer = sum(n > seq_len for n in lengths)
    with pytest.raises(UserError) as e:
        _first_batch(_plugin("instruction", path), tok, seq_len=seq_len)
    p = {q: lengths[-(-q * 40 // 100) - 1] for q in (50, 90, 95)}
    assert str(e.value) == (
        f"data.path='{path}': {longer} of 40 examples ({100 * longer / 40:.0f}%) are longer than "
        f"train.seq_len={seq_len} tokens and would be cut or left out, more than data.max_dropped_fraction=0.2; their "
        f"lengths in tokens: p50 {p[50]}, p90 {p[90]}, p95 {p[95]}, max {lengths[-1]}; train.seq_len={p[95]} keeps "
        "95% of them (or raise data.max_dropped_fraction to train on what fits)")
    # both pieces of advice work when followed (an example cut before its completion has no target left)
    def no_target(n):
        return sum(1 + len(tok(r["prompt"], add_special_tokens=False)["input_ids"]) > n for r in rows)

    data = _plugin("instruction", path)
    assert len(data._checked(tok, data.records(), p[95], "data.path")) == 40 - no_target(p[95])
    assert sum(n > p[95] for n in lengths) == 2  # 95% of 40 fit whole
    data = _plugin("instruction", path, max_dropped_fraction=longer / 40)
    assert len(data._checked(tok, data.records(), seq_len, "data.path")) == 40 - no_target(seq_len)
    # at the limit it trains, with the warning it always had
    few = _plugin("instruction", path, max_dropped_fraction=0.2)
    at = lengths[31]  # 8 of 40 longer: exactly 0.2
    assert sum(n > at for n in lengths) == 8
    assert len(few._checked(tok, few.records(), at, "data.path")) == 40 - no_target(at)
    with pytest.raises(UserError, match=r"data.max_dropped_fraction=1.5 must be in \[0, 1\]"):
        _plugin("instruction", path, max_dropped_fraction=1.5)


def test_long_chats_count_as_long_examples(tmp_path, tok):
    rows = [_chat("yo " * (3 * i)) for i in range(10)]
    data = _plugin("chat", _jsonl(tmp_path / "c.jsonl", rows), chat_template="chatml")
    lengths = sorted(data.encode(tok, data.records(), 4096)[1].lengths)
    assert len(set(lengths)) == 10
    with pytest.raises(UserError, match=rf"c.jsonl': 5 of 10 examples \(50%\) are longer than "
                                        rf"train.seq_len={lengths[4]} .* p95 {lengths[9]}, max {lengths[9]}"):
        data._checked(tok, data.records(), lengths[4], "data.path")
    assert len(data._checked(tok, data.records(), lengths[9], "data.path")) == 10


def test_the_default_data_keeps_every_example_at_the_default_seq_len():
    """data=tiny_tasks (the no-argument run) at its train.seq_len: nothing is cut, so nothing can be refused."""
    from helpers import compose

    from automodel.config import validate

    cfg = compose()
    data, seq_len = validate(cfg).plugins["data"], cfg.train.seq_len
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(RESOURCES / "tiny_tasks" / "tokenizer"))
    for which in ("train", "val"):
        _, stats = data.encode(tok, data.records(which), seq_len)
        assert stats.lengths and max(stats.lengths) <= seq_len and stats.truncated == stats.dropped == 0


def test_a_line_over_max_record_bytes_is_refused_before_it_is_read_whole(tmp_path, tok):
    import tracemalloc

    limit, big = 1000, 8 << 20  # an 8 MiB line against a 1000-byte limit
    for name, head, line in [("d.jsonl", json.dumps(ROWS[0]) + "\n", json.dumps({"question": "x" * big,
                                                                                 "answer": "y"})),
                             ("c.txt", "a short line\n", "z" * big)]:
        path = tmp_path / name
        path.write_text(head * 2 + line + "\n" + head)
        plugin = _plugin("text", str(path), max_record_bytes=limit) if name.endswith(".txt") else \
            _plugin("instruction", str(path), max_record_bytes=limit, **COLS)
        tracemalloc.start()
        try:
            with pytest.raises(UserError) as e:
                plugin.records()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert str(e.value) == (f"{path}:3: this line is longer than data.max_record_bytes=1000 (1000 bytes); split "
                                "it into smaller records or remove it, or raise data.max_record_bytes")
        assert peak < big // 2, peak  # read in bounded pieces, never the whole line
    # a line exactly at the limit is read
    at = tmp_path / "at.jsonl"
    row = {"question": "", "answer": "a"}
    row["question"] = "q" * (limit - len(json.dumps(row)))
    at.write_text(json.dumps(row) + "\n")
    assert len(json.dumps(row).encode()) == limit
    assert len(_plugin("instruction", str(at), max_record_bytes=limit, **COLS).records()) == 1


def test_a_record_over_max_record_bytes_never_reaches_the_tokenizer(tmp_path, tok):
    """Formats without lines (parquet here), and streams: measured before tokenizing, named by record."""
    import datasets

    class Guard:  # the tokenizer, refusing to see a text that long
        def __getattr__(self, name):
            return getattr(tok, name)

        def __call__(self, texts, **kw):
            assert all(len(t) < 3000 for t in ([texts] if isinstance(texts, str) else texts))
            return tok(texts, **kw)

    rows = [dict(r) for r in ROWS[:4]]
    rows[2]["answer"] = " " + "é" * 2000  # 4001 bytes in UTF-8, 2001 characters
    pq = str(tmp_path / "d.parquet")
    datasets.Dataset.from_list(rows).to_parquet(pq)
    data = _plugin("instruction", pq, max_record_bytes=4000, **COLS)
    with pytest.raises(UserError) as e:
        data.encode(Guard(), data.records(), 64)
    size = len((rows[2]["question"] + rows[2]["answer"]).encode())
    assert str(e.value) == (f"{pq}: record 3: this record's text is {size} bytes, more than data.max_record_bytes=4000 "
                            "(3.9 KiB); split it into smaller records or remove it, or raise data.max_record_bytes")
    default = _plugin("instruction", pq, **COLS)  # 64 MiB
    assert len(default.encode(Guard(), default.records(), 4096)[0]) == 4
    stream = _jsonl(tmp_path / "s.jsonl", [{"text": "ok " * 10}] * 5 + [{"text": "w" * 5000}] + [{"text": "ok"}] * 5)
    text = TextData(TextConfig(path=stream, streaming=True, shuffle_buffer=4, max_record_bytes=4000))
    with pytest.raises(UserError, match=r"s.jsonl: record 6: this record's text is 5000 bytes, more than"):
        next(text.build(Guard(), seq_len=16, seed=1, dp_rank=0, dp_size=1, global_batch_size=2, micro_batch_size=2))
    with pytest.raises(UserError, match=r"data.max_record_bytes=0 must be at least 1"):
        _plugin("text", stream, max_record_bytes=0)
