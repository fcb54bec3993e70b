"""Pretrained HF weights straight into shards: a model laid out on the meta device is materialized and
filled from a safetensors folder, each rank reading only the slices its own shards hold (DCP's
HuggingFaceStorageReader)."""

from __future__ import annotations

import logging
import time

from automodel.errors import UserError

log = logging.getLogger("automodel")


def load_into_shards(model, folder: str, device) -> None:
    """Collective: materialize `model` (on meta) on `device` and fill it from the HF folder `folder`."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    t0 = time.perf_counter()
    fresh = _computed_buffers(model, device)  # non-persistent buffers (rotary inv_freq): computed, never stored
    model.to_empty(device=device)
    with torch.no_grad():
        for (module, name), value in fresh.items():
            getattr(module, name).copy_(value)
    state = get_model_state_dict(model)
    reader = dcp.HuggingFaceStorageReader(path=folder)
    stored = set(reader.read_metadata().state_dict_metadata)
    tied = _tied_names(model)
    missing = [k for k in state if k not in stored and k not in tied]
    if missing:
        raise UserError(f"model.path='{folder}' has no tensor '{missing[0]}' ({len(missing)} missing); it does not "
                        "hold this architecture's weights")
    state = {k: v for k, v in state.items() if k in stored}
    try:
        dcp.load(state, storage_reader=reader)
    except Exception as e:
        first = " ".join(str(e).split())[:300] or type(e).__name__
        raise UserError(f"cannot read the weights in model.path='{folder}': {first}") from None
    log.info("loaded %s straight into this rank's shards in %.1fs", folder, time.perf_counter() - t0)


def _computed_buffers(model, device) -> dict:
    """Values of every non-persistent buffer, recomputed by building its module again from its config."""
    import torch

    out = {}
    for name, module in model.named_modules():
        names = [n for n in getattr(module, "_non_persistent_buffers_set", ()) if getattr(module, n, None) is not None]
        if not names:
            continue
        config = getattr(module, "config", None)
        if config is None:
            raise UserError(f"cannot load weights into shards: module '{name}' ({type(module).__name__}) has computed "
                            "buffers and no config to recompute them from")
        with torch.device(device):
            rebuilt = type(module)(config=config)
        for n in names:
            out[(module, n)] = getattr(rebuilt, n)
    return out


def _tied_names(model) -> set[str]:
    """Parameter names that share their tensor with an earlier parameter (e.g. a tied output head)."""
    seen, tied = set(), set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            tied.add(name)
        seen.add(id(param))
    return tied
