"""Where a model keeps its routed experts, found from what transformers marks, not from model names.

transformers 5 keeps each MoE layer's routed experts in one module whose parameters are stacked over the
experts (`gate_up_proj [E, 2I, H]`, `down_proj [E, H, I]`, biases `[E, ...]`); the class is decorated with
`use_experts_implementation`, which gives it `_is_expert_parallel` and dispatches its forward
`(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]` to the implementation in
`config._experts_implementation` (eager loop, batched_mm, grouped_mm). Shared experts are ordinary MLPs.
"""

from __future__ import annotations

from torch import nn

# config keys transformers' MoE configs use for the number of routed experts
_EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def experts_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every module holding one layer's routed experts as stacked parameters."""
    found = []
    for name, module in model.named_modules():
        n = getattr(module, "num_experts", None)
        params = list(module.parameters(recurse=False))
        if (hasattr(module, "_is_expert_parallel") and isinstance(n, int) and params
                and all(p.dim() >= 2 and p.shape[0] == n for p in params)):
            found.append((name, module))
    return found


def num_routed_experts(hf_config) -> int | None:
    """The number of routed experts a config declares, or None for a dense model."""
    for key in _EXPERT_COUNT_KEYS:
        n = getattr(hf_config, key, None)
        if isinstance(n, int) and n > 1:
            return n
    return None
