"""Checkpoints across ranks (gloo): bitwise resume under 2-rank FSDP2 (and under TP with dropout), and resharding
2 ranks -> 1 and 4.

One 2-rank spawn runs the uninterrupted reference, a crash after step 4 and its resume; a 4-rank spawn
resumes the reference's step-4 checkpoint; one process resumes it too.
"""

import json
import os

import pytest
import torch
import torch.multiprocessing as mp
from helpers import DROPOUT, losses, save_micro_hf_model, train
from safetensors.torch import load_file

BASE = ["train.max_steps=6", "train.log_every=1", "train.global_batch_size=8", "checkpoint.every_steps=2"]
RUN = [*BASE, "checkpoint.export_final=false"]
FSDP2 = ["parallel=fsdp2", "train.micro_batch_size=4", *RUN]
LORA = ["parallel=fsdp2", "train.micro_batch_size=4", "peft=lora", "optim.lr=1e-2", *BASE]
# dropout under tensor parallel, with an HF export (rank 0 alone) inside each save
TP_DROPOUT = ["parallel=tp", "data.packing=false", "train.micro_batch_size=8", *DROPOUT, *RUN, "checkpoint.every_steps=3",
              "checkpoint.export_every_save=true"]


def _spawn(out, world, plan):
    mp.spawn(_entry, args=(world, os.path.join(out, f"store{world}"), out, plan), nprocs=world, join=True)
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    assert "error" not in results, results.get("error")
    return results


def _entry(rank, world, store, out, plan):
    from ckpt_workers import run_plan

    run_plan(rank, world, store, out, plan)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ckpt2"))
    hf_folder = save_micro_hf_model(os.path.join(out, "pretrained"))
    plan = [
        ("ref", "ref", None, [*FSDP2, "checkpoint.keep_last=0"]),
        ("crash", "resumed", 4, FSDP2),
        ("resumed", "resumed", None, [*FSDP2, "checkpoint.resume=auto"]),
        ("hf_shards", "hf_shards", None, [*FSDP2, f"model.path={hf_folder}"]),
        ("async", "async", None, [*FSDP2, "checkpoint.async_save=true", "checkpoint.keep_last=0"]),
        ("lora_ref", "lora_ref", None, [*LORA, "checkpoint.merge_adapter=false"]),
        ("lora_crash", "lora_resumed", 2, [*LORA, "checkpoint.export_final=false"]),
        ("lora_resumed", "lora_resumed", None, [*LORA, "checkpoint.export_final=false", "checkpoint.resume=auto"]),
        ("tp_dropout_ref", "tp_dropout_ref", None, [*TP_DROPOUT, "checkpoint.keep_last=0"]),
        ("tp_dropout_crash", "tp_dropout_resumed", 3, TP_DROPOUT),
        ("tp_dropout_resumed", "tp_dropout_resumed", None, [*TP_DROPOUT, "checkpoint.resume=auto"]),
    ]
    return out, _spawn(out, 2, plan)


def _weights_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _grad_rel(got, ref):
    """Max relative difference of the steps' grad norms (losses alone miss a gradient scaled wrongly)."""
    assert len(got) == len(ref) > 0
    return max(abs(a - b) / b for a, b in zip(got, ref))


def _max_weight_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_fsdp2_resume_is_bitwise_identical_to_the_uninterrupted_run(two_ranks):
    out, r = two_ranks
    assert r["crash"] == {"crashed_at": 4}
    assert r["resumed"]["steps"] == [5, 6]
    assert r["resumed"]["losses"] == r["ref"]["losses"][4:]  # the same floats
    assert r["resumed"]["grad_norms"] == r["ref"]["grad_norms"][4:]
    assert _weights_equal(load_file(os.path.join(out, "ref.safetensors")), load_file(os.path.join(out, "resumed.safetensors")))
    ckpt = os.path.join(out, "ref", "checkpoints", "step_00000004")
    assert {"rng_rank0.safetensors", "rng_rank1.safetensors", "__0_0.distcp", "__1_0.distcp"} <= set(os.listdir(ckpt))


def test_reshard_two_ranks_to_one_process(two_ranks, tmp_path):
    out, r = two_ranks
    ckpt = os.path.join(out, "ref", "checkpoints", "step_00000004")
    one = train(str(tmp_path), "parallel=none", "train.micro_batch_size=8", *RUN, f"checkpoint.resume={ckpt}")
    diffs = [abs(a - b) for a, b in zip(losses(one), r["ref"]["losses"][4:])]
    assert [x["step"] for x in one.records] == [5, 6] and max(diffs) < 1e-5, diffs
    assert _grad_rel([x["grad_norm"] for x in one.records], r["ref"]["grad_norms"][4:]) < 1e-5
    weights = _max_weight_diff(one.model.state_dict(), load_file(os.path.join(out, "ref.safetensors")))
    assert weights < 1e-5, weights
    print(f"one process: loss diffs {diffs}, max weight diff {weights:.2e}")


@pytest.fixture(scope="module")
def four_ranks(two_ranks):
    out, _ = two_ranks
    ckpt = os.path.join(out, "ref", "checkpoints", "step_00000004")
    return _spawn(out, 4, [
        ("four", "four", None, ["parallel=fsdp2", "train.micro_batch_size=2", *RUN, f"checkpoint.resume={ckpt}"]),
        ("four_tp", "four_tp", None, ["parallel=fsdp2_tp", "train.micro_batch_size=4", *RUN, f"checkpoint.resume={ckpt}"]),
    ])


@pytest.mark.parametrize("name", ["four", "four_tp"])  # 4 x FSDP2; 2 FSDP2 x 2 TP
def test_reshard_two_ranks_to_four_ranks(two_ranks, four_ranks, name):
    out, r = two_ranks
    diffs = [abs(a - b) for a, b in zip(four_ranks[name]["losses"], r["ref"]["losses"][4:])]
    assert four_ranks[name]["steps"] == [5, 6] and max(diffs) < 1e-5, diffs
    assert _grad_rel(four_ranks[name]["grad_norms"], r["ref"]["grad_norms"][4:]) < 1e-5
    weights = _max_weight_diff(load_file(os.path.join(out, f"{name}.safetensors")), load_file(os.path.join(out, "ref.safetensors")))
    assert weights < 1e-5, weights
    print(f"{name}: loss diffs {diffs}, max weight diff {weights:.2e}")


def test_export_a_two_rank_fsdp2_checkpoint_offline_on_one_process(two_ranks, tmp_path):
    from transformers import AutoModelForCausalLM

    from automodel.cli_export import export

    out, _ = two_ranks
    hf = export(os.path.join(out, "ref", "checkpoints", "step_00000006"), str(tmp_path / "hf"))
    loaded = AutoModelForCausalLM.from_pretrained(hf).state_dict()
    trained = load_file(os.path.join(out, "ref.safetensors"))  # the gathered weights after step 6
    assert _weights_equal({k: loaded[k] for k in trained}, trained)


def test_lora_under_fsdp2_resumes_bitwise_and_exports_a_peft_adapter_that_reloads(two_ranks):
    from ckpt_workers import PROBE
    from helpers import random_init_model
    from peft import PeftModel

    out, r = two_ranks
    assert r["lora_resumed"]["steps"] == [3, 4, 5, 6]
    assert r["lora_resumed"]["losses"] == r["lora_ref"]["losses"][2:]
    assert r["lora_resumed"]["grad_norms"] == r["lora_ref"]["grad_norms"][2:]
    assert _weights_equal(load_file(os.path.join(out, "lora_ref.safetensors")),
                          load_file(os.path.join(out, "lora_resumed.safetensors")))
    final = os.path.join(out, "lora_ref", "final")
    # merge_adapter=false: the adapter in PEFT format (and the tokenizer), no merged model
    assert not os.path.exists(os.path.join(final, "model.safetensors"))
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= set(os.listdir(final + "/adapter"))
    # the random-init base is a function of the seed: rebuild it and put the adapter on it
    base = random_init_model(seed=42)
    model = PeftModel.from_pretrained(base, os.path.join(final, "adapter")).eval()
    with torch.no_grad():
        got = model(input_ids=torch.tensor(PROBE)).logits
    trained = load_file(os.path.join(out, "lora_ref.logits.safetensors"))["logits"]
    assert (got - trained).abs().max().item() < 1e-5


def test_hf_weights_load_straight_into_fsdp2_shards_each_rank_reading_its_part(two_ranks, tmp_path):
    import math

    from safetensors import safe_open

    out, r = two_ranks
    folder = os.path.join(out, "pretrained")
    with safe_open(os.path.join(folder, "model.safetensors"), framework="pt") as f:
        total = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    reads = r["hf_shards"]["hf_read_numel"]
    assert sum(reads) == total and max(reads) <= 0.55 * total, (reads, total)  # each rank its own half
    print(f"hf shards: elements read per rank {reads} of {total}")
    assert all(n == 0 for name, res in r.items() if name != "hf_shards" for n in res.get("hf_read_numel", [0]))
    # the same training as one process loading the folder with transformers' from_pretrained
    one = train(str(tmp_path), "parallel=none", "train.micro_batch_size=8", *RUN, f"model.path={folder}")
    diffs = [abs(a - b) for a, b in zip(losses(one), r["hf_shards"]["losses"])]
    assert len(diffs) == 6 and max(diffs) < 1e-5, diffs
    assert _grad_rel(r["hf_shards"]["grad_norms"], [x["grad_norm"] for x in one.records]) < 1e-5
    print(f"hf shards vs one process from_pretrained: loss diffs {diffs}")


def test_async_save_under_fsdp2_writes_the_same_checkpoints(two_ranks):
    from test_checkpoint import _load_all

    out, r = two_ranks
    assert r["async"]["losses"] == r["ref"]["losses"]
    assert r["async"]["grad_norms"] == r["ref"]["grad_norms"]
    names = sorted(os.listdir(os.path.join(out, "async", "checkpoints")))
    assert names == ["step_00000002", "step_00000004", "step_00000006"]
    for name in names:  # written in the background while training went on
        a = _load_all(os.path.join(out, "ref", "checkpoints", name))
        b = _load_all(os.path.join(out, "async", "checkpoints", name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_tp_resume_with_dropout_and_an_export_in_each_save_is_bitwise(two_ranks):
    """Every tp rank must draw the same dropout masks (on the activations they all hold), also after rank 0 alone
    built the HF copy of a save; and the resumed run draws what the uninterrupted one did."""
    out, r = two_ranks
    ref, resumed = r["tp_dropout_ref"], r["tp_dropout_resumed"]
    assert r["tp_dropout_crash"] == {"crashed_at": 3}
    assert resumed["steps"] == [4, 5, 6]
    assert resumed["losses"] == ref["losses"][3:] and resumed["grad_norms"] == ref["grad_norms"][3:]
    assert _weights_equal(load_file(os.path.join(out, "tp_dropout_ref.safetensors")),
                          load_file(os.path.join(out, "tp_dropout_resumed.safetensors")))
    assert ref["replicated_mismatch"] == resumed["replicated_mismatch"] == []  # e.g. LoRA's A beside a colwise base
