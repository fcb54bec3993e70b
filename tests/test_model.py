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
}


def _model_plugin(*overrides):
    return validate(compose(*overrides)).plugins["model"]


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_preset_matches_published_parameter_count(preset):
    model = _model_plugin(f"model={preset}").build("meta")  # no memory: sizes only
    assert count_params(model)[0] == PUBLISHED[preset]
    assert len(decoder_layers(model)) == model.config.num_hidden_layers


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
