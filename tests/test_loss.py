"""The `loss` group: `chunked_ce` equals `ce` (loss and gradients, fp32) on every architecture of the zoo or
refuses the model in one line, never holds [tokens, vocab] logits (measured at Llama 3 8B's head size under
fake tensors), and refuses the layouts and heads it cannot serve. Its multi-rank parity (FSDP2, CP) against
one process of `ce` is in tests/test_parallel_layouts.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from automodel import registry
from automodel.errors import UserError
from automodel.head_loss import chunk_tokens, linear_cross_entropy
from automodel.loss import token_sum_cross_entropy


def _plugin(name: str, **fields):
    return registry.instantiate("loss", {"plugin": name, **fields})


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_cross_entropy_equals_cross_entropy_over_the_full_logits(recompute, bias):
    torch.manual_seed(0)
    h = torch.randn(3, 37, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    b = torch.randn(50, requires_grad=True) if bias else None
    y = torch.randint(0, 50, (3, 37))
    y[0, :5] = -100  # prompt / padding: no loss
    inputs = [h, w] + ([b] if bias else [])
    ref = token_sum_cross_entropy(F.linear(h, w, b), y)
    ref_grads = torch.autograd.grad(ref * 0.7, inputs)
    got = linear_cross_entropy(h, w, b, y, chunk=16, recompute=recompute)  # 111 tokens: 7 chunks, the last short
    grads = torch.autograd.grad(got * 0.7, inputs)
    assert abs(got.item() - ref.item()) <= 1e-6 * ref.item()
    for a, e in zip(grads, ref_grads):
        assert a.dtype == e.dtype and (a - e).abs().max().item() < 1e-5
    with torch.no_grad():  # evaluation: the loss only
        assert abs(linear_cross_entropy(h, w, b, y, chunk=16).item() - ref.item()) <= 1e-6 * ref.item()


def test_chunks_are_sized_by_the_vocabulary_unless_given():
    assert chunk_tokens(128_256, None) == 512  # fp32 logits of a chunk: 251 MiB
    assert chunk_tokens(32, None) > 100_000 and chunk_tokens(128_256, 100) == 100


def test_no_full_logits_at_llama_3_8b_head_size():
    """4096 tokens x vocab 128,256 x hidden 4096 under fake tensors (no real memory): beyond the weight and its
    gradient, which every loss needs, ce holds >= one [tokens, vocab] fp32 tensor; chunked_ce one chunk of logits."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    tokens, hidden, vocab = 4096, 4096, 128_256
    weight_and_grad = 2 * vocab * hidden * 4
    logits = tokens * vocab * 4
    chunk = chunk_tokens(vocab, None) * vocab * 4
    extra = {}
    for name in ("ce", "chunked", "recompute"):
        with FakeTensorMode():
            h = torch.randn(1, tokens, hidden, requires_grad=True)
            w = torch.randn(vocab, hidden, requires_grad=True)
            y = torch.randint(0, vocab, (1, tokens))
            tracker = MemTracker()
            with tracker:
                if name == "ce":
                    loss = token_sum_cross_entropy(F.linear(h, w), y)
                else:
                    loss = linear_cross_entropy(h, w, None, y, chunk_tokens(vocab, None), recompute=name == "recompute")
                loss.backward()
            peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
        extra[name] = peak - weight_and_grad - 2 * h.numel() * 4  # hidden states and their gradient aside
    assert extra["ce"] >= logits, extra
    assert extra["chunked"] <= 1.25 * chunk and extra["recompute"] <= 1.25 * chunk, (extra, chunk)


def test_distilling_inside_the_head_holds_chunks_not_logits_at_llama_3_8b_head_size():
    """The same under fake tensors with a teacher of the same head size, 16,384 tokens: the KL from full logits
    holds the student's and the teacher's [tokens, vocab] logits (8.4 GB each); in the head, a few chunks."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    from automodel.distill import token_sum_kl
    from automodel.head_loss import TeacherChunks

    tokens, hidden, vocab = 16384, 4096, 128_256
    logits = tokens * vocab * 4
    chunk = chunk_tokens(vocab, None) * vocab * 4
    extra = {}
    for name in ("full", "in_head"):
        with FakeTensorMode():
            h = torch.randn(1, tokens, hidden, requires_grad=True)
            w = torch.randn(vocab, hidden, requires_grad=True)
            ht, wt = torch.randn(1, tokens, hidden), torch.randn(vocab, hidden)
            y = torch.randint(0, vocab, (1, tokens))
            tracker = MemTracker()
            with tracker:
                if name == "full":
                    z = F.linear(h, w)
                    with torch.no_grad():
                        zt = F.linear(ht, wt)
                    loss = 0.5 * token_sum_cross_entropy(z, y) + 0.5 * token_sum_kl(z, zt, y, 2.0)
                else:
                    loss = linear_cross_entropy(h, w, None, y, chunk_tokens(vocab, None),
                                                teacher=TeacherChunks(ht, wt, None, 0.5, 2.0))
                loss.backward()
            peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
        # aside: the student's weight, hidden states and their gradients; the teacher's weight and hidden states
        extra[name] = peak - 3 * vocab * hidden * 4 - 3 * h.numel() * 4
    assert extra["full"] >= 2 * logits, extra
    assert extra["in_head"] <= 6 * chunk, (extra, chunk)  # ~5 chunk-sized fp32 tensors at once: 1.5 GB
    print({k: f"{v / 2**30:.2f} GiB" for k, v in extra.items()})


# families whose forward changes the head's output: the loss cannot be computed inside their head
POST_PROCESSED = {"gemma2": "final_logit_softcapping", "granite": "logits_scaling", "cohere": "logit_scale"}


def test_chunked_ce_equals_ce_on_every_architecture_or_refuses_it(zoo):
    """Each zoo family from its HF folder: the same loss and gradients with the head swapped, or a one-line
    refusal exactly for the families that rescale or soft-cap their logits."""
    from transformers import AutoModelForCausalLM

    folders, _ = zoo
    refused = {}
    for family, folder in folders.items():
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(3, 300, (2, 24), generator=g)
        labels = torch.randint(3, 300, (2, 24), generator=g)
        labels[:, :6] = -100
        loss = token_sum_cross_entropy(model(input_ids=ids).logits, labels)
        loss.backward()
        ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        plugin = _plugin("chunked_ce", chunk_tokens=10)
        plugin.prepare(model, family)
        assert set(dict(model.named_parameters())) >= set(ref), family  # the swap kept every parameter name
        with plugin.targets(labels):
            out = model(input_ids=ids).logits
        try:
            got = plugin.token_loss(out, labels)
        except UserError as e:
            refused[family] = str(e)
            continue
        got.backward()
        assert abs(got.item() - loss.item()) <= 1e-5 * loss.item(), family
        for name, grad in ref.items():
            other = dict(model.named_parameters())[name].grad
            assert (other - grad).abs().max().item() <= 1e-5 * max(grad.abs().max().item(), 1e-3), (family, name)
    assert set(refused) == set(POST_PROCESSED), refused
    for family, message in refused.items():
        assert "\n" not in message and "loss=ce" in message and family in message


def test_chunked_ce_refuses_the_layouts_and_heads_it_cannot_serve():
    from automodel.distributed.parallel_dims import ParallelDims, ParallelHints
    from transformers import LlamaConfig, LlamaForCausalLM

    plugin = _plugin("chunked_ce")
    with pytest.raises(UserError, match="tensor parallelism.*loss_parallel=true"):
        plugin.check_layout(ParallelDims.infer(2, tp=2), ParallelHints())
    with pytest.raises(UserError, match="pipeline parallelism.*use loss=ce"):
        plugin.check_layout(ParallelDims.infer(2, pp=2), ParallelHints(pipeline=True))
    plugin.check_layout(ParallelDims.infer(2), ParallelHints())  # fsdp2: fine
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                             num_hidden_layers=1, num_attention_heads=2))
    model.lm_head = torch.nn.Sequential(model.lm_head)
    with pytest.raises(UserError, match="plain Linear layer; LlamaForCausalLM's is Sequential"):
        plugin.prepare(model, "tiny")
    with pytest.raises(UserError, match="loss.chunk_tokens=0"):
        _plugin("chunked_ce", chunk_tokens=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_liger_is_refused_without_cuda_before_anything_is_built():
    from automodel.distributed.parallel_dims import ParallelDims, ParallelHints

    with pytest.raises(UserError, match="CUDA GPUs.*loss=chunked_ce"):
        _plugin("liger").check_layout(ParallelDims.infer(1), ParallelHints())
