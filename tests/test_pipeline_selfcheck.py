"""The pipeline set-up self-check (automodel.parallel.pipeline_selfcheck.check_split), in this process, no ranks.

A small twin of the model is cut into stages by the same code the run uses; its stages must compute the
whole model's logits, or the layout is refused in one line. The 2-rank training parity of a Granite-like
model under pp (whose base model scales `inputs_embeds`) is in test_parallel_layouts.py (`pp_granite`).
"""

import logging
import time

import pytest
import torch
from helpers import GRANITE, MICRO, compose

from automodel.config import validate
from automodel.errors import UserError
from automodel.modules import hf_base
from automodel.parallel import pipeline, pipeline_selfcheck

GEMMA2 = ["model.config.model_type=gemma2", "+model.config.head_dim=16", "model.config.tie_word_embeddings=false",
          "+model.config.sliding_window=8"]


def _setup(*overrides):
    """The parallel plugin's set-up check under pp=2, as the run calls it (before any model is built)."""
    cfg = validate(compose(*MICRO, "parallel=pp", *overrides))
    plugin, hf_config = cfg.plugins["parallel"], cfg.plugins["model"].hf_config()
    return lambda: plugin.check_model(plugin.dims(2), hf_config)


def _check(*overrides):
    _setup(*overrides)()


def _old_forward(self, x):
    """The stage runner before the fix: the received hidden states go in as `inputs_embeds` (which the base
    model may transform) and a stage hands on `last_hidden_state`."""
    causal = hf_base(self.shell)
    kwargs = {"position_ids": self._position_ids(x.shape[1], x.device), "use_cache": False,
              "input_ids" if self.first else "inputs_embeds": x}
    if self.last:
        return causal(**kwargs).logits
    return causal.base_model(**kwargs).last_hidden_state


def test_a_broken_stage_runner_is_refused_in_one_line(monkeypatch):
    _check(*GRANITE)  # the real runner passes
    monkeypatch.setattr(pipeline.PipelineStageModule, "forward", _old_forward)
    with pytest.raises(UserError) as e:
        _check(*GRANITE)
    msg = str(e.value)
    print(msg)
    assert msg.startswith("parallel.pp=2 x pp_virtual_stages=1: the pipeline stages of granite "
                          "(GraniteForCausalLM) compute logits that differ from the whole model's by ")
    assert "use a layout without pp" in msg and "\n" not in msg
    _check()  # llama does not transform inputs_embeds: even the old runner computed it right


@pytest.mark.parametrize("name,overrides", [("llama", []), ("gemma2", GEMMA2), ("granite", GRANITE)])
def test_the_twins_of_llama_gemma2_and_granite_pass_quickly(name, overrides, caplog):
    _check(*overrides)  # the first call imports the modeling code
    check = _setup(*overrides, "parallel.pp_schedule=interleaved_1f1b", "parallel.pp_virtual_stages=2")
    t0 = time.perf_counter()
    with caplog.at_level(logging.INFO, logger="automodel.parallel.pipeline_selfcheck"):
        check()
    seconds = time.perf_counter() - t0
    print(f"{name}: self-check of 4 stages in {seconds:.3f}s")
    assert "4 stages of a small twin" in caplog.text and "match the whole model" in caplog.text
    assert seconds < 1


def test_the_twin_of_a_70b_model_is_small_and_keeps_the_architecture():
    cfg = validate(compose("model=llama3_70b", "parallel=pp")).plugins["model"].hf_config()
    twin = pipeline_selfcheck._twin_config(cfg, 4)
    assert (twin.num_hidden_layers, twin.num_attention_heads, twin.num_key_value_heads, twin.head_dim) == (4, 8, 1, 128)
    assert twin.hidden_size == 1024 and twin.vocab_size <= 256 and twin.intermediate_size <= 64
    assert (cfg.num_hidden_layers, cfg.hidden_size) == (80, 8192)  # the real config is untouched
    gemma = validate(compose(*MICRO, *GEMMA2)).plugins["model"].hf_config()
    assert pipeline_selfcheck._twin_config(gemma, 2).layer_types == gemma.layer_types[:2]
    state = torch.random.get_rng_state()
    t0 = time.perf_counter()
    pipeline_selfcheck.check_split(cfg, 2, 2)
    print(f"llama3_70b twin: self-check in {time.perf_counter() - t0:.3f}s")
    assert torch.equal(torch.random.get_rng_state(), state)  # the run's RNG is left as it was


def test_a_twin_that_cannot_be_built_skips_the_check_with_a_warning(monkeypatch, caplog):
    from transformers import AutoModelForCausalLM

    def fail(*args, **kwargs):
        raise ValueError("no causal LM for this config")

    monkeypatch.setattr(AutoModelForCausalLM, "from_config", fail)
    with caplog.at_level(logging.WARNING, logger="automodel.parallel.pipeline_selfcheck"):
        _check()
    assert "pipeline self-check skipped for llama under parallel.pp=2 x pp_virtual_stages=1" in caplog.text
    assert "ValueError: no causal LM for this config" in caplog.text
