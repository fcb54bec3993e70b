"""Sequence packing (loss equal to unpacked), validation every train.val_every steps, resumable sampling."""

import json
import logging
import os

import pytest
import torch
from helpers import train

from automodel.batch import IGNORE_INDEX, pack, packed_step_batch, step_batch
from automodel.config import RESOURCES
from automodel.data.instruction import InstructionConfig, InstructionData
from automodel.errors import UserError
from automodel.loss import token_sum_cross_entropy

TINY = str(RESOURCES / "tiny_tasks" / "train.jsonl")


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """The first 600 bundled pairs, so tests tokenize little."""
    p = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    with open(TINY) as f:
        p.write_text("".join(next(f) for _ in range(600)))
    return str(p)


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(RESOURCES / "tiny_tasks" / "tokenizer"))


def _micro_model(attn: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=400, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                      num_key_value_heads=2, num_hidden_layers=4, max_position_embeddings=256, use_cache=False)
    cfg._attn_implementation = attn
    return LlamaForCausalLM(cfg).eval()


def test_pack_puts_every_example_in_exactly_one_row_within_capacity():
    lengths = [int(x) for x in torch.randint(1, 60, (500,), generator=torch.Generator().manual_seed(0))]
    rows = pack(lengths, 64)
    assert sorted(i for r in rows for i in r) == list(range(500))
    assert all(sum(lengths[i] for i in r) <= 64 for r in rows)
    assert len(rows) <= -(-sum(lengths) // 64) * 1.05  # best-fit decreasing: within 5% of the bound
    assert rows == pack(lengths, 64)  # deterministic


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_equals_unpacked_loss(tok, small, attn):
    """The same 48 variable-length documents, padded one per row vs packed several per row: same token losses."""
    data = InstructionData(InstructionConfig(path=small))
    examples = data._encoded(tok, 64, "train")[:48]
    model = _micro_model(attn)

    def loss_and_count(sb):
        total = sum(token_sum_cross_entropy(model(**{k: v for k, v in m.items() if k != "labels"}).logits, m["labels"])
                    for m in sb.micro_batches)
        return total, sb.num_target_tokens

    with torch.no_grad():
        unpacked, n_u = loss_and_count(step_batch(examples, 8, tok.pad_token_id))
        rows = [[examples[i] for i in row] for row in pack([len(ids) for ids, _ in examples], 64)]
        packed_sb = packed_step_batch(rows, 8, tok.pad_token_id)
        packed, n_p = loss_and_count(packed_sb)
        # the same rows with plain positions attend across documents: the test can tell the difference
        leaky_sb = packed_step_batch(rows, 8, tok.pad_token_id)
        for m in leaky_sb.micro_batches:
            del m["position_ids"]
        leaky, _ = loss_and_count(leaky_sb)
    assert n_u == n_p and len(rows) < len(examples) / 3
    diff = abs(unpacked.item() / n_u - packed.item() / n_p)
    print(f"[{attn}] mean loss unpacked {unpacked.item() / n_u:.6f} packed {packed.item() / n_p:.6f} diff {diff:.2e}")
    assert diff < 1e-5
    assert abs(leaky.item() / n_p - unpacked.item() / n_u) > 1e-4


def test_packed_gradients_equal_unpacked(tok, small):
    data = InstructionData(InstructionConfig(path=small))
    examples = data._encoded(tok, 64, "train")[100:124]
    grads = []
    for sb in (step_batch(examples, 24, tok.pad_token_id),
               packed_step_batch([[examples[i] for i in r] for r in pack([len(e[0]) for e in examples], 64)], 24,
                                 tok.pad_token_id)):
        model = _micro_model("sdpa")
        m = sb.micro_batches[0]
        loss = token_sum_cross_entropy(model(**{k: v for k, v in m.items() if k != "labels"}).logits, m["labels"])
        (loss / sb.num_target_tokens).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert (grads[0] - grads[1]).abs().max() < 1e-5


def test_training_with_packing_and_validation(tmp_path, small, caplog):
    caplog.set_level(logging.INFO)
    out = str(tmp_path)
    result = train(out, "data=instruction", f"data.path={small}", "data.val_size=64", "data.packing=true", "train.max_steps=6", "train.log_every=3", "train.val_every=2",
                   "train.global_batch_size=8", "train.micro_batch_size=4", "checkpoint.export_final=false")
    lines = [json.loads(ln) for ln in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["step"] for r in lines] == [2, 3, 4, 6]  # logged every 3, validated every 2 (and at the end)
    assert [("val_loss" in r) for r in lines] == [True, False, True, True]
    assert lines[-1]["val_loss"] < lines[0]["val_loss"]
    assert all(r["loss"] > 0 for r in lines)
    msg = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("packing: 536 training"))
    print(msg)
    assert "% padding" in msg


def test_val_every_without_held_out_data_says_what_to_set(tmp_path, small):
    with pytest.raises(UserError, match=r"train.val_every=2 but the data has no validation set; set data.val_path"):
        train(str(tmp_path), "data=instruction", f"data.path={small}", "train.val_every=2", "train.max_steps=2")


@pytest.mark.parametrize("packing", [False, True])
def test_resumed_loader_sees_exactly_the_batches_and_ranks_split_the_global_batch(tok, tmp_path, packing):
    p = tmp_path / "d.jsonl"
    with open(TINY) as f:
        p.write_text("".join(next(f) for _ in range(400)))
    data = InstructionData(InstructionConfig(path=str(p), packing=packing, val_size=40))
    kw = dict(seq_len=64, seed=7, global_batch_size=8, micro_batch_size=2)
    straight = data.build(tok, dp_rank=0, dp_size=1, **kw)
    steps = [next(straight) for _ in range(40)]  # crosses epochs (360 examples / 8, or fewer packed rows)
    for k in (0, 13, 37):
        resumed = next(data.build(tok, dp_rank=0, dp_size=1, start_step=k, **kw))
        assert _same(resumed, steps[k])
    ranks = [next(data.build(tok, dp_rank=r, dp_size=2, start_step=21, **kw)) for r in (0, 1)]
    whole = steps[21]
    assert ranks[0].num_target_tokens + ranks[1].num_target_tokens == whole.num_target_tokens
    # micro-batch-major shares: the m-th micro-batches of rank 0 and rank 1 are, together, the next rows of the step
    interleaved = [m for pair in zip(ranks[0].micro_batches, ranks[1].micro_batches) for m in pair]
    assert len(ranks[0].micro_batches) == len(ranks[1].micro_batches) >= 2
    assert _same_rows(interleaved, whole.micro_batches)
    other_seed = next(data.build(tok, dp_rank=0, dp_size=1, **{**kw, "seed": 8}))
    assert not _same(other_seed, steps[0])
    # the held-out examples are exactly val_size of the data set, and never in the training units
    train_ex, val_ex = data._held_out(tok, 64)
    everything = data._checked(tok, data.records(), 64, "data.path")
    assert len(val_ex) == 40 and sorted(train_ex + val_ex) == sorted(everything)
    val = data.val_batches(tok, seq_len=64, dp_rank=0, dp_size=1, micro_batch_size=8)
    assert sum(sb.num_target_tokens for sb in val) == sum(sum(t != IGNORE_INDEX for t in lab) for _, lab in val_ex)


def _rows(m):
    return [m["input_ids"][i][m["labels"][i] != IGNORE_INDEX].tolist() for i in range(len(m["input_ids"]))]


def _key(row):
    return tuple(row)


def _same(a, b):
    return a.num_tokens == b.num_tokens and _same_rows(a.micro_batches, b.micro_batches)


def _same_rows(xs, ys):
    rx = [r for m in xs for r in _rows(m)]
    ry = [r for m in ys for r in _rows(m)]
    return rx == ry


@pytest.mark.parametrize("data", ["packed", "streamed"])
def test_resumed_run_trains_on_the_same_batches(tmp_path, small, data):
    """Through the engine and a real checkpoint: steps 3-4 after resuming from step 2 give the same losses."""
    if data == "packed":
        args = ["data=instruction", f"data.path={small}", "data.packing=true"]
    else:
        corpus = tmp_path / "corpus.txt"
        with open(small) as f:
            corpus.write_text("".join(json.loads(ln)["prompt"] + json.loads(ln)["completion"] + "\n" for ln in f))
        args = ["data=text", f"data.path={corpus}", "data.streaming=true", "data.shuffle_buffer=64"]
    run = [*args, "train.max_steps=4", "train.log_every=1", "train.global_batch_size=4", "train.micro_batch_size=2",
           "checkpoint.every_steps=2", "checkpoint.keep_last=0", "checkpoint.export_final=false"]
    (tmp_path / "ref").mkdir()
    (tmp_path / "resumed").mkdir()
    ref = train(str(tmp_path / "ref"), *run)
    resumed = train(str(tmp_path / "resumed"), *run,
                    f"checkpoint.resume={tmp_path / 'ref' / 'checkpoints' / 'step_00000002'}")
    assert [r["step"] for r in resumed.records] == [3, 4]
    assert [r["loss"] for r in resumed.records] == [r["loss"] for r in ref.records][2:]
    assert [r["tokens"] for r in resumed.records] == [r["tokens"] for r in ref.records][2:]
