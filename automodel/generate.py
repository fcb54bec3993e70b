"""`automodel generate DIR PROMPT [PROMPT...]`: greedy completions from an exported HF folder.

Its mistakes (a missing argument, a folder that holds no model) end as every other automodel refusal: one
line and exit code 2; argparse's usage block would be several lines.
"""

from __future__ import annotations

import argparse
import os

from automodel.errors import UserError


class ArgumentParser(argparse.ArgumentParser):
    """argparse for the subcommands, with its errors raised as one UserError line (usage appended) rather than
    printed as a usage block; --help still prints the whole help."""

    def error(self, message: str):
        usage = " ".join(self.format_usage().split()).removeprefix("usage: ")
        raise UserError(f"{self.prog}: {message} (usage: {usage})")


def load(model_dir: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    _check_folder(model_dir)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
        raise UserError(f"'{model_dir}' could not be loaded as a model: {' '.join(str(e).split())[:300]}") from None
    return model, tokenizer


def _check_folder(model_dir: str) -> None:
    if not os.path.isdir(model_dir):
        raise UserError(f"'{model_dir}' is not a folder; pass an exported model folder, e.g. outputs/<run>/final")
    if os.path.isfile(os.path.join(model_dir, "config.json")):
        return
    if os.path.isfile(os.path.join(model_dir, "adapter_config.json")):
        raise UserError(f"'{model_dir}' holds a PEFT adapter (adapter_config.json), not a model; generate from the "
                        "merged model instead (a run's final/ folder, next to its adapter/)")
    raise UserError(f"'{model_dir}' is not an exported model folder (no config.json); pass a run's final/ folder")


def greedy(model, tokenizer, prompt: str, max_new_tokens: int = 32) -> str:
    import torch

    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id] + ids
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
    return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)


def main(argv: list[str]) -> None:
    parser = ArgumentParser(prog="automodel generate", description=__doc__)
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="an exported HF folder, e.g. outputs/<run>/final")
    parser.add_argument("prompts", metavar="PROMPT", nargs="+")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens={args.max_new_tokens} must be at least 1")
    model, tok = load(args.model_dir)
    for prompt in args.prompts:
        print(f"{prompt}{greedy(model, tok, prompt, args.max_new_tokens)}")
