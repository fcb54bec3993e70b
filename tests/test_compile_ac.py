"""torch.compile + activation checkpointing, in a form cheap enough for every run of the suite.

The full check (2 ranks of FSDP2 on the 4-layer micro model) is
test_parallel_layouts.py::test_compile_and_activation_checkpointing_under_fsdp2_match_one_process, which costs
minutes here and runs only with AUTOMODEL_SLOW_TESTS=1. This one keeps what it composes: parallel=fsdp2 on a
world of one process still wraps each decoder block for activation checkpointing, compiles it (Inductor) and
fully_shards it, in that order, and trains through all of it. The cost is Inductor's C++ kernels, so: one
decoder layer, packed rows (every step has the same shape: one graph, no dynamic-shape recompile), one compile
worker, three steps. About a minute on two busy CPU cores with a cold Inductor cache, seconds with a warm one.
"""

import torch
from helpers import losses, train

COMMON = ["model.config.num_hidden_layers=1", "data.packing=true", "train.max_steps=3", "train.log_every=1",
          "train.global_batch_size=4", "train.micro_batch_size=4", "checkpoint.export_final=false"]


def test_compiled_and_checkpointed_blocks_train_like_the_plain_model(tmp_path, monkeypatch):
    import torch._dynamo.utils
    import torch._inductor.config

    monkeypatch.setattr(torch._inductor.config, "compile_threads", 1)  # no worker pool to start on 2 cores
    (tmp_path / "plain").mkdir()
    (tmp_path / "compiled").mkdir()
    plain = train(str(tmp_path / "plain"), *COMMON)
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled = train(str(tmp_path / "compiled"), "parallel=fsdp2", "parallel.compile=true",
                     "parallel.activation_checkpointing=full", *COMMON)

    # the layout really was applied: the one block is checkpoint-wrapped, compiled, and Dynamo captured a graph
    wrappers = [m for m in compiled.model.modules() if "CheckpointWrapper" in type(m).__name__]
    assert len(wrappers) == 1, [type(m).__name__ for m in compiled.model.modules()]
    assert type(wrappers[0]._checkpoint_wrapped_module).__name__ == "LlamaDecoderLayer"
    assert getattr(wrappers[0], "_compiled_call_impl", None) is not None  # nn.Module.compile() was called on it
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_before
    assert graphs >= 1, dict(torch._dynamo.utils.counters["stats"])

    # and trains as the plain model does: the same losses and gradient norms, step by step
    a, b = losses(plain), losses(compiled)
    assert len(a) == len(b) == 3
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5, (a, b)
    gn_a, gn_b = [r["grad_norm"] for r in plain.records], [r["grad_norm"] for r in compiled.records]
    assert max(abs(x - y) for x, y in zip(gn_a, gn_b)) < 1e-4, (gn_a, gn_b)
    assert a[-1] < a[0]
    assert torch.isfinite(torch.tensor(b)).all()
