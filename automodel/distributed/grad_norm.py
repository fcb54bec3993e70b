"""Gradient-norm clipping over parameters that may be DTensors on different meshes, or plain tensors.

`torch.nn.utils.clip_grad_norm_` stacks the per-parameter norms, which fails when DTensors (tensor
parallel weights, sequence-parallel norms) and plain tensors (replicated parameters) are mixed, as they
are under tensor parallel without FSDP. Here the norm is taken per group of identically laid-out
gradients, made a full (reduced) value per group, then combined.
"""

from __future__ import annotations

import torch


def clip_grad_norm(params: list[torch.Tensor], max_norm: float, across=None) -> torch.Tensor:
    """Clip to `max_norm` and return the total norm. `across`: a process group whose ranks hold disjoint
    parameters of one model (pipeline stages); the norm is then taken over all of them."""
    groups: dict[object, list[torch.Tensor]] = {}  # parameters, by the layout of their gradient
    for p in params:
        g = p.grad
        if g is None:
            continue
        key = (id(g.device_mesh), tuple(g.placements)) if hasattr(g, "device_mesh") else None
        groups.setdefault(key, []).append(p)
    if len(groups) <= 1 and across is None:
        return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
    norms = []
    for group in groups.values():
        n = torch.nn.utils.get_total_norm([p.grad for p in group], foreach=True)
        norms.append(n.full_tensor() if hasattr(n, "full_tensor") else n)
    total = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros((), device=params[0].device)
    if across is not None:
        import torch.distributed as dist

        squared = total.float() ** 2
        dist.all_reduce(squared, group=across)
        total = squared.sqrt()
    for group in groups.values():
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, total, foreach=True)
    return total
