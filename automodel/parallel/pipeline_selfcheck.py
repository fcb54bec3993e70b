"""The pipeline's set-up self-check: a small twin of the model, cut into stages by the very code that cuts the real
one (`pipeline._stages`), must compute the whole twin's logits, or the layout is refused in one line. No rank may
hold the whole real model, so the twin stands in for it: same architecture and settings, small widths.
"""

from __future__ import annotations

import copy
import logging

import torch

from automodel.errors import UserError
from automodel.parallel.pipeline import _stages

log = logging.getLogger(__name__)


def _twin_config(config, num_layers: int):
    """A small twin of `config`: one block per stage (per-layer lists cut to match), small widths where the
    config has the standard keys. Same architecture and settings otherwise (multipliers, norms, windows)."""
    twin = copy.deepcopy(config)
    layers = twin.num_hidden_layers
    for key, value in list(vars(twin).items()):  # per-layer settings, e.g. layer_types
        if isinstance(value, (list, tuple)) and len(value) == layers:
            setattr(twin, key, type(value)(value[:num_layers]))
    twin.num_hidden_layers = num_layers
    heads, hidden = getattr(twin, "num_attention_heads", None), getattr(twin, "hidden_size", None)
    if isinstance(heads, int) and isinstance(hidden, int) and heads > 0:
        head_dim = getattr(twin, "head_dim", None) or hidden // heads
        kv = getattr(twin, "num_key_value_heads", None) or heads
        group = heads // kv if heads % kv == 0 else 1  # query heads per KV head: kept
        kv = 1 if group > 1 else 2
        twin.num_attention_heads, twin.head_dim, twin.hidden_size = kv * group, head_dim, kv * group * head_dim
        if getattr(twin, "num_key_value_heads", None) is not None:
            twin.num_key_value_heads = kv
    for key, value in list(vars(twin).items()):
        if key.endswith("intermediate_size") and isinstance(value, int):
            setattr(twin, key, min(value, 64))
    experts = max(4, getattr(twin, "num_experts_per_tok", None) or 1)
    experts += -experts % (getattr(twin, "n_group", None) or 1)  # a multiple of the expert groups
    for key in ("num_local_experts", "num_experts", "n_routed_experts"):
        if isinstance(getattr(twin, key, None), int):
            setattr(twin, key, min(getattr(twin, key), experts))
    if isinstance(getattr(twin, "vocab_size", None), int):
        twin.vocab_size = min(twin.vocab_size, 256)
        if isinstance(getattr(twin, "pad_token_id", None), int) and twin.pad_token_id >= twin.vocab_size:
            twin.pad_token_id = None  # only the embedding's padding row; the forward does not read it
    if isinstance(getattr(twin, "sliding_window", None), int):
        twin.sliding_window = min(twin.sliding_window, _PROBE_LEN // 2)  # so the probe sees the window
    return twin


_PROBE_LEN = 16
SELF_CHECK_TOL = 1e-5


def check_split(hf_config, pp: int, virtual_stages: int) -> None:
    """Refuse a model whose pipeline stages would compute something else than the whole model.

    No rank may hold the whole real model, so the check runs on a small twin of it (`_twin_config`), in
    fp32 on the CPU, from a fixed seed, on one thread (every rank of a node runs it at once; the global
    RNG and thread count are left as they were): the plain forward's logits on a probe batch against
    the same model cut by `_stages` for every rank, all stages run in order in this process. The twin
    of a tiny model costs milliseconds. A twin that cannot be built or run skips the check with a warning."""
    layout = f"parallel.pp={pp} x pp_virtual_stages={virtual_stages}"
    name = getattr(hf_config, "_name_or_path", "") or getattr(hf_config, "model_type", type(hf_config).__name__)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(0)
            arch, diff = _twin_diff(hf_config, pp, virtual_stages)
    except UserError:
        raise
    except Exception as e:
        log.warning("pipeline self-check skipped for %s under %s: a small twin of the model could not be built or "
                    "run (%s: %s)", name, layout, type(e).__name__, " ".join(str(e).split())[:300])
        return
    finally:
        torch.set_num_threads(threads)
    if not diff <= SELF_CHECK_TOL:  # NaN too
        raise UserError(f"{layout}: the pipeline stages of {name} ({arch}) compute logits that differ from the whole "
                        f"model's by {diff:.1e} (> {SELF_CHECK_TOL:.0e}) on a small twin of it; training would be "
                        "wrong without a word; use a layout without pp")
    log.info("pipeline self-check: %d stages of a small twin of %s match the whole model (max logit diff %.1e)",
             pp * virtual_stages, name, diff)


def _twin_diff(hf_config, pp: int, virtual_stages: int) -> tuple[str, float]:
    """(the twin's class name, max |logits of its stages run in order - logits of the whole twin|)."""
    from transformers import AutoModelForCausalLM

    def positions(n, device):
        return torch.arange(n, device=device).unsqueeze(0)

    twin = _twin_config(hf_config, pp * virtual_stages)
    attn = getattr(hf_config, "_attn_implementation", None)
    model = AutoModelForCausalLM.from_config(twin, dtype=torch.float32,
                                             attn_implementation=attn if attn in ("eager", "sdpa") else "eager").eval()
    ids = torch.randint(0, twin.vocab_size, (2, _PROBE_LEN))
    ref = model(input_ids=ids, position_ids=positions(_PROBE_LEN, ids.device), use_cache=False).logits
    stages = dict(s for rank in range(pp) for s in _stages(copy.deepcopy(model), rank, pp, virtual_stages, positions))
    x = ids
    for s in sorted(stages):
        x = stages[s](x)
    return type(model).__name__, (x - ref).abs().max().item()
