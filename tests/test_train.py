"""Single-process training: export round trip, gradient accumulation parity, LoRA, bf16, metrics."""

import json
import os

import pytest
import torch
from helpers import losses, train


def _logits(model, input_ids):
    device = next(model.parameters()).device  # the trained model stays where it trained (a GPU, if any)
    with torch.no_grad():
        return model(input_ids=input_ids.to(device)).logits.float().cpu()


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    from dist_workers import ticking_loop_clock

    out = str(tmp_path_factory.mktemp("full"))
    with ticking_loop_clock() as clock:  # the loop's clock advances 1 s per reading: tokens/s becomes checkable
        result = train(out, "train.max_steps=6", "train.log_every=2", "train.global_batch_size=8",
                       "train.micro_batch_size=8")
    result.clock_reads = clock.reads
    return out, result


def test_metrics_jsonl_has_one_line_per_logged_step(full_run):
    out, result = full_run
    lines = [json.loads(ln) for ln in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["step"] for r in lines] == [2, 4, 6]
    for r in lines:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(r)
        assert r["tokens_per_s"] > 0 and r["grad_norm"] > 0 and r["lr"] > 0
    assert lines == result.records
    # tokens: the real tokens of the two steps since the last record (8 rows of at most seq_len=48 each);
    # tokens/s: those over the time since the last record, which the ticking clock made exactly 1 s
    assert all(0 < r["tokens"] <= 2 * 8 * 48 for r in lines), lines
    assert result.clock_reads == 1 + len(lines)
    assert [r["tokens_per_s"] for r in lines] == [float(r["tokens"]) for r in lines], lines


def test_export_loads_with_transformers_and_gives_the_trained_logits(full_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, result = full_run
    final = os.path.join(out, "final")
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= set(os.listdir(final))
    loaded = AutoModelForCausalLM.from_pretrained(final).eval()
    tok = AutoTokenizer.from_pretrained(final)
    ids = torch.tensor([tok("sort: 3 1 2 =>")["input_ids"]])
    result.model.eval()
    torch.testing.assert_close(_logits(loaded, ids), _logits(result.model, ids), rtol=0, atol=1e-5)
    # and the weights moved: the export is the trained model, not the initial one
    assert result.records[-1]["loss"] < result.records[0]["loss"]


def test_gradient_accumulation_4x1_equals_micro_batch_4(tmp_path):
    common = ["train.max_steps=5", "train.log_every=1", "train.global_batch_size=4", "checkpoint.export_final=false"]
    one_run = train(str(tmp_path), *common, "train.micro_batch_size=4")
    acc_run = train(str(tmp_path), *common, "train.micro_batch_size=1")
    one, acc = losses(one_run), losses(acc_run)
    assert len(one) == 5
    assert max(abs(a - b) for a, b in zip(one, acc)) < 1e-5, (one, acc)
    # the gradient too: accumulated micro-batches summed, not averaged or counted twice
    rel = [abs(a["grad_norm"] - b["grad_norm"]) / a["grad_norm"] for a, b in zip(one_run.records, acc_run.records)]
    assert max(rel) < 1e-5, rel
    assert one[-1] < one[0]


@pytest.mark.parametrize("peft", ["lora", "dora"])
def test_lora_trains_only_adapters_and_exports_merged_model_and_peft_adapter(tmp_path, peft):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = str(tmp_path)
    common = ["train.max_steps=4", "train.log_every=1", "optim.lr=1e-2", "train.global_batch_size=8",
              "train.micro_batch_size=8"]
    result = train(out, f"peft={peft}", *common)
    model = result.model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert any("lora_magnitude_vector" in n for n in trainable) == (peft == "dora")
    # at the start the adapted model is the base model (B = 0; DoRA's magnitudes are the base rows' norms)
    (tmp_path / "full").mkdir()
    full = train(str(tmp_path / "full"), *common, "checkpoint.export_final=false")
    assert abs(result.records[0]["loss"] - full.records[0]["loss"]) < 1e-6
    ids = torch.tensor([[1, 40, 41, 42, 43, 44]])
    model.eval()
    trained = _logits(model, ids)
    merged = AutoModelForCausalLM.from_pretrained(os.path.join(out, "final")).eval()
    torch.testing.assert_close(_logits(merged, ids), trained, rtol=0, atol=1e-4)
    # the adapter alone, applied by peft onto the same base weights, gives the same model
    base = model.get_base_model()
    adapter_dir = os.path.join(out, "final", "adapter")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(adapter_dir))
    with model.disable_adapter():
        base_logits = _logits(model, ids)
    assert (base_logits - trained).abs().max() > 1e-4  # the adapter changed the model
    fresh = AutoModelForCausalLM.from_pretrained(os.path.join(out, "final"))  # any module tree of the right shape
    fresh.load_state_dict({k.replace("base_layer.", ""): v for k, v in base.state_dict().items() if "lora_" not in k})
    reloaded = PeftModel.from_pretrained(fresh, adapter_dir).eval()
    torch.testing.assert_close(_logits(reloaded, ids), trained, rtol=0, atol=1e-4)


def test_dora_is_refused_where_whole_weight_rows_are_not_on_one_rank():
    from automodel import registry
    from automodel.distributed.parallel_dims import ParallelDims
    from automodel.errors import UserError

    dora = registry.instantiate("peft", {"plugin": "lora", "use_dora": True})
    dora.check_layout(ParallelDims.infer(4, dp_shard=4))  # FSDP2 splits rows: each rank holds whole ones
    for dims in (ParallelDims.infer(2, tp=2), ParallelDims.infer(2, pp=2)):
        with pytest.raises(UserError, match="peft.use_dora=true under .* parallelism is not supported"):
            dora.check_layout(dims)
    with pytest.raises(UserError, match="peft.init=gaussian"):
        registry.instantiate("peft", {"plugin": "lora", "use_dora": True, "init": "false"})


def test_bf16_trains_close_to_fp32(tmp_path):
    common = ["train.max_steps=5", "train.log_every=1", "checkpoint.export_final=false", "train.global_batch_size=8",
              "train.micro_batch_size=8"]
    fp32 = losses(train(str(tmp_path), *common))
    bf16 = losses(train(str(tmp_path), *common, "precision=bf16"))
    assert max(abs(a - b) for a, b in zip(fp32, bf16)) < 0.05, (fp32, bf16)
    assert fp32 != bf16  # bf16 really ran in lower precision
