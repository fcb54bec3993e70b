"""Model FLOPs per token (MFU's numerator), counted on the model, against the published formulas and model
cards; the peak table; and what every logged step carries (throughput per device, MFU, peak memory)."""

import pytest
import torch
from helpers import compose, train

from automodel.config import validate
from automodel.flops import attention_flops_per_token, flops_per_token, peak_of, peak_tflops
from automodel.modules import count_params


def _skeleton(*overrides):
    plugins = validate(compose(*overrides)).plugins
    return plugins["peft"].apply(plugins["model"].build("meta")), plugins["model"].hf_config()


def test_a_dense_model_is_6n_plus_the_attention_square():
    """Llama 3.2 1B (tied head): 6 x its 1.236B parameters (the tied head's matmul counts what the embedding
    lookup does not) + 12 x layers x hidden x seq: 8.2 GFLOP at 2048 tokens, as the README's MFU used."""
    model, config = _skeleton("model=llama3_2_1b")
    total, _ = count_params(model)
    norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    want = 6 * (total - norms) + 12 * 16 * 2048 * 2048
    got = flops_per_token(model, config, 2048)
    assert abs(got - want) / want < 1e-9, (got, want)
    assert 8.1e9 < got < 8.3e9


def test_a_mixture_of_experts_counts_its_active_parameters_and_lora_its_frozen_base_at_4():
    model, config = _skeleton("model=qwen3_30b_a3b")
    active = (flops_per_token(model, config, 1) - attention_flops_per_token(config, 1)) / 6
    embedding = config.vocab_size * config.hidden_size
    print(f"qwen3-30b-a3b: {active / 1e9:.3f}B active matmul parameters (+{embedding / 1e9:.3f}B embedding)")
    assert abs(active + embedding - 3.3e9) / 3.3e9 < 0.03  # the model card: 3.3B activated of 30.5B
    full, config = _skeleton("model=llama3_2_1b")
    lora, _ = _skeleton("model=llama3_2_1b", "peft=lora")
    adapters = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    base = flops_per_token(full, config, 0)
    assert flops_per_token(lora, config, 0) == pytest.approx(base * 4 / 6 + 6 * adapters, rel=1e-12)


def test_peaks_come_from_the_table_or_the_override_and_a_cpu_has_none():
    assert peak_of("NVIDIA H100 80GB HBM3", "bf16") == 989.0
    assert peak_of("NVIDIA H100 PCIe", "bf16") == 756.0
    assert peak_of("NVIDIA H200", "fp8") == 2 * 989.0
    assert peak_of("NVIDIA A100-SXM4-80GB", "fp32") == 156.0
    assert peak_of("Some Future GPU", "bf16") is None
    assert peak_tflops(torch.device("cpu"), "fp32") is None
    assert peak_tflops(torch.device("cpu"), "fp32", override=2.5) == 2.5


def test_every_logged_step_carries_throughput_per_device_mfu_and_peak_memory(tmp_path):
    run = train(str(tmp_path), "train.max_steps=2", "train.log_every=1", "train.global_batch_size=8",
                "checkpoint.export_final=false", "train.peak_tflops=0.25")
    model, config = _skeleton("train.seq_len=48", "model.config.hidden_size=64", "model.config.intermediate_size=128",
                              "model.config.num_attention_heads=4", "model.config.num_key_value_heads=2")
    per_token = flops_per_token(model, config, 48)
    for r in run.records:
        assert r["tokens_per_s_per_device"] == r["tokens_per_s"]  # one device
        assert r["tflops_per_device"] == pytest.approx(r["tokens_per_s"] * per_token / 1e12, rel=1e-9)
        assert r["mfu"] == pytest.approx(100 * r["tflops_per_device"] / 0.25, rel=1e-9)
        assert 0.2 < r["mem_host_gib"] < 8 and "mem_device_gib" not in r
    (tmp_path / "cpu").mkdir()
    plain = train(str(tmp_path / "cpu"), "train.max_steps=1", "checkpoint.export_final=false")
    assert "mfu" not in plain.records[0] and "tflops_per_device" in plain.records[0]  # no peak known on a CPU
