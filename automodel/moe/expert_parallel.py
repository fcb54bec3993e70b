"""Expert parallel: each rank of the `ep` mesh dimension holds num_experts / ep of every layer's experts.

Layout (torchtitan's): the stacked expert parameters become DTensors sharded on the expert dimension
(`Shard(0)`) over `ep`; FSDP then shards each rank's experts over the data-parallel ranks that hold the same
experts (see ParallelDims.expert_fsdp_names). Everything else is laid out as without ep.

Forward of one experts module, for this rank's T tokens routed to k experts each (dropless: every
(token, expert) pair is computed, whatever the load):

    sort the T*k pairs by expert -> all-to-all the token rows to the ranks owning their experts
    -> the model's own experts implementation on the received rows, with this rank's experts only
    -> all-to-all the results back -> weight by the router's scores and sum over the k experts

Reusing the model's own experts forward (with each received row routed to one local expert at weight 1)
keeps whatever the architecture does inside an expert (biases, clamped SwiGLU, interleaved gate/up) and
the selected implementation (grouped_mm, batched_mm, eager) without knowing either. The all-to-alls are
torch's functional `all_to_all_single_autograd`, which carries gradients back (gloo on CPU, NCCL on
GPU). Each (token, expert) result is multiplied by its routing weight here, so the router's gradient is
exact.
"""

from __future__ import annotations

import contextlib
import functools
import logging

import torch
from torch import nn

from automodel.errors import UserError
from automodel.moe.experts import experts_modules

log = logging.getLogger(__name__)


def apply_expert_parallel(model: nn.Module, ep_mesh, model_name: str) -> list[nn.Module]:
    """Shard every experts module of `model` (on the meta device) over `ep_mesh`; return the modules."""
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    ep = ep_mesh.size()
    found = experts_modules(model)
    if not found:
        raise UserError(f"parallel.ep={ep}: {model_name} has no routed experts (a dense model); use parallel.ep=1")
    for name, module in found:
        if "base_layer" in name.split("."):
            raise UserError(f"parallel.ep={ep}: the routed experts of {model_name} carry LoRA adapters "
                            "(peft.target_experts=true), which expert parallel cannot split yet; use "
                            "peft.target_experts=false (LoRA on attention and dense layers) or parallel.ep=1")
        if module.num_experts % ep:
            raise UserError(f"parallel.ep={ep} does not divide the {module.num_experts} experts of {model_name} "
                            f"({name}); pick an ep that divides {module.num_experts}")
        for pname, p in list(module.named_parameters(recurse=False)):
            if isinstance(p, DTensor):
                raise UserError(f"parallel.ep={ep}: {name}.{pname} is already laid out ({p.placements}); "
                                "expert parallel cannot be combined with that")
            shard = distribute_tensor(p.data, ep_mesh, [Shard(0)], src_data_rank=None)
            module.register_parameter(pname, nn.Parameter(shard, requires_grad=p.requires_grad))
        module.forward = functools.partial(_ep_forward, module, module.forward, ep_mesh.get_group(), ep,
                                           module.num_experts)
        module._is_expert_parallel = True
    log.info("expert parallel over ep=%d: %d MoE layers, %d of %d experts per rank", ep, len(found),
             found[0][1].num_experts // ep, found[0][1].num_experts)
    return [m for _, m in found]


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale: float):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


@contextlib.contextmanager
def _local_experts(module: nn.Module, n_local: int, ep: int):
    """The module's parameters as this rank's local tensors (differentiable views of the DTensors, which
    FSDP may have just all-gathered) and its expert count as the local one, for the model's own forward.

    Gradient scale: every expert already receives the gradients of all ep ranks' tokens (through the
    all-to-all), while FSDP averages each expert's gradient only over the ranks that hold it (dp / ep of
    them); the loss is scaled for averaging over all dp ranks, so the local views scale by 1 / ep."""
    saved = dict(module._parameters)
    saved_n = module.num_experts
    for name, p in saved.items():
        if p is not None and hasattr(p, "to_local"):
            module._parameters[name] = _ScaleGrad.apply(p.to_local(), 1.0 / ep)
    module.num_experts = n_local
    try:
        yield [module._parameters[n] for n in saved if module._parameters[n] is not None]
    finally:
        module._parameters.update(saved)
        module.num_experts = saved_n


def _ep_forward(module, local_forward, group, ep: int, n_experts: int, hidden_states: torch.Tensor,
                top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist
    from torch.distributed._functional_collectives import all_to_all_single_autograd as all_to_all

    n_local = n_experts // ep
    tokens, k = top_k_index.shape
    hidden = hidden_states.shape[-1]
    expert_of = top_k_index.reshape(-1)
    order = torch.argsort(expert_of, stable=True)  # pairs grouped by expert, so by owning rank
    sent = torch.bincount(expert_of, minlength=n_experts)  # pairs this rank sends to each expert
    received = torch.empty_like(sent)  # [source rank, local expert] pairs this rank's experts get
    dist.all_to_all_single(received, sent, group=group)
    if dist.get_backend(group) == "fake":  # a rehearsal: fake collectives return no data; say every rank
        received = sent.view(ep, n_local).sum(0).repeat(ep) // ep  # routes like this one (balanced sizes)
    send_splits = sent.view(ep, n_local).sum(1).tolist()
    recv_splits = received.view(ep, n_local).sum(1).tolist()

    rows = hidden_states[order // k]
    rows = _wait(all_to_all(rows.contiguous(), recv_splits, send_splits, group))
    local_expert = torch.repeat_interleave(torch.arange(n_local, device=rows.device).repeat(ep), received.view(-1))
    with _local_experts(module, n_local, ep) as params:
        out = local_forward(rows, local_expert.unsqueeze(1), rows.new_ones(rows.shape[0], 1))
        if rows.shape[0] == 0:  # no pair for this rank's experts: keep them in the graph (FSDP reduces their grads)
            out = out + sum(p.reshape(-1)[:1].sum() for p in params if p.requires_grad) * 0.0
    out = _wait(all_to_all(out.contiguous(), send_splits, recv_splits, group))
    weighted = (out * top_k_weights.reshape(-1)[order].unsqueeze(-1)).to(hidden_states.dtype)
    combined = weighted.new_zeros(tokens * k, hidden).index_copy(0, order, weighted)
    return combined.view(tokens, k, hidden).sum(dim=1)


def _wait(t: torch.Tensor) -> torch.Tensor:
    """The result of a functional collective, waited for (it may be returned before it completes)."""
    from torch.distributed._functional_collectives import AsyncCollectiveTensor

    return t.wait() if isinstance(t, AsyncCollectiveTensor) else t
