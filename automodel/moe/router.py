"""The routers' training signals: load-balancing and z-loss, expert-load telemetry, correction-bias balancing.

Found structurally: each experts module (experts.py) has a router beside it in its MoE block (the sibling
whose weight is [num_experts, hidden]); the router's output (its first element when a tuple) is the logits.
Hooks on the two see every MoE layer's logits and the routing actually used (`top_k_index`, so DeepSeek's
group-limited, bias-corrected choice counts as chosen).

Definitions, per MoE layer l, over the tokens of one *global* micro-batch (every data-parallel and
context-parallel rank's share of it; padding excluded: a row's tokens up to its last target):

    load-balancing  aux_l = E * sum_e f_le * P_le   (Switch Transformer eq. 4; f = routed (token, expert)
                    pairs per token, P = mean router probability)
    z-loss          z_l   = mean_t logsumexp(logits_t)^2   (ST-MoE)

and the step's value is the mean over layers and micro-batches, weighted by `moe.aux_loss_coef` (default the
model config's `router_aux_loss_coef`) and `moe.z_loss_coef` (default its `router_z_loss_coef`, 0 where it has
none). f's counts are all-reduced (they are not differentiable), P's sum enters each rank's graph for its own
tokens only, so the gradient is exactly that of the global value, on any layout, with one [E+1] all-reduce
per layer per micro-batch. (transformers' `load_balancing_loss_func` averages f and P over all layers before
multiplying; the per-layer form here is the paper's and does not need every layer's routing at once, which a
pipeline stage does not have.)

The gradient enters the graph at each layer's experts output (an identity whose backward also feeds the
layer's loss share), so it composes with pipeline stages, activation checkpointing and expert parallel
without the loop knowing; the step only says which rows are real and how to scale (`begin_step`).
Checkpointed blocks re-run these hooks in backward: the statistics are recorded once, and the recomputation
reuses the forward's all-reduced counts, so the saved tensors match and no collective runs in backward.

Routers that keep a correction bias buffer of size E (DeepSeek-V3's auxiliary-loss-free balancing) get it
updated after every optimizer step, as the paper prescribes: bias_e += rate * sign(mean load - load_e) with
the step's global load (`moe.bias_update_rate`, 0 turns it off).
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import nn

from automodel.moe.config import MoEConfig
from automodel.modules import in_shape_only_forward
from automodel.moe.experts import experts_modules

log = logging.getLogger(__name__)


class _AddGrad(torch.autograd.Function):
    """Identity on `output`; in backward, also sends `scale` into `share` (a scalar loss share)."""

    @staticmethod
    def forward(ctx, output, share, scale):
        ctx.scale = scale
        return output.clone()  # a new tensor, not a view: FSDP hooks the output of the module it wraps

    @staticmethod
    def backward(ctx, grad):
        return grad, torch.full((), ctx.scale, dtype=torch.float32, device=grad.device), None


def valid_rows(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """[batch, seq] bool: each row's positions up to its last target (padding and a final target-less
    token excluded). It depends only on the row, so every layout counts the same tokens."""
    valid = labels != ignore_index
    return valid.flip(1).cummax(1).values.flip(1)


def _layer_number(name: str, default: int) -> int:
    """The decoder layer an experts module sits in: the first number in its dotted name."""
    return next((int(part) for part in name.split(".") if part.isdigit()), default)


def _router_of(model: nn.Module, name: str, experts: nn.Module, hidden: int) -> Optional[nn.Module]:
    """The module beside the experts (in their MoE block, or an adapter's wrapper of them) whose weight is
    [num_experts, hidden]; searched from the experts' parent outwards."""
    modules = dict(model.named_modules())
    parts = name.split(".")
    for up in range(len(parts) - 1, 0, -1):
        block, path = modules[".".join(parts[:up])], ".".join(parts[up:])
        for sub, module in block.named_modules():
            if not sub or path == sub or path.startswith(sub + ".") or sub.startswith(parts[up] + "."):
                continue  # the experts' own branch
            w = module._parameters.get("weight") if hasattr(module, "_parameters") else None
            if isinstance(w, torch.Tensor) and tuple(w.shape) == (experts.num_experts, hidden):
                return module
    return None


def _correction_bias(router: nn.Module, n: int) -> Optional[str]:
    names = [k for k, b in router.named_buffers(recurse=False) if b.dim() == 1 and b.shape[0] == n and b.is_floating_point()]
    return names[0] if len(names) == 1 else None


class RouterLosses:
    """Hooks on every MoE layer of one model; see the module docstring."""

    def __init__(self, layers: list, aux_coef: float, z_coef: float, bias_rate: float, num_layers: int):
        self.layers = layers  # [(index, router, experts, correction-bias buffer name or None)]
        self.aux_coef, self.z_coef, self.bias_rate = aux_coef, z_coef, bias_rate
        self.num_layers = num_layers  # MoE layers of the whole model (a pipeline stage holds some)
        self.labels = list(range(num_layers))  # what the log calls each MoE layer (its decoder layer's number)
        self._device = None
        self.group = None  # ranks holding different tokens of the same layers (data x context parallel)
        self.group_size = 1
        self._masks: list[torch.Tensor] = []
        self._scale = 0.0
        self._step_aux = None
        self._logits: dict[int, torch.Tensor] = {}
        self._calls: dict[int, int] = {}
        self._recomputes: dict[int, int] = {}
        self._cache: dict[tuple[int, int], torch.Tensor] = {}
        self._step_load: dict[int, torch.Tensor] = {}
        self.reset_log()

    # ---- construction
    @classmethod
    def attach(cls, model: nn.Module, hf_config, cfg: MoEConfig) -> Optional["RouterLosses"]:
        """Hook `model` (before it is laid out); None for a model without routed experts."""
        found = experts_modules(model)
        if not found:
            return None
        hidden = hf_config.hidden_size
        layers = []
        for i, (name, experts) in enumerate(found):
            router = _router_of(model, name, experts, hidden)
            if router is None:
                raise RuntimeError(f"{name}: no router beside the experts (a child with a [{experts.num_experts}, "
                                   f"{hidden}] weight)")
            layers.append((i, router, experts, _correction_bias(router, experts.num_experts)))
        aux = cfg.aux_loss_coef if cfg.aux_loss_coef is not None else getattr(hf_config, "router_aux_loss_coef", 0.0)
        z = cfg.z_loss_coef if cfg.z_loss_coef is not None else getattr(hf_config, "router_z_loss_coef", 0.0)
        self = cls(layers, float(aux or 0.0), float(z or 0.0), float(cfg.bias_update_rate), len(layers))
        self.labels = [_layer_number(name, i) for i, (name, _) in enumerate(found)]
        for index, router, experts, _ in layers:
            router.register_forward_hook(self._router_hook(index))
            experts.register_forward_hook(self._experts_hook(index), with_kwargs=True)
        biased = sum(b is not None for *_, b in layers)
        log.info("MoE: %d layers; load-balancing coef %g, z-loss coef %g%s", len(layers), self.aux_coef, self.z_coef,
                 f"; correction-bias balancing on {biased} routers (rate {self.bias_rate:g})" if biased else "")
        return self

    def bind(self, group, size: int) -> None:
        """The process group over the ranks that see different tokens of this model's layers (data x context
        parallel; None on one rank) and its size: FSDP averages gradients over those ranks, so each rank's
        share is scaled by it, as the loop scales its token loss."""
        self.group, self.group_size = group, size

    # ---- the step's side
    def begin_step(self, micro_batches: int, loss_scale: float = 1.0) -> None:
        """A training step of `micro_batches` forward passes begins; `add_rows` then gives each one's real
        rows ([batch, seq] bool, laid out for this rank), in the order the layers will see them. `loss_scale`:
        the fp16 loss scale the token loss's backward runs at (the gradients are divided by it later)."""
        self._masks = []
        self._scale = self.group_size / max(micro_batches, 1) / self.num_layers * loss_scale
        self._micro = max(micro_batches, 1)
        self._calls.clear()
        self._recomputes.clear()
        self._cache.clear()
        self._step_load.clear()
        self._step_aux = None

    def add_rows(self, rows: torch.Tensor) -> None:
        self._masks.append(rows)

    def end_step(self, applied: bool = True) -> None:
        """After the optimizer step: correction-bias balancing (not when the step was skipped: its update is
        discarded whole), and the step's numbers into the log."""
        self._n_steps += 1
        if self._step_aux is not None:  # on the device: read back only when logged
            per_step = self._step_aux / self._micro
            self._aux_sum = per_step if self._aux_sum is None else self._aux_sum + per_step
        for index, router, _, bias in self.layers:
            load = self._step_load.get(index)
            if load is None:
                continue
            self._load[index] = self._load.get(index, 0) + load
            if applied and bias is not None and self.bias_rate > 0:
                buf = getattr(router, bias)
                with torch.no_grad():
                    buf += self.bias_rate * torch.sign(load.mean() - load).to(buf)
        self._masks = []

    def reset_log(self) -> None:
        self._n_steps = 0
        self._aux_sum = None
        self._load: dict[int, torch.Tensor] = {}

    def log_values(self, across=None) -> dict:
        """Since the last call: mean aux and z values per step (as in the loss, unweighted), each layer's
        tokens per expert and the worst max/mean load. `across`: pipeline stages, which hold other layers."""
        import torch.distributed as dist

        n_experts = self.layers[0][2].num_experts if self.layers else 0
        device = self._device or torch.device("cpu")
        load = torch.zeros(self.num_layers, n_experts, device=device)
        for index, counts in self._load.items():
            load[index] = counts
        aux_sum = self._aux_sum if self._aux_sum is not None else torch.zeros(2, device=device)
        values = torch.cat([aux_sum.float(), load.reshape(-1)])
        if across is not None:
            dist.all_reduce(values, group=across)
        values = values.cpu()
        steps = max(self._n_steps, 1)
        aux, z = (values[:2] / steps / self.num_layers).tolist()
        load = values[2:].view(self.num_layers, n_experts)
        imbalance = (load.max(1).values / load.mean(1).clamp(min=1e-9)).tolist()
        worst = max(range(self.num_layers), key=lambda i: imbalance[i])
        self.reset_log()
        out = {"moe_load_max_over_mean": round(imbalance[worst], 4), "moe_worst_layer": self.labels[worst],
               "moe_tokens_per_expert": [[int(c) for c in row] for row in load.tolist()]}
        if self.aux_coef:
            out["aux_loss"] = aux
        if self.z_coef:
            out["z_loss"] = z
        return out

    def weighted_step_value(self) -> torch.Tensor:
        """This stage's share of the step's router loss as the loss logs it (weighted, mean over layers
        of the whole model and micro-batches), on the host."""
        if self._step_aux is None:
            return torch.zeros(())
        aux = self.aux_coef * self._step_aux[0] + self.z_coef * self._step_aux[1]
        return aux / self._micro / self.num_layers

    # ---- hooks
    def _router_hook(self, index: int):
        def hook(module, args, output):
            logits = output[0] if isinstance(output, (tuple, list)) else output
            self._logits[index] = logits
        return hook

    def _experts_hook(self, index: int):
        def hook(module, args, kwargs, output):
            logits = self._logits.pop(index, None)
            if not torch.is_grad_enabled() or not self._masks or logits is None or in_shape_only_forward():
                return output  # evaluation, generation, a pipeline's shape inference: not a training forward
            top_k = args[1] if len(args) > 1 else kwargs.get("top_k_index", kwargs.get("router_indices"))
            recompute = torch._C._current_graph_task_id() != -1  # a checkpointed block re-running in backward
            counter = self._recomputes if recompute else self._calls
            call = counter.get(index, 0)
            counter[index] = call + 1
            mask = self._masks[min(call, len(self._masks) - 1)].reshape(-1).to(logits.device)
            share = self._share(index, call, logits, top_k, mask, record=not recompute)
            if share is None:
                return output
            return _AddGrad.apply(output, share, self._scale)
        return hook

    def _share(self, index: int, call: int, logits: torch.Tensor, top_k: torch.Tensor, mask: torch.Tensor,
               record: bool) -> Optional[torch.Tensor]:
        import torch.distributed as dist

        n = logits.shape[-1]
        logits = logits.reshape(-1, n).float()
        self._device = logits.device
        if mask.shape[0] != logits.shape[0]:
            raise RuntimeError(f"MoE layer {index}: {logits.shape[0]} routed tokens but {mask.shape[0]} mask rows")
        m = mask.to(logits.dtype)
        # this rank's sums over its real rows, computed once: their values feed the global statistics, and
        # (with gradients) its share of the losses
        probs_sum = torch.softmax(logits, -1).mul(m[:, None]).sum(0)
        lse2 = (torch.logsumexp(logits, -1).pow(2) * m).sum().reshape(1)
        key = (index, call)
        if key not in self._cache:  # global counts (tokens per expert), rows and sums, not differentiable
            chosen = top_k.reshape(mask.shape[0], -1)[mask].reshape(-1)
            stats = torch.cat([torch.bincount(chosen, minlength=n).to(logits.dtype), m.sum().reshape(1),
                               probs_sum.detach(), lse2.detach()])
            if self.group is not None:
                dist.all_reduce(stats, group=self.group)
            self._cache[key] = stats
        stats = self._cache[key]
        counts, rows = stats[:n], stats[n].clamp(min=1.0)
        if record:
            p_global, lse2_global = stats[n + 1 : 2 * n + 1], stats[2 * n + 1]
            aux_value = n * ((counts / rows) * (p_global / rows)).sum()
            values = torch.stack([aux_value, lse2_global / rows]).detach()  # stays on the device: no sync
            self._step_aux = values if self._step_aux is None else self._step_aux + values
            self._step_load[index] = self._step_load.get(index, 0) + counts.detach()
        if not (self.aux_coef or self.z_coef) or not logits.requires_grad:
            return None
        share = self.aux_coef * n * ((counts / rows) * probs_sum / rows).sum() if self.aux_coef else logits.new_zeros(())
        if self.z_coef:
            share = share + self.z_coef * lse2[0] / rows
        return share
