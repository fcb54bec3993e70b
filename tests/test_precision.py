"""precision=fp16: float16 compute with dynamic loss scaling. It trains like fp32; an overflowing step is skipped,
halves the scale and is not a "bad step" (the run goes on however many there are); the scale is part of every
checkpoint, so a resumed fp16 run ends bitwise where an uninterrupted one does.

precision=fp8 (torchao): only the decoder blocks' linear layers become Float8Linear; it is refused where float8
matmuls cannot run; in torchao's emulation (any device) it trains like fp32 and exports a plain HF model."""

from __future__ import annotations

import pytest
from helpers import losses, train, with_extras

from automodel import registry
from automodel.errors import UserError

COMMON = ["train.log_every=1", "train.global_batch_size=8", "train.micro_batch_size=8", "checkpoint.export_final=false"]


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    """The reference: 5 fp32 steps, exported."""
    return train(str(tmp_path_factory.mktemp("fp32")), *COMMON[:-1], "train.max_steps=5")


def test_fp16_trains_close_to_fp32_and_logs_its_loss_scale(tmp_path, fp32):
    # (a spike window shorter than the run: fp16 reads each step's loss, the spike guard is still off)
    fp16 = train(str(tmp_path), *COMMON, "train.max_steps=5", "precision=fp16", "train.spike_window=2")
    assert max(abs(a - b) for a, b in zip(losses(fp32), losses(fp16))) < 0.05, (losses(fp32), losses(fp16))
    assert losses(fp32) != losses(fp16)  # fp16 really ran in lower precision
    assert [r["loss_scale"] for r in fp16.records] == [65536.0] * 5 and not any("skipped" in r for r in fp16.records)


def test_overflowing_steps_are_skipped_halve_the_scale_and_never_stop_the_run(tmp_path):
    """A scale of 2^40 overflows float16 (max 65504) at once: steps are skipped, each halving it, until the
    gradients fit; far more skips than train.max_bad_steps=3, and the run still finishes."""
    run = train(str(tmp_path), *COMMON, "train.max_steps=30", "precision=fp16", "precision.init_scale=1099511627776")
    skipped = [r for r in run.records if "skipped" in r]
    assert len(skipped) > 3 and all("fp16 gradient overflow" in r["skipped"] for r in skipped)
    scales = [r["loss_scale"] for r in run.records]
    for before, after, record in zip(scales, scales[1:], run.records[1:]):
        assert after == (before / 2 if "skipped" in record else before)
    first_applied = next(r for r in run.records if "skipped" not in r)
    assert first_applied["step"] == len(skipped) + 1  # the skips came first, in a row
    assert run.records[-1]["loss"] < first_applied["loss"]  # and then it trained


def test_a_resumed_fp16_run_ends_bitwise_like_an_uninterrupted_one(tmp_path):
    steps = [*COMMON, "precision=fp16", "precision.init_scale=16777216", "precision.growth_interval=2",
             "checkpoint.every_steps=4"]  # a scale that overflows first, then grows every 2 steps
    (tmp_path / "whole").mkdir()
    whole = train(str(tmp_path / "whole"), *steps, "train.max_steps=8")
    (tmp_path / "split").mkdir()
    train(str(tmp_path / "split"), *steps, "train.max_steps=4")
    resumed = train(str(tmp_path / "split"), *steps, "train.max_steps=8", "checkpoint.resume=auto")
    assert [r["loss_scale"] for r in resumed.records] == [r["loss_scale"] for r in whole.records[4:]]
    assert losses(resumed) == losses(whole)[4:]
    assert [r["grad_norm"] for r in resumed.records] == [r["grad_norm"] for r in whole.records[4:]]
    assert len({r["loss_scale"] for r in whole.records}) > 2  # the scale moved both ways across the checkpoint


@pytest.mark.parametrize("field,value,text", [("init_scale", 0.5, "precision.init_scale=0.5"),
                                              ("growth_interval", 0, "precision.growth_interval=0"),
                                              ("reduce_dtype", "float99", "precision.reduce_dtype='float99'")])
def test_bad_fp16_settings_are_refused_in_one_line(field, value, text):
    with pytest.raises(UserError, match=text.replace(".", r"\.").replace("[", r"\[")):
        registry.instantiate("precision", {"plugin": "fp16", field: value})


def test_fp8_swaps_exactly_the_decoder_blocks_linear_layers():
    with_extras()
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                             num_attention_heads=2, num_key_value_heads=1))
    names = set(dict(model.named_parameters()))
    registry.instantiate("precision", {"plugin": "fp8", "recipe": "rowwise"}).prepare(model)
    kinds = {n: type(m).__name__ for n, m in model.named_modules()}
    assert set(dict(model.named_parameters())) == names  # same parameters, same names: checkpoints and export
    for i in range(2):
        for proj in ("self_attn.q_proj", "self_attn.o_proj"):  # 32 x 32
            assert kinds[f"model.layers.{i}.{proj}"] == "Float8Linear"
        assert kinds[f"model.layers.{i}.self_attn.k_proj"] == "Float8Linear"  # 32 -> 16
        assert kinds[f"model.layers.{i}.mlp.gate_proj"] == "Linear"  # 40 is not a multiple of 16: kept
    assert kinds["lm_head"] == "Linear" and kinds["model.embed_tokens"] == "Embedding"


def test_fp8_is_refused_where_float8_matmuls_cannot_run():
    with_extras()
    from automodel.distributed.parallel_dims import ParallelDims

    fp8 = registry.instantiate("precision", {"plugin": "fp8"})
    with pytest.raises(UserError, match="needs an NVIDIA GPU .* on cpu: use precision=bf16"):
        fp8.check_device("cpu", ParallelDims.infer(1))
    with pytest.raises(UserError, match="tensor or pipeline parallelism"):
        fp8.check_device("cpu", ParallelDims.infer(2, tp=2))
    registry.instantiate("precision", {"plugin": "fp8", "emulate": True}).check_device("cpu", ParallelDims.infer(1))
    with pytest.raises(UserError, match="precision.recipe=tensorwise"):
        registry.instantiate("precision", {"plugin": "fp8", "recipe": "rowwise", "fsdp_float8_all_gather": True})


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_fp8_emulated_trains_close_to_fp32_and_exports_a_plain_hf_model(tmp_path, recipe, fp32):
    with_extras()
    import safetensors.torch
    import torch
    from transformers import AutoModelForCausalLM

    fp8 = train(str(tmp_path), *COMMON[:-1], "train.max_steps=5", "precision=fp8", "precision.emulate=true",
                f"precision.recipe={recipe}")
    assert max(abs(a - b) for a, b in zip(losses(fp32), losses(fp8))) < 0.05, (losses(fp32), losses(fp8))
    assert losses(fp32) != losses(fp8)
    exported = safetensors.torch.load_file(f"{fp8.final_dir}/model.safetensors")
    assert set(exported) == set(safetensors.torch.load_file(f"{fp32.final_dir}/model.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(fp8.final_dir)
    assert {type(m).__name__ for m in model.modules()} & {"Float8Linear"} == set()
    assert torch.isfinite(model(input_ids=torch.tensor([[1, 5, 9]])).logits).all()
