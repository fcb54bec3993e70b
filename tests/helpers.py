"""Helpers the tests share: composing configs the way the CLI does, and a micro model."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

# A 4-layer micro Llama (GQA, untied head): large enough to exercise every code path, small enough
# that a 6-step run takes well under a second.
MICRO = [
    "model.config.hidden_size=64", "model.config.intermediate_size=128", "model.config.num_attention_heads=4",
    "model.config.num_key_value_heads=2", "model.config.num_hidden_layers=4", "train.sample_prompts=0",
    "train.seq_len=48",
]
# Granite's settings on MICRO: its base model multiplies `inputs_embeds` by embedding_multiplier inside its forward
# (a pipeline stage that fed its received hidden states back in as inputs_embeds trained it wrong without a word).
GRANITE = [
    "model.config.model_type=granite", "+model.config.embedding_multiplier=12.0",
    "+model.config.residual_multiplier=0.22", "+model.config.logits_scaling=8.0",
    "+model.config.attention_multiplier=0.015625", "model.config.tie_word_embeddings=false",
]
# Every kind of dropout a decoder has (phi3: attention, residual, embedding), and LoRA's: runs that draw random
# numbers while training, so that an exact resume must restore (and nothing else may consume) the RNG state.
DROPOUT = ["model.config.model_type=phi3", "+model.config.pad_token_id=0", "+model.config.attention_dropout=0.1",
           "+model.config.resid_pdrop=0.1", "+model.config.embd_pdrop=0.1", "peft=lora", "peft.dropout=0.1",
           "optim.lr=1e-2"]


def compose(*overrides: str):
    from automodel.compose import compose as _compose

    return _compose(list(overrides))


def train(out_dir: str, *overrides: str):
    from automodel.engine.run import train as _train

    return _train(compose(*MICRO, *overrides), out_dir)


def cli(*args: str, cwd: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `python -m automodel ...` in a subprocess, as a user would from a shell."""
    full_env = {**os.environ, "AUTOMODEL_NO_PROGRESS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "automodel", *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def losses(result) -> list[float]:
    return [r["loss"] for r in result.records]


def leave_group(clean: bool) -> None:
    """End a spawned rank's process group. After a clean run every rank first waits for the others: a rank
    that tears gloo down while a peer still holds connections to it makes that peer abort at exit
    ('terminate called without an active exception', seen in about one 2-rank spawn in three).

    Even so, a rank sometimes still aborted that way in CI (once four times in one run): after the checks
    several trainings' gloo groups and threads remain for the interpreter's exit to destroy. A clean rank has
    nothing left to report (rank 0 wrote the results before this), so it exits at once, without that teardown;
    a failing one returns, so that its exception reaches mp.spawn."""
    import sys

    import torch.distributed as dist

    if clean:
        dist.barrier()
    dist.destroy_process_group()
    if clean:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def save_micro_hf_model(folder: str, *overrides: str) -> str:
    """A pretrained-model folder as transformers writes it (safetensors, config, tokenizer), from a seed."""
    import torch

    from automodel.config import validate

    plugins = validate(compose(*MICRO, *overrides)).plugins
    torch.manual_seed(1234)
    plugins["model"].build("cpu").save_pretrained(folder, safe_serialization=True)
    plugins["model"].tokenizer().save_pretrained(folder)
    return folder


def random_init_model(*overrides: str, seed: int = 42):
    """The plain HF model (no PEFT) whose weights a random-init run with train.seed=`seed` starts from."""
    from automodel.config import validate
    from automodel.engine.materialize import canonical_names, hf_init, materialize

    plugins = validate(compose(*MICRO, *overrides)).plugins
    model = plugins["model"].build("meta")
    materialize(model, canonical_names(model), "cpu", seed=seed, inits=[hf_init(model)])
    return model


EXTRAS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".venv", "extras")


def with_extras() -> None:
    """Put the optional packages scripts/setup.sh installs off the default path (torchao for precision=fp8,
    bitsandbytes for peft=qlora) on this process's path (spawned ranks inherit it). Missing: a failure, not a
    skip: CI must test them."""
    for package in ("torchao", "bitsandbytes"):
        if not os.path.isdir(os.path.join(EXTRAS, package)):
            raise AssertionError(f"{package} is not in {EXTRAS}: run scripts/setup.sh (it installs the test extras)")
    if EXTRAS not in sys.path:
        sys.path.append(EXTRAS)  # last: its wheel also ships a top-level `test` package


@contextlib.contextmanager
def extras_on_path():
    """with_extras() for a block only: later tests in this process keep the default path (transformers imports
    torchao in every run once it can find it)."""
    added = EXTRAS not in sys.path
    with_extras()
    try:
        yield
    finally:
        if added and EXTRAS in sys.path:
            sys.path.remove(EXTRAS)
