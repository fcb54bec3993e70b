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


def counting_compile(monkeypatch) -> tuple[list, list]:
    """Make torch.compile hand every graph Dynamo captures to a backend that records it, runs the requested
    backend (Inductor by default) on it, and counts the calls of what that compiled. The record is this test's
    own, not Dynamo's process-global counters (which other runs in the process, or a cache, can leave empty):
    empty lists mean compile was skipped, whatever the reason."""
    import torch._dynamo

    graphs, runs = [], []
    real_compile = torch.compile

    def compile_counted(fn=None, *args, backend="inductor", **kwargs):
        inner = torch._dynamo.lookup_backend(backend)

        def recording_backend(gm, example_inputs):
            graphs.append(gm)
            compiled = inner(gm, example_inputs)

            def run(*a):
                runs.append(len(graphs) - 1)
                return compiled(*a)

            return run

        return real_compile(fn, *args, backend=recording_backend, **kwargs)

    monkeypatch.setattr(torch, "compile", compile_counted)
    return graphs, runs


def test_compiled_and_checkpointed_blocks_train_like_the_plain_model(tmp_path, monkeypatch):
    import torch._inductor.config

    monkeypatch.setattr(torch._inductor.config, "compile_threads", 1)  # no worker pool to start on 2 cores
    (tmp_path / "plain").mkdir()
    (tmp_path / "compiled").mkdir()
    graphs, runs = counting_compile(monkeypatch)
    plain = train(str(tmp_path / "plain"), *COMMON)
    assert graphs == [] and runs == []  # nothing compiles unless parallel.compile asks for it
    compiled = train(str(tmp_path / "compiled"), "parallel=fsdp2", "parallel.compile=true",
                     "parallel.activation_checkpointing=full", *COMMON)

    # the layout really was applied: the one block is checkpoint-wrapped and compiled, Dynamo captured it as
    # one graph with the checkpoint region inside it, and that compiled graph ran at every step
    wrappers = [m for m in compiled.model.modules() if "CheckpointWrapper" in type(m).__name__]
    assert len(wrappers) == 1, [type(m).__name__ for m in compiled.model.modules()]
    assert type(wrappers[0]._checkpoint_wrapped_module).__name__ == "LlamaDecoderLayer"
    assert getattr(wrappers[0], "_compiled_call_impl", None) is not None  # nn.Module.compile() was called on it
    assert len(graphs) == 1, [g.code for g in graphs]
    targets = [str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert "tag_activation_checkpoint" in targets, targets
    assert runs == [0, 0, 0], runs  # one forward per step, all through the compiled graph

    # and trains as the plain model does: the same losses and gradient norms, step by step
    a, b = losses(plain), losses(compiled)
    assert len(a) == len(b) == 3
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5, (a, b)
    gn_a, gn_b = [r["grad_norm"] for r in plain.records], [r["grad_norm"] for r in compiled.records]
    assert max(abs(x - y) for x, y in zip(gn_a, gn_b)) < 1e-4, (gn_a, gn_b)
    assert a[-1] < a[0]
    assert torch.isfinite(torch.tensor(b)).all()
