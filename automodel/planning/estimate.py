"""From what a rank holds (layout.RankState) to its peak memory in one training step and the bytes it sends.

Counted exactly (from the laid-out model): parameters, gradients, optimizer state, FSDP's gathered units.
Estimated (from the model's own weights, not a table of architectures): activations, the logits and loss.

- weights as stored; gradients in the parameters' dtype for the trainable part; AdamW's two moments (fp32);
- FSDP buffers: the root unit (embeddings, final norm, head) gathered through the step, two decoder-block units
  gathered at a time (the one computing and the one prefetched), the largest unit's unsharded gradients and
  the reduce-scatter input they are copied into; in the precision plugin's parameter dtype (the gradients in
  fp32);
- activations: what one decoder block saves for backward, measured on a fake-tensor twin of the model
  (activations.py), / tp under sequence parallel, x the blocks this rank holds; activation checkpointing `full`
  keeps each block's input only, plus one block being recomputed;
  `selective` keeps the matmul outputs (about half); under pp the first stage holds pp micro-batches in flight
  (1f1b; gpipe: all of them); under cp a rank holds seq_len / cp tokens;
- logits and loss: loss=ce holds [tokens, vocab] logits, log-softmax's fp32 output, its fp32 gradient and the
  logits' gradient, 12 bytes an element (vocab / tp under loss_parallel); loss=chunked_ce only a chunk's;
- the peak: gradients (set to None after each step) and activations are not held at once (peak());
- runtime: on a CPU the plan process's own resident memory once its libraries are loaded (the trainer loads the
  same) plus what a trainer holds besides (CPU_TRAINER_EXTRA, measured); on a GPU a CUDA context and the NCCL
  and allocator reserves.
"""

from __future__ import annotations

import dataclasses

GiB = 1024**3

# GPU -> memory (GiB) a process can use; names as plan.gpu takes them
GPU_MEMORY_GIB = {"h100": 80, "h200": 141, "h20": 96, "b200": 180, "gb200": 186, "a100": 80, "a100_40gb": 40,
                  "l40s": 48, "l4": 24, "a10g": 24, "rtx4090": 24, "v100": 32, "mi300x": 192, "mi325x": 256}
GPU_RUNTIME = int(1.0 * GiB)  # CUDA context, NCCL buffers, the caching allocator's slack
# what a training process holds on a CPU beyond the plan process's own libraries: the tokenized data, the
# tokenizer, the process group, autograd's and OpenMP's threads. Measured: the default run (a 1.6M-parameter
# model, so almost nothing else) peaks at 0.66 GiB where the plan process holds 0.35 GiB.
CPU_TRAINER_EXTRA = int(0.3 * GiB)


@dataclasses.dataclass
class Step:
    """What a step of the run does on one rank (from the config and the layout)."""

    micro_batch: int
    seq_len: int
    micro_batches: int  # per optimizer step (gradient accumulation, or pipeline micro-batches)
    compute_bytes: int  # activations' dtype (2 under bf16/fp16 autocast, 4 in fp32)
    gather_bytes: int  # FSDP's all-gather dtype (the mixed-precision policy's param dtype)
    activation_checkpointing: str
    loss: str
    chunk_tokens: int | None
    loss_parallel: bool
    top_k: int
    num_experts: int
    block_bytes: int | None  # what one decoder block saves for a micro-batch, measured (activations.py); None: unknown
    dims: object  # ParallelDims
    pp_schedule: str
    optimizer_moments: int = 2


def memory(state, step: Step, runtime: int, pp_stage: int = 0) -> dict[str, int]:
    """Bytes by part, for one rank at its peak."""
    from automodel.planning.activations import weight_estimate_elements
    from automodel.planning.layout import tokens_per_rank

    d = step.dims
    weights = state.param_bytes
    grads = state.trainable * 4
    optimizer = state.trainable * 4 * step.optimizer_moments
    buffers = 0
    blocks = sorted((u for u in state.fsdp_units if u), reverse=True)
    if blocks:
        root = state.root_unit
        others = [u for u in blocks if u != root] or [0]
        # a unit's unsharded fp32 gradients are copied into the reduce-scatter's input before they are freed:
        # twice the largest unit's, at that moment (FSDP2's foreach_reduce)
        buffers = root * step.gather_bytes + 2 * others[0] * step.gather_bytes + 2 * max(others[0], root) * 4
    tokens = tokens_per_rank(step.micro_batch, step.seq_len, d.cp)
    layers = len(state.layers)
    if step.block_bytes is not None:  # measured on the unsplit twin; sequence parallel splits it over tp
        block = step.block_bytes / (d.tp if d.tp > 1 else 1)
    else:
        block = max((weight_estimate_elements(layer, state.tp_local_hidden, step.top_k, step.num_experts)
                     for layer in state.layers), default=0) * tokens * step.compute_bytes
    block_input = tokens * state.tp_local_hidden * step.compute_bytes / (d.tp if d.tp > 1 else 1)
    kept = _kept(layers, block, block_input, step.activation_checkpointing) + vision_activations(state, step)
    in_flight = 1
    if d.pp > 1:
        in_flight = step.micro_batches if step.pp_schedule == "gpipe" else min(step.micro_batches, d.pp - pp_stage)
    activations = kept * in_flight
    logits = 0
    if state.head_out_features:
        vocab = state.head_out_features // (d.tp if step.loss_parallel and d.tp > 1 else 1)
        rows = tokens if step.loss != "chunked_ce" else min(tokens, step.chunk_tokens or max(1, (256 * 2**20) // (4 * vocab)))
        logits = rows * vocab * 12  # logits, log-softmax's fp32 output, its fp32 gradient, the logits' gradient
    return {"parameters": weights, "gradients": grads, "optimizer state": optimizer, "activations": int(activations),
            "logits and loss": int(logits), "communication buffers": int(buffers), "runtime": runtime}


def _kept(layers: int, block: float, block_input: float, checkpointing: str) -> float:
    if checkpointing == "full":  # each block's input kept; one block recomputed at a time
        return layers * block_input + block
    if checkpointing == "selective":  # matmul and attention outputs kept: about half
        return layers * block / 2 + block / 2
    return layers * block


def vision_activations(state, step: Step) -> float:
    """What an image-text model's vision blocks save for backward on this rank: nothing when the tower is frozen
    (no weight of it trains and its pixels need no gradient); else, from the blocks' weights, for one image per
    sample at the tower's own resolution (the vision side is replicated over tp and cp)."""
    from automodel.planning.activations import weight_estimate_elements

    if not state.vision_layers or not state.vision_tokens:
        return 0.0
    tokens = step.micro_batch * state.vision_tokens
    block = max(weight_estimate_elements(layer, state.vision_hidden, 1, 1) for layer in state.vision_layers)
    block_bytes = block * tokens * step.compute_bytes
    return _kept(len(state.vision_layers), block_bytes, tokens * state.vision_hidden * step.compute_bytes,
                 step.activation_checkpointing)


def peak(parts: dict[str, int]) -> int:
    """The step's peak: gradients are set to None after every optimizer step and grow in backward as the
    activations are freed, so the two are not held at once; the larger of them counts."""
    held_apart = min(parts["gradients"], parts["activations"] + parts["logits and loss"])
    return sum(parts.values()) - held_apart


def communication(state, step: Step) -> dict[str, float]:
    """Bytes this rank sends in one optimizer step, by kind (ring collectives: (n - 1) / n of the buffer)."""
    from automodel.planning.layout import tokens_per_rank

    d = step.dims
    out: dict[str, float] = {}
    gathered = sum(state.fsdp_units)
    fsdp = d.dp_shard * d.cp
    if fsdp > 1 and gathered:
        ring = (fsdp - 1) / fsdp
        # forward and backward all-gathers per micro-batch (reshard after forward), one gradient reduce-scatter
        out["FSDP all-gather"] = 2 * step.micro_batches * gathered * step.gather_bytes * ring
        out["FSDP reduce-scatter"] = gathered * 4 * ring
    if d.dp_replicate > 1:
        out["HSDP all-reduce"] = 2 * state.trainable * 4 * (d.dp_replicate - 1) / d.dp_replicate
    tokens = tokens_per_rank(step.micro_batch, step.seq_len, d.cp)
    hidden = state.tp_local_hidden
    layers = len(state.layers)
    if d.tp > 1:  # sequence parallel: per block 2 all-gathers + 2 reduce-scatters forward, as many backward
        out["TP/SP"] = 8 * layers * tokens * hidden * step.compute_bytes * (d.tp - 1) / d.tp * step.micro_batches
    if d.cp > 1:  # K and V all-gathered forward, their gradients reduce-scattered backward (GQA: a fraction of h)
        out["CP K/V"] = 4 * layers * tokens * hidden * step.compute_bytes * (d.cp - 1) / d.cp * step.micro_batches / 4
    if d.pp > 1:  # activations forward and their gradients backward, at each stage boundary
        out["PP send/recv"] = 2 * tokens * hidden * step.compute_bytes * step.micro_batches / max(d.tp, 1)
    if d.ep > 1 and step.num_experts > 1:  # dispatch and combine, forward and backward
        moe = sum(1 for layer in state.layers if _has_experts(layer))
        out["EP all-to-all"] = 4 * moe * tokens * step.top_k * hidden * step.compute_bytes * (d.ep - 1) / d.ep \
            * step.micro_batches
    return out


def _has_experts(layer) -> bool:
    from automodel.moe.experts import experts_modules

    return bool(experts_modules(layer))


def suggestions(states: list, step: Step, runtime: int, capacity: int, peft: str) -> list[str]:
    """The smallest changes that would bring the most loaded rank under `capacity`, cheapest first (each re-planned
    with the same layout counts), with its new peak; a pair of them when no single one does."""
    def replan(candidate: Step, drop_training_state: bool = False) -> int:
        worst = 0
        for i, state in enumerate(states):
            part = memory(state, candidate, runtime, pp_stage=i * (step.dims.pp - 1))
            if drop_training_state:
                part["gradients"] = part["optimizer state"] = 0
            worst = max(worst, peak(part))
        return worst

    ideas: list[tuple[str, Step]] = []
    if step.activation_checkpointing != "full":
        ideas.append(("parallel.activation_checkpointing=full",
                      dataclasses.replace(step, activation_checkpointing="full")))
    if step.loss == "ce":
        ideas.append(("loss=chunked_ce", dataclasses.replace(step, loss="chunked_ce")))
    if step.micro_batch > 1:
        ideas.append((f"train.micro_batch_size={step.micro_batch // 2}",
                      dataclasses.replace(step, micro_batch=step.micro_batch // 2,
                                          block_bytes=step.block_bytes // 2 if step.block_bytes else None)))
    found = [(change, replan(c)) for change, c in ideas]
    if peft in ("none", ""):
        found.append(("peft=lora (adapters only: no gradients or optimizer state for the base)",
                      replan(step, drop_training_state=True)))
    fitting = [(change, p) for change, p in found if p <= capacity]
    if not fitting and len(ideas) >= 2:  # two changes together
        both = dataclasses.replace(ideas[1][1], activation_checkpointing=ideas[0][1].activation_checkpointing)
        if replan(both) <= capacity:
            fitting = [(f"{ideas[0][0]} and {ideas[1][0]}", replan(both))]
    return [f"{change} -> about {p / GiB:.1f} GiB" for change, p in fitting[:3]]
