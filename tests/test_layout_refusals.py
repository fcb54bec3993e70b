"""Layouts that cannot work are refused in one line, before any process or model is built; every preset exists
and every size in it can be overridden; the sequence splits tensor and context parallel need. No processes: the
parity of every layout against one process is tests/test_parallel_layouts.py."""

import pytest
from helpers import compose

from automodel import registry
from automodel.config import validate
from automodel.distributed.parallel_dims import ParallelDims
from automodel.errors import UserError



def _plugin(*overrides):
    cfg = validate(compose(*overrides))
    return cfg.plugins["parallel"], cfg


PRESETS = ["none", "fsdp2", "hsdp", "tp", "fsdp2_tp", "cp", "fsdp2_cp", "pp", "fsdp2_pp", "fsdp2_tp_pp",
           "fsdp2_cp_tp_pp"]


def test_every_preset_exists_and_every_size_is_overridable():
    for preset in PRESETS:
        compose(f"parallel={preset}")
    plugin, _ = _plugin("parallel=fsdp2_tp", "parallel.tp=4")
    dims = plugin.dims(8)
    assert (dims.dp_shard, dims.tp) == (2, 4)
    plugin, _ = _plugin("parallel=hsdp")
    dims = plugin.dims(8)
    assert (dims.dp_replicate, dims.dp_shard, dims.dp) == (2, 4, 8)
    assert registry.load("parallel", "spmd")


@pytest.mark.parametrize("overrides,world,expected", [
    (["parallel=fsdp2_tp"], 3, "parallel: world size 3 is not divisible by tp=2"),
    (["parallel=fsdp2_tp_pp"], 6, "parallel: world size 6 is not divisible by tp=2 x pp=2"),
    (["parallel=pp", "parallel.pp_schedule=interleaved_1f1b"], 2, "parallel.pp_schedule=interleaved_1f1b needs "
                                                                  "parallel.pp_virtual_stages >= 2"),
    (["parallel=pp", "parallel.pp_virtual_stages=2"], 2, "parallel.pp_virtual_stages=2 needs "
                                                         "parallel.pp_schedule=interleaved_1f1b"),
])
def test_impossible_layouts_are_refused_in_one_line(overrides, world, expected):
    plugin, _ = _plugin(*overrides)
    with pytest.raises(UserError) as e:
        plugin.dims(world)
    assert str(e.value).startswith(expected) and "\n" not in str(e.value)


def test_an_unknown_pipeline_schedule_is_refused_as_the_config_is_read():
    with pytest.raises(UserError) as e:
        _plugin("parallel=pp", "parallel.pp_schedule=zb")
    assert str(e.value) == "parallel.pp_schedule='zb': choose one of gpipe, 1f1b, interleaved_1f1b"


def test_pipeline_refuses_tied_embeddings_too_few_micro_batches_and_packing(tmp_path):
    from automodel.engine.run import _hints

    plugin, cfg = _plugin("parallel=pp", "model.config.tie_word_embeddings=true")
    with pytest.raises(UserError) as e:
        plugin.check_model(plugin.dims(2), cfg.plugins["model"].hf_config())
    assert str(e.value).startswith("parallel.pp>1: the model ties its input embedding to its output head")
    plugin, _ = _plugin("parallel=pp")
    with pytest.raises(UserError) as e:
        _hints(plugin, plugin.dims(4), None, 48, accum=2)
    assert str(e.value) == ("parallel.pp_schedule=1f1b with pp=4 needs at least 4 micro-batches per step, but "
                            "train.global_batch_size / (train.micro_batch_size x 1 data-parallel rank(s)) = 2; lower "
                            "train.micro_batch_size or raise train.global_batch_size")
    assert _hints(plugin, plugin.dims(4), None, 48, accum=4).pipeline
    plugin, _ = _plugin("parallel=pp", "parallel.pp_schedule=gpipe")
    assert _hints(plugin, plugin.dims(4), None, 48, accum=1).min_microbatches == 1
    assert _hints(plugin, plugin.dims(4), None, 48).packing_refused_by == "parallel.pp>1"


@pytest.mark.parametrize("override,tp,pp,expected", [
    ("model.config.num_attention_heads=6", 4, 1, "parallel.tp=4 does not divide the model's num_attention_heads=6"),
    ("model.config.num_key_value_heads=2", 4, 1, "parallel.tp=4 does not divide the model's num_key_value_heads=2"),
    ("model.config.num_hidden_layers=2", 1, 4, "parallel.pp=4 x pp_virtual_stages=1 = 4 stages need at least 4 "
                                               "layers; the model has 2"),
])
def test_model_layout_mismatches_are_refused_before_any_model_is_built(override, tp, pp, expected):
    plugin, cfg = _plugin("parallel=fsdp2", "model.config.hidden_size=96", override)
    dims = ParallelDims.infer(tp * pp, dp_shard=1, tp=tp, pp=pp)
    with pytest.raises(UserError) as e:
        plugin.check_model(dims, cfg.plugins["model"].hf_config())
    assert str(e.value).startswith(expected)


@pytest.mark.parametrize("lora,expected", [
    ({"target_modules": ["q_proj"], "use_dora": True},  # DoRA's magnitude vector: neither down nor up
     "parallel.tp>1: model.layers.0.self_attn.q_proj.lora_magnitude_vector.default (DoraLinearLayer in the adapter "
     "Linear) cannot be laid out to match its column-wise base layer"),
    ({"target_modules": ["embed_tokens"]},
     "parallel.tp>1: model.embed_tokens is an adapter (Embedding) around Embedding, planned 'embedding_rowwise': "
     "tensor parallel lays out adapters only around Linear layers"),
])
def test_adapters_tensor_parallel_cannot_lay_out_are_refused_in_one_line(lora, expected):
    from peft import LoraConfig, get_peft_model

    from automodel.parallel.tensor_parallel import apply_tensor_parallel

    _, cfg = _plugin("parallel=tp")
    model = get_peft_model(cfg.plugins["model"].build("meta"), LoraConfig(r=8, **lora))
    with pytest.raises(UserError) as e:  # refused while planning, before any mesh is used
        apply_tensor_parallel(model, None, sequence_parallel=True, loss_parallel=False)
    assert str(e.value).startswith(expected) and "\n" not in str(e.value)


def test_sequence_length_must_split_across_tp_with_sequence_parallel():
    from automodel.engine.run import _hints

    plugin, _ = _plugin("parallel=tp")
    dims = plugin.dims(4)
    with pytest.raises(UserError) as e:
        _hints(plugin, dims, None, 50)
    assert str(e.value) == "train.seq_len=50 is not divisible by tp=4 (sequence parallel) = 4; pick a multiple of 4"
    assert _hints(plugin, dims, None, 48).seq_multiple == 4
    plugin, _ = _plugin("parallel=tp", "parallel.sequence_parallel=false")
    assert _hints(plugin, plugin.dims(4), None, 50).seq_multiple == 1
    plugin, _ = _plugin("parallel=fsdp2_tp", "parallel.cp=2")
    with pytest.raises(UserError) as e:
        _hints(plugin, plugin.dims(8), None, 36)
    assert str(e.value) == ("train.seq_len=36 is not divisible by 2 x cp=2 (causal load balancing) x tp=2 (sequence "
                            "parallel) = 8; pick a multiple of 8")


def test_context_parallel_splits_the_sequence_with_causal_load_balancing():
    from automodel.parallel.context_parallel import ContextParallel

    cp = ContextParallel.__new__(ContextParallel)
    cp.size = 2
    assert cp.indices(8, 0).tolist() == [0, 1, 6, 7] and cp.indices(8, 1).tolist() == [2, 3, 4, 5]
    # equal causal work: the number of (query, key) pairs each rank attends to
    work = [sum(i + 1 for i in cp.indices(64, r).tolist()) for r in range(2)]
    assert work[0] == work[1]


def test_unknown_activation_checkpointing_mode_is_refused():
    with pytest.raises(UserError) as e:
        _plugin("parallel=fsdp2", "parallel.activation_checkpointing=some")
    assert str(e.value).startswith("parallel.activation_checkpointing='some': choose one of none, full, selective")
