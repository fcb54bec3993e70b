"""Model FLOPs per token and accelerator peaks: what MFU (model FLOPs utilization) is made of.

FLOPs per trained token are counted on the model itself (the weightless skeleton, after peft), not from a
table of architectures, so any model is counted the same way:

- every matmul weight (each `nn.Linear`, the output head included, tied or not) does 2 FLOPs per parameter
  forward and 2 more backward for the gradient of its input; a trainable one 2 more for its own gradient
  (so full training is the familiar 6 per parameter, LoRA's frozen base 4);
- routed experts (stacked, automodel/moe/experts.py) count top-k / num_experts of their parameters: only the
  experts a token is routed to run for it;
- attention's score and value matmuls: 12 x layers x heads x head_dim x seq_len per token (forward and
  backward, the whole square as PaLM and torchtitan count it; causal kernels skip about half of it);
- embeddings (a lookup), norms and element-wise work count nothing; activation checkpointing's recompute is
  not model FLOPs.

Peaks are dense (no sparsity) tensor-core TFLOP/s per device from the vendors' data sheets, in bf16; float8
doubles them, fp32 (TF32 tensor cores) halves them. `train.peak_tflops` overrides the table (and is the only
way to get an MFU on a CPU).
"""

from __future__ import annotations

import torch
from torch import nn

# substring of torch.cuda.get_device_name() -> dense bf16 TFLOP/s; the first match wins (longer names first)
PEAK_BF16_TFLOPS = [
    ("GB200", 2500.0), ("B200", 2250.0), ("B100", 1750.0),
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("H800", 989.0), ("H20", 148.0),
    ("GH200", 989.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0),
    ("A10G", 70.0), ("A10", 125.0), ("A6000", 155.0), ("RTX 4090", 165.0), ("V100", 125.0),
    ("MI300X", 1307.0), ("MI325X", 1307.0), ("MI250X", 383.0),
]
_PRECISION_FACTOR = {"fp8": 2.0, "bf16": 1.0, "fp16": 1.0, "fp32": 0.5}
_TOP_K_KEYS = ("num_experts_per_tok", "moe_k", "moe_topk", "top_k")


def flops_per_token(model: nn.Module, hf_config, seq_len: int) -> float:
    """Training FLOPs per token of `model` (meta or real: only shapes are read) at `seq_len`."""
    from automodel.moe.experts import experts_modules, num_routed_experts

    experts = {id(m) for _, m in experts_modules(model)}
    n_experts = num_routed_experts(hf_config) or 1
    top_k = next((getattr(hf_config, k) for k in _TOP_K_KEYS if isinstance(getattr(hf_config, k, None), int)), 1)
    total = 0.0
    for module in model.modules():  # a weight two modules share (a tied head) does one matmul in each
        if isinstance(module, nn.Linear) or id(module) in experts:
            share = min(top_k, n_experts) / n_experts if id(module) in experts else 1.0
            for p in module.parameters(recurse=False):
                total += p.numel() * share * (6 if p.requires_grad else 4)
    return total + attention_flops_per_token(hf_config, seq_len)


def attention_flops_per_token(hf_config, seq_len: int) -> float:
    text = getattr(hf_config, "text_config", None) or hf_config
    layers = getattr(text, "num_hidden_layers", 0) or 0
    heads = getattr(text, "num_attention_heads", 0) or 0
    head_dim = getattr(text, "head_dim", None) or (getattr(text, "hidden_size", 0) // max(heads, 1))
    return 12.0 * layers * heads * head_dim * seq_len


def peak_tflops(device: torch.device, precision: str, override: float | None = None) -> float | None:
    """This device's dense peak for the precision trained in, or None where it is unknown (a CPU)."""
    if override:
        return float(override)
    if device.type != "cuda":
        return None
    return peak_of(torch.cuda.get_device_name(device), precision)


def peak_of(device_name: str, precision: str) -> float | None:
    """The table's dense peak for a device name as CUDA reports it (e.g. 'NVIDIA H100 80GB HBM3')."""
    bf16 = next((tf for key, tf in PEAK_BF16_TFLOPS if key in device_name), None)
    return bf16 * _PRECISION_FACTOR.get(precision, 1.0) if bf16 else None
