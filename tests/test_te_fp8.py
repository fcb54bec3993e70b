"""precision=te_fp8 (Transformer Engine): what runs without CUDA.

Transformer Engine builds only against a CUDA torch, so on this machine the refusals are tested for real (not
installed; on a CPU; under tp/pp; under activation checkpointing), and the plugin's own work (which layers are
swapped, that they keep the model's parameters, that each forward runs inside Transformer Engine's autocast, that
module-private state stays out of the HF export) is tested against a stand-in package with Transformer Engine's
API (`transformer_engine.pytorch.Linear`, `autocast`, `common.recipe`) whose Linear runs a plain matmul. A run
through the stand-in must therefore equal `precision=bf16` exactly. The float8 matmuls themselves are Transformer
Engine's and run only on a GPU (`python scripts/bench_precision.py --precisions bf16 fp8 te_fp8` there).
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import importlib.util
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from helpers import losses, train

from automodel import registry
from automodel.distributed.parallel_dims import ParallelDims, ParallelHints
from automodel.errors import UserError

COMMON = ["train.log_every=1", "train.global_batch_size=8", "train.micro_batch_size=4", "train.max_steps=4"]


class _Linear(nn.Module):
    """Transformer Engine's Linear as far as the plugin uses it: the constructor, the parameters, an empty
    placeholder for a missing bias, module-private extra state; its forward demands TE's autocast."""

    calls_outside_autocast = 0

    def __init__(self, in_features, out_features, bias=True, params_dtype=None, device="cuda", **_):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=params_dtype, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=params_dtype, device=device)) if bias else \
            torch.Tensor().to(device=device)
        self.forwards = 0

    def forward(self, x):
        if not _STATE["fp8"]:
            _Linear.calls_outside_autocast += 1
        self.forwards += 1
        return F.linear(x, self.weight, self.bias)

    def get_extra_state(self):
        return torch.tensor([self.forwards], dtype=torch.int64)

    def set_extra_state(self, state):
        pass


_STATE = {"fp8": False, "recipes": []}


@contextlib.contextmanager
def _autocast(enabled=True, recipe=None, **_):
    _STATE["fp8"], _STATE["recipes"] = enabled, [*_STATE["recipes"], recipe]
    try:
        yield
    finally:
        _STATE["fp8"] = False


def _module(name, **attrs):
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    module.__dict__.update(attrs)
    return module


@pytest.fixture
def fake_te(monkeypatch):
    """The stand-in package, importable as transformer_engine for this test only."""

    class Recipe:
        def __init__(self, **kw):
            self.kw = kw

    recipe = _module("transformer_engine.common.recipe", Format=types.SimpleNamespace(HYBRID="HYBRID", E4M3="E4M3"),
                     DelayedScaling=type("DelayedScaling", (Recipe,), {}),
                     Float8CurrentScaling=type("Float8CurrentScaling", (Recipe,), {}),
                     MXFP8BlockScaling=type("MXFP8BlockScaling", (Recipe,), {}))
    pytorch = _module("transformer_engine.pytorch", Linear=_Linear, autocast=_autocast,
                      is_fp8_available=lambda: (True, ""))
    common = _module("transformer_engine.common", recipe=recipe)
    root = _module("transformer_engine", pytorch=pytorch, common=common)
    for name, module in [("transformer_engine", root), ("transformer_engine.pytorch", pytorch),
                         ("transformer_engine.common", common), ("transformer_engine.common.recipe", recipe)]:
        monkeypatch.setitem(sys.modules, name, module)
    _STATE.update(fp8=False, recipes=[])
    _Linear.calls_outside_autocast = 0
    return pytorch


def test_without_transformer_engine_it_is_refused_naming_the_extra():
    assert importlib.util.find_spec("transformer_engine") is None  # (it cannot be installed without CUDA)
    te = registry.instantiate("precision", {"plugin": "te_fp8"})
    with pytest.raises(UserError) as e:
        te.check_device("cpu", ParallelDims.infer(1))
    assert str(e.value) == ("precision=te_fp8 needs Transformer Engine: pip install 'automodel[te]' (CUDA only); or "
                            "use precision=fp8 (torchao) or precision=bf16")


def test_where_float8_cannot_run_or_the_layout_cannot_share_it_it_is_refused_in_one_line(fake_te):
    te = registry.instantiate("precision", {"plugin": "te_fp8"})
    with pytest.raises(UserError, match=r"needs an NVIDIA GPU .* this run is on cpu: use precision=bf16"):
        te.check_device("cpu", ParallelDims.infer(1))
    for dims in (ParallelDims.infer(2, tp=2), ParallelDims.infer(2, pp=2)):
        with pytest.raises(UserError, match="under tensor or pipeline parallelism is not supported"):
            te.check_layout(dims, ParallelHints())
    with pytest.raises(UserError, match="parallel.activation_checkpointing=full: the recompute in backward"):
        te.check_layout(ParallelDims.infer(1), ParallelHints(recompute="parallel.activation_checkpointing=full"))
    te.check_layout(ParallelDims.infer(2), ParallelHints())  # FSDP2 is fine
    for field, value in [("recipe", "blockwise"), ("format", "e5m2"), ("amax_history_len", 0)]:
        with pytest.raises(UserError, match=f"precision.{field}="):
            registry.instantiate("precision", {"plugin": "te_fp8", field: value})


def test_a_run_with_activation_checkpointing_is_refused_before_anything_is_built(tmp_path):
    with pytest.raises(UserError) as e:
        train(str(tmp_path), *COMMON, "precision=te_fp8", "parallel=fsdp2", "parallel.activation_checkpointing=full")
    assert "precision=te_fp8 with parallel.activation_checkpointing=full" in str(e.value) and "\n" not in str(e.value)


def test_it_swaps_exactly_the_decoder_blocks_linear_layers_keeping_their_parameters(fake_te):
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                             num_attention_heads=2, num_key_value_heads=1))
    params = dict(model.named_parameters())
    registry.instantiate("precision", {"plugin": "te_fp8"}).prepare(model)
    kinds = {n: type(m).__name__ for n, m in model.named_modules()}
    after = dict(model.named_parameters())
    assert after.keys() == params.keys() and all(after[k] is params[k] for k in params)  # the same Parameters
    for i in range(2):
        for proj in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.o_proj"):  # 32 x 32, 32 -> 16
            assert kinds[f"model.layers.{i}.{proj}"] == "_Linear"
            assert model.get_submodule(f"model.layers.{i}.{proj}").bias is None  # no meta placeholder left
        assert kinds[f"model.layers.{i}.mlp.gate_proj"] == "Linear"  # 40 is not a multiple of 16: kept
    assert kinds["lm_head"] == "Linear" and kinds["model.embed_tokens"] == "Embedding"


def test_a_run_through_transformer_engines_api_equals_bf16_and_exports_a_plain_hf_model(tmp_path, fake_te,
                                                                                          monkeypatch):
    import safetensors.torch
    from transformers import AutoModelForCausalLM

    from automodel.precision.te_fp8 import TEFP8

    monkeypatch.setattr(TEFP8, "check_device", lambda self, device_type, dims: None)  # the stand-in runs on a CPU
    (tmp_path / "bf16").mkdir()
    (tmp_path / "te").mkdir()
    bf16 = train(str(tmp_path / "bf16"), *COMMON, "precision=bf16")
    te = train(str(tmp_path / "te"), *COMMON, "precision=te_fp8", "precision.recipe=delayed")
    swapped = [m for m in te.model.modules() if isinstance(m, _Linear)]
    assert swapped and all(m.forwards > 0 for m in swapped)
    assert _Linear.calls_outside_autocast == 0  # every forward inside Transformer Engine's autocast
    assert {type(r).__name__ for r in _STATE["recipes"]} == {"DelayedScaling"}
    assert losses(te) == losses(bf16)  # the same parameters, initialization and bf16 matmuls: the same run
    assert [r["grad_norm"] for r in te.records] == [r["grad_norm"] for r in bf16.records]
    assert any(k.endswith("._extra_state") for k in te.model.state_dict())  # module-private state exists ...
    exported = safetensors.torch.load_file(f"{te.final_dir}/model.safetensors")
    assert set(exported) == set(safetensors.torch.load_file(f"{bf16.final_dir}/model.safetensors"))  # ... not here
    model = AutoModelForCausalLM.from_pretrained(te.final_dir)
    assert not any(isinstance(m, _Linear) for m in model.modules())
