"""`automodel generate DIR PROMPT [PROMPT...]`: greedy completions from an exported HF folder."""

from __future__ import annotations

import argparse
import os

from automodel.errors import UserError


def load(model_dir: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise UserError(f"'{model_dir}' is not an exported model folder (no config.json); pass a run's final/ folder")
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


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
    parser = argparse.ArgumentParser(prog="automodel generate", description=__doc__)
    parser.add_argument("model_dir", help="an exported HF folder, e.g. outputs/<run>/final")
    parser.add_argument("prompts", nargs="+")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    model, tok = load(args.model_dir)
    for prompt in args.prompts:
        print(f"{prompt}{greedy(model, tok, prompt, args.max_new_tokens)}")
