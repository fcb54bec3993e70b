"""End of run: gather the trained weights on rank 0 and write them as an HF folder (+ PEFT adapter)."""

from __future__ import annotations

import logging
import os

from automodel.fs import atomic_dir

log = logging.getLogger("automodel")


def export_final(model, tokenizer, plugins, out_dir: str, env, pp_group=None) -> str | None:
    """Collective: every rank takes part in gathering; rank 0 writes. Returns the folder (rank 0) or None."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar per shard for a sub-second write is noise in the run's output

    ckpt = plugins["checkpoint"]
    if not ckpt.cfg.export_final:
        return None
    final_dir = export_to(model, tokenizer, plugins, os.path.join(out_dir, ckpt.cfg.dirname), env, pp_group)
    if final_dir:
        log.info("exported the trained model to %s", final_dir)
    return final_dir


def export_to(model, tokenizer, plugins, folder: str, env, pp_group=None) -> str | None:
    """Collective: gather the full state dict on rank 0 and write `folder` there (None on other ranks).

    `pp_group`: under pipeline parallel each stage holds part of the model; the parts are gathered too."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from automodel.write_errors import agree, attempt

    if pp_group is None:
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        full = _gather_stages(model, pp_group)
    # rank 0 writes; every rank then learns how that went (a full disk ends them all with its line, none waits)
    outcome = attempt(lambda: write_hf_folder(_unaliased(full, model), tokenizer, plugins, folder), folder,
                      "write the export", "; the run's checkpoints are kept: free space, then run again with "
                      "checkpoint.resume=auto to export") if env.is_main else None
    agree(outcome)
    return folder if env.is_main else None


def _gather_stages(model, pp_group) -> dict:
    """Every stage's full tensors, merged on global rank 0 (other ranks get {})."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    part = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))  # gathered over dp/tp
    part = {k: v.detach().cpu() for k, v in part.items()}
    members = dist.get_process_group_ranks(pp_group)
    if 0 not in members:  # only the pp group of global rank 0 sends its stages there
        return {}
    parts = [None] * len(members) if dist.get_rank() == 0 else None
    dist.gather_object(part, parts, dst=0, group=pp_group)
    return {k: v for p in parts for k, v in p.items()} if parts else {}


def preprocessor(model_plugin):
    """What an export saves next to the weights: an image-text model's processor, else the tokenizer."""
    processor = model_plugin.processor() if hasattr(model_plugin, "processor") else None
    return processor or model_plugin.tokenizer()


def write_hf_folder(full: dict, tokenizer, plugins, final_dir: str) -> None:
    """One process: a full (unsharded) state dict -> an HF folder, written atomically (+ PEFT adapter).

    Shared by the end of a run and by `automodel export` (a DCP checkpoint, offline). Rank 0 alone writes, also in
    the middle of a run (checkpoint.export_every_save, train.eval_every): it runs on a fork of the torch RNG, which
    training's dropout draws from, since building the copy draws from it (peft's adapter init). Otherwise rank 0 would
    draw other dropout masks than its tp peers from then on (their replicated weights drift apart), and a run
    resumed from that save would not repeat the uninterrupted one."""
    import torch

    with torch.random.fork_rng(devices=[]):
        # A fresh, unsharded copy to write from: the trained model may be FSDP-wrapped and live on a GPU.
        plain = plugins["peft"].apply(plugins["model"].build("meta"))
        # modules' private state (Transformer Engine's fp8 scaling history) is the trainer's, not the model's
        full = {k: v for k, v in full.items() if not k.endswith("._extra_state")}
        plain.load_state_dict(full, assign=True, strict=True)
        plain.tie_weights()  # assign=True loads tied tensors separately; re-tie as the config says
        with atomic_dir(final_dir) as staging:
            plain = plugins["peft"].export(plain, full, staging)
            plugins["checkpoint"].export_final(plain.to(torch.float32), encoding_as_trained(tokenizer), staging)


def encoding_as_trained(tokenizer):
    """The tokenizer to export: one whose plain call, `tokenizer(text)`, encodes as training and `automodel
    generate` did: the bos token first (when the tokenizer has one), then the text's tokens, nothing after.

    Training puts the bos in itself and tokenizes without special tokens (data/text.py, data/pairs.py), so a
    tokenizer whose own template adds nothing (the bundled one, GPT-2's) or something else (an eos) would make
    plain transformers prompt the model differently from how it was trained, and it would answer differently.
    A copy is changed, never the run's own tokenizer. An image-text model's processor is exported as it is: its
    chat template is its encoding (`automodel generate --image` uses it that way too)."""
    import copy

    if hasattr(tokenizer, "image_processor") or _encodes_as_trained(tokenizer):
        return tokenizer
    exported = copy.deepcopy(tokenizer)
    if hasattr(type(exported), "add_bos_token") and hasattr(exported, "update_post_processor"):
        add_bos = exported.bos_token_id is not None
        exported.add_eos_token = False  # each setter rebuilds the tokenizers post-processor (saved in tokenizer.json)
        exported.add_bos_token = add_bos
        exported.init_kwargs.update(add_bos_token=add_bos, add_eos_token=False)  # and tokenizer_config.json says so
    if not _encodes_as_trained(exported):
        log.warning("the exported tokenizer (%s) cannot be made to add the bos token as training did: with plain "
                    "transformers, put tokenizer.bos_token_id before a prompt's ids yourself", type(tokenizer).__name__)
        return tokenizer
    return exported


def _encodes_as_trained(tokenizer, text: str = "a b 1") -> bool:
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    return tokenizer(text)["input_ids"] == bos + tokenizer(text, add_special_tokens=False)["input_ids"]


def _unaliased(state_dict: dict, model) -> dict:
    """Copy the tensors that share storage with the live model (an unsharded model's state dict does).

    The export loads them with assign=True and peft merges adapters in place: without the copy that
    merge would silently rewrite the trained model's own weights.
    """
    live = {t.data_ptr() for t in model.state_dict().values() if not hasattr(t, "full_tensor")}
    return {k: v.clone() if v.data_ptr() in live else v for k, v in state_dict.items()}


def show_samples(final_dir: str, samples: list[tuple[str, str]]) -> None:
    """Greedy answers of the trained model to a few held-out prompts, and a command to try your own: shell-
    quoted (a chat prompt holds newlines and quotes), so pasting it into a shell runs it as shown."""
    import shlex

    from automodel.generate import load, greedy

    if not samples:
        return
    if not os.path.isfile(os.path.join(final_dir, "config.json")):  # an adapter-only export (merge_adapter=false)
        log.info("the export in %s is a PEFT adapter (adapter/): load it onto its base model to try it", final_dir)
        return
    model, tok = load(final_dir)
    right = 0
    for prompt, expected in samples:
        got = greedy(model, tok, prompt)
        ok = got.strip() == expected.strip()
        right += ok
        log.info("  %s %r -> %r%s", "✓" if ok else "✗", prompt, got, "" if ok else f" (expected {expected!r})")
    log.info("%d/%d sample prompts answered exactly. Try your own:  %s generate %s %s", right, len(samples),
             automodel_command(), shlex.quote(final_dir), shlex.quote(samples[0][0]))


def automodel_command() -> str:
    """`automodel` as the user can run it from here: the bare name when that is this installation on PATH, else
    the running executable's path (relative when it lies inside the working folder: the Quick start installs into
    .venv/ without activating it, so `automodel` alone would not be found), else `python -m automodel`."""
    import shlex
    import shutil
    import sys

    def shortest(path: str) -> str:
        """Relative when it lies inside the working folder (not the filesystem's root), else absolute."""
        path, here = os.path.abspath(path), os.getcwd()
        if os.path.dirname(here) == here or not path.startswith(os.path.join(here, "")):
            return path
        relative = os.path.relpath(path, here)
        return relative if os.sep in relative else os.path.join(os.curdir, relative)  # a bare name: looked up on PATH

    script = sys.argv[0] if sys.argv and os.path.basename(sys.argv[0]) == "automodel" else ""
    if script and os.path.isfile(script):
        on_path = shutil.which("automodel")
        if on_path and os.path.realpath(on_path) == os.path.realpath(script):
            return "automodel"
        return shlex.quote(shortest(script))
    return f"{shlex.quote(shortest(sys.executable))} -m automodel"  # `python -m automodel`, a launcher's rank
