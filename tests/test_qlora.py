"""peft=qlora: a 4-bit NF4 base (bitsandbytes) under LoRA adapters, on one process.

What must hold: the base really is quantized (and only ever one layer of it is in full precision during
set-up), the adapter trained here applies to the base exactly as transformers loads it in 4 bits, the
merged export computes what the trained model computes, and a resume is bitwise.
"""

import os

import pytest
import torch
from ckpt_workers import SimulatedCrash, crash_after
from helpers import losses, save_micro_hf_model, train, with_extras

from automodel.errors import UserError

STEPS = ["train.max_steps=4", "train.log_every=1", "optim.lr=1e-2", "optim.warmup_steps=0", "train.global_batch_size=8",
         "train.micro_batch_size=8"]
IDS = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46]])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    with_extras()
    return save_micro_hf_model(str(tmp_path_factory.mktemp("base")))


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_qlora_base_is_nf4_and_its_adapter_applies_to_the_base_transformers_loads_in_4_bits(base, tmp_path):
    import bitsandbytes.functional as bnbf
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from automodel.peft.nf4 import NF4Linear

    (tmp_path / "lora").mkdir()
    lora = train(str(tmp_path / "lora"), f"model.path={base}", "peft=lora", *STEPS, "checkpoint.export_final=false")
    result = train(str(tmp_path), f"model.path={base}", "peft=qlora", *STEPS)
    model = result.model.train()  # bitsandbytes packs weights to bf16 for CPU inference in eval mode: not compared
    bases = [m for m in model.modules() if isinstance(m, NF4Linear)]
    assert len(bases) == 4 * 7 and all(m.weight.dtype == torch.uint8 for m in bases)  # every decoder linear
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, p in lora.model.named_parameters() if p.requires_grad}
    # the same base values up to 4-bit error: close to LoRA over the fp32 base, but not equal to it
    gap = abs(result.records[0]["loss"] - lora.records[0]["loss"])
    assert 0 < gap < 0.05, gap
    assert losses(result)[-1] < losses(result)[0]
    trained = _logits(model)

    # transformers' own 4-bit load of the base (NF4, double quantization) holds bitwise our NF4 values,
    # and with the adapter peft loads it computes the trained model
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    quantized = AutoModelForCausalLM.from_pretrained(base, quantization_config=config, device_map="cpu")
    theirs = {n: m for n, m in quantized.named_modules() if type(m).__name__ == "Linear4bit"}
    assert len(theirs) == len(bases)
    for name, module in theirs.items():
        ours = model.get_submodule(f"base_model.model.{name}").base_layer
        assert torch.equal(bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state),
                           ours.dequantized().weight), name
    adapted = PeftModel.from_pretrained(quantized, os.path.join(str(tmp_path), "final", "adapter")).train()
    torch.testing.assert_close(_logits(adapted), trained, rtol=0, atol=1e-5)

    # the merged export: the adapters merged into the NF4 base's values
    merged = AutoModelForCausalLM.from_pretrained(os.path.join(str(tmp_path), "final")).eval()
    torch.testing.assert_close(_logits(merged), trained, rtol=0, atol=1e-4)


def test_qlora_resume_is_bitwise_and_the_offline_export_matches(base, tmp_path):
    from transformers import AutoModelForCausalLM

    from automodel.cli_export import export as export_checkpoint

    run = [f"model.path={base}", "peft=qlora", *STEPS, "checkpoint.every_steps=2", "checkpoint.export_final=false"]
    (tmp_path / "ref").mkdir()
    ref = train(str(tmp_path / "ref"), *run)
    out = str(tmp_path / "resumed")
    os.makedirs(out)
    with crash_after(2), pytest.raises(SimulatedCrash):
        train(out, *run)
    resumed = train(out, *run, "checkpoint.resume=auto")
    assert [r["step"] for r in resumed.records] == [3, 4]
    assert losses(resumed) == losses(ref)[2:]
    a, b = ref.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.endswith("base_layer.weight_absmax") for k in a)  # the quantized state is checkpointed too

    folder = export_checkpoint(os.path.join(out, "checkpoints", "step_00000004"), str(tmp_path / "hf"))
    merged = AutoModelForCausalLM.from_pretrained(folder).eval()
    torch.testing.assert_close(_logits(merged), _logits(resumed.model.train()), rtol=0, atol=1e-4)


def test_set_up_holds_one_full_precision_base_layer_at_a_time_and_sizing_counts_4_bits():
    """materialize's finish hook quantizes each layer as soon as it is filled, and an unsharded model is
    allocated one module at a time: at no point are two base layers in fp32."""
    with_extras()
    from helpers import compose

    from automodel.config import validate
    from automodel.engine import materialize as mat
    from automodel.modules import tensor_bytes
    from automodel.peft.nf4 import NF4Linear

    plugins = validate(compose("peft=qlora", "train.sample_prompts=0")).plugins
    model = plugins["peft"].apply(plugins["model"].build("meta"))
    layers = [m for m in model.modules() if isinstance(m, NF4Linear)]
    assert layers
    seen = []

    def finish(name, module):
        seen.append(sum(1 for m in layers if not m.quantized and not m.weight.is_meta))
        plugins["peft"].finish_module(name, module)

    mat.materialize(model, mat.canonical_names(model), "cpu", seed=1, inits=[mat.hf_init(model)], finish=finish)
    assert max(seen) == 1 and all(m.quantized for m in layers)
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])

    skeleton = plugins["peft"].apply(plugins["model"].build("meta"))
    full = sum(m.weight.numel() * 4 for m in skeleton.modules() if isinstance(m, NF4Linear))
    before = tensor_bytes(skeleton)
    for name, module in skeleton.named_modules():
        plugins["peft"].finish_module(name, module)
    after = tensor_bytes(skeleton)
    assert after == tensor_bytes(model)  # the meta sizing predicts the materialized bytes exactly
    assert 0.12 < (full - (before - after)) / full < 0.14  # ~4.2 bits of 32 per base parameter


def test_qlora_refusals():
    with_extras()
    from automodel import registry
    from automodel.distributed.parallel_dims import ParallelDims

    qlora = registry.instantiate("peft", {"plugin": "lora", "quantize_base": "nf4"})
    qlora.check_layout(ParallelDims.infer(1))
    for dims in (ParallelDims.infer(2, dp_shard=2), ParallelDims.infer(2, tp=2)):
        with pytest.raises(UserError, match="peft=qlora trains on one process only"):
            qlora.check_layout(dims)
    with pytest.raises(UserError, match="peft.use_dora=true with a 4-bit base"):
        registry.instantiate("peft", {"plugin": "lora", "quantize_base": "nf4", "use_dora": True})
    with pytest.raises(UserError, match="choose nf4"):
        registry.instantiate("peft", {"plugin": "lora", "quantize_base": "int3"})
