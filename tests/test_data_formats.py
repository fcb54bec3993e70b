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
    with pytest.raises(UserError) as e:
        _first_batch(InstructionData(InstructionConfig(path=str(p))), tok)
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
    extra = {"chat": ["data.chat_template=chatml"], "squad": ["data.val_split=null", "data.val_size=8"],
             "hellaswag": ["data.val_split=null", "data.val_size=8"], "text": ["data.val_size=4"],
             "alpaca": ["data.val_size=8"], "sharegpt": ["data.chat_template=chatml"]}[plugin]
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


def test_a_split_of_a_single_file_is_refused(tmp_path, tok):
    path = _write(tmp_path, "jsonl")
    # val_split=validation by default: fine for the hub id, not a file; refused as the config is read
    with pytest.raises(UserError, match=r"is one file, which has no split 'validation'; use data.val_path"):
        SquadData(SquadConfig(path=path))
    SquadData(SquadConfig(path=path, val_path=path))  # a held-out file of its own: the split is not asked for


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
