"""Model plugin `hf`: presets match the published architectures; local folders and hub ids load."""

import math
import os

import pytest
import torch
from helpers import MICRO, cli, compose

from automodel.config import validate
from automodel.engine.run import train as run_training
from automodel.errors import UserError
from automodel.modules import count_params, decoder_layers
from automodel.optim.schedule import warmup_cosine

# Parameter counts of the published checkpoints (from their safetensors indexes / model cards).
PUBLISHED = {
    "llama3_2_1b": 1_235_814_400, "llama3_8b": 8_030_261_248, "llama3_70b": 70_553_706_496,
    "qwen3_0_6b": 596_049_920, "qwen2_5_7b": 7_615_616_512, "mistral_7b": 7_248_023_552,
    # Mixture-of-experts presets: the exact counts these presets build, checked against the rounded model-card
    # figures in PUBLISHED_ROUNDED (and, for Mixtral, against its safetensors index).
    "mixtral_8x7b": 46_702_792_704,  # card: 46.7B; safetensors index total_size 93,405,585,408 bytes of bf16
    "qwen3_30b_a3b": 30_532_122_624,  # card: 30.5B in total (29.9B non-embedding)
    "deepseek_v3": 671_026_404_352,  # card: 671B main model (the hub's 685B adds the 14B MTP layer 61, not built)
    "gpt_oss_20b": 20_914_757_184,  # model card (arXiv 2508.10925) table 1: 20.91B total; bf16 elements, not MXFP4
    "gpt_oss_120b": 116_829_156_672,  # model card (arXiv 2508.10925) table 1: 116.83B total; likewise
    # image-text presets (their safetensors' totals, as the hub's model pages show them)
    "qwen2_5_vl_3b": 3_754_622_976, "qwen2_5_vl_7b": 8_292_166_656, "gemma3_4b": 4_300_079_472,
}
# The published figures of the MoE presets, in billions, to the digits published: (figure, decimal digits).
PUBLISHED_ROUNDED = {
    "mixtral_8x7b": (46.7, 1), "qwen3_30b_a3b": (30.5, 1), "deepseek_v3": (671, 0),
    "gpt_oss_20b": (20.91, 2), "gpt_oss_120b": (116.83, 2),
}


def _model_plugin(*overrides):
    return validate(compose(*overrides)).plugins["model"]


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_preset_matches_published_parameter_count(preset):
    model = _model_plugin(f"model={preset}").build("meta")  # no memory: sizes only
    assert count_params(model)[0] == PUBLISHED[preset]
    text_layers = [b for b in decoder_layers(model) if type(b).__name__.endswith("DecoderLayer")]
    assert len(text_layers) == model.config.get_text_config().num_hidden_layers  # (an image-text model: + its vision blocks)


@pytest.mark.parametrize("preset", sorted(PUBLISHED_ROUNDED))
def test_preset_count_rounds_to_the_published_figure(preset):
    figure, digits = PUBLISHED_ROUNDED[preset]
    assert round(PUBLISHED[preset] / 1e9, digits) == figure  # the exact test above ties PUBLISHED to the build


def test_local_folder_loads_its_weights_and_tokenizer(tmp_path):
    source = _model_plugin(*MICRO)
    torch.manual_seed(7)
    original = source.build("cpu")
    original.save_pretrained(tmp_path / "m")
    source.tokenizer().save_pretrained(tmp_path / "m")
    plugin = _model_plugin("model=hf", f"model.path={tmp_path / 'm'}")
    loaded = plugin.build("cpu")
    for (name, a), (_, b) in zip(original.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert len(plugin.tokenizer()) == len(source.tokenizer())
    # and `model=hf model.path=<folder>` trains from it
    cfg = compose("model=hf", f"model.path={tmp_path / 'm'}", "train.max_steps=1", "train.global_batch_size=4",
                  "train.micro_batch_size=4", "train.seq_len=48", "checkpoint.export_final=false",
                  "train.sample_prompts=0")
    result = run_training(cfg, str(tmp_path))
    assert math.isfinite(result.records[0]["loss"])


def test_hub_id_offline_is_one_clear_line(tmp_path):
    proc = cli("model=hf", "model.path=some-org/some-model", cwd=str(tmp_path), env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("automodel: error: model.path='some-org/some-model' is not a local folder and the "
                           "Hugging Face hub is unreachable (offline?)"), line
    assert "Traceback" not in proc.stderr and not os.listdir(tmp_path)


def test_path_that_does_not_exist_is_not_mistaken_for_a_hub_id():
    with pytest.raises(UserError, match="model.path='/no/such/model' is not an existing folder"):
        _model_plugin("model=hf", "model.path=/no/such/model").hf_config()


def test_tokenizer_larger_than_the_embedding_is_refused():
    with pytest.raises(UserError, match="model has 64 token embeddings but the tokenizer has 362 tokens"):
        _model_plugin(*MICRO, "model.config.vocab_size=64").build("meta")


def test_warmup_then_cosine_to_the_floor():
    shape = [warmup_cosine(s, warmup_steps=4, max_steps=20, min_lr_ratio=0.1) for s in range(21)]
    assert shape[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(shape[3:], shape[4:]))  # monotone decay after warmup
    assert shape[20] == pytest.approx(0.1) and shape[12] == pytest.approx(0.55)


def test_the_models_own_tokenizer_larger_than_its_embeddings_names_the_real_cause(tmp_path):
    folder = str(tmp_path / "m")
    _model_plugin(*MICRO, "model.config.vocab_size=64").hf_config().save_pretrained(folder)
    _model_plugin(*MICRO).tokenizer().save_pretrained(folder)  # 362 tokens: more than the 64 embeddings
    with pytest.raises(UserError) as e:
        _model_plugin("model=hf", f"model.path={folder}").build("meta")
    assert "its own tokenizer has 362 tokens" in str(e.value) and "use the model's own tokenizer" not in str(e.value)


def test_a_hub_id_in_the_local_cache_trains_offline(tmp_path):
    from helpers import save_micro_hf_model

    repo = tmp_path / "hub" / "models--some-org--tiny"
    save_micro_hf_model(str(repo / "snapshots" / ("0" * 40)))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    (tmp_path / "run").mkdir()
    proc = cli("model=hf", "model.path=some-org/tiny", "train.max_steps=1", "train.global_batch_size=4",
               "train.seq_len=48", "checkpoint.export_final=false", "train.sample_prompts=0", cwd=str(tmp_path / "run"),
               env={"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "materialized" in ln]
    # every parameter from the cached weights; only the computed rotary buffers are initialized
    assert loaded and "(2 initialized, 39 from pretrained weights" in loaded[0], loaded


def test_memory_check_on_one_host_counts_shards_not_whole_models(monkeypatch):
    from automodel.distributed.parallel_dims import ParallelDims
    from automodel.engine import memory

    total = 8_000_000_000
    monkeypatch.setattr(memory, "available_host_bytes", lambda: 64 * memory.GiB)
    needs = {}
    for ranks in (1, 2, 4):
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(ranks))
        with pytest.raises(UserError) as e:
            memory.check_fits(total, total, ParallelDims.infer(ranks), device_type="cpu", model_name="m",
                              largest_tensor=500_000_000)
        needs[ranks] = float(str(e.value).split("needs about ")[1].split(" GiB")[0])
        assert "This host holds every rank's shard: add hosts or GPUs" in str(e.value)
    # the sharded training state is the same on one host; only each rank's set-up overhead is added
    assert needs[2] - needs[1] < 5 and needs[4] - needs[2] < 10, needs


@pytest.mark.parametrize("model_type,expected", [("llama", "sdpa"), ("gemma2", "eager"), ("qwen3", "sdpa")])
def test_attention_defaults_to_the_best_the_model_supports(model_type, expected):
    plugin = _model_plugin(*MICRO, f"model.config.model_type={model_type}")
    assert plugin.hf_config()._attn_implementation == expected
    explicit = _model_plugin(*MICRO, f"model.config.model_type={model_type}", "model.attn_implementation=eager")
    assert explicit.hf_config()._attn_implementation == "eager"
