"""`automodel generate DIR PROMPT [PROMPT...]`: greedy completions from an exported HF folder.

With `--image PATH` (an image-text model's folder), each PROMPT is a question asked about the image in the model's
own chat template (the image first, as the bundled shapes data and most VLM data put it); the answer is printed.

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
    """(model, tokenizer), or (model, processor) for an image-text model's folder."""
    from transformers import AutoConfig, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from automodel.model import vision

    hf_logging.disable_progress_bar()

    _check_folder(model_dir)
    try:
        config = AutoConfig.from_pretrained(model_dir)
        model = vision.auto_class(config).from_pretrained(model_dir, config=config).eval()
        if vision.is_image_text(config):
            return model, vision.load_processor(model_dir, None, False, f"'{model_dir}'")
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


def answer(model, processor, image_path: str, question: str, max_new_tokens: int = 32) -> str:
    """The greedy answer of an image-text model to a question about one image, asked in its chat template."""
    import torch

    from automodel.images import open_image

    try:
        image = open_image(image_path)
    except Exception as e:  # PIL raises several types for a missing, corrupt or non-image file
        raise UserError(f"--image '{image_path}' cannot be read as an image ({type(e).__name__})") from None
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[text], images=[image], return_tensors="pt", add_special_tokens=False)
    tok = processor.tokenizer
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    special = set(tok.all_special_ids)  # the turn ends at the template's closing token (<end_of_turn>, </s>, ...)
    end = next((i for i, t in enumerate(new) if t in special), len(new))
    return tok.decode(new[:end])


def main(argv: list[str]) -> None:
    parser = ArgumentParser(prog="automodel generate", description=__doc__)
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="an exported HF folder, e.g. outputs/<run>/final")
    parser.add_argument("prompts", metavar="PROMPT", nargs="+")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--image", metavar="PATH", help="an image-text model: ask each PROMPT about this image")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens={args.max_new_tokens} must be at least 1")
    model, tok = load(args.model_dir)
    is_processor = hasattr(tok, "image_processor")
    if args.image and not is_processor:
        raise UserError(f"--image: '{args.model_dir}' is a text model; --image needs an image-text model's folder")
    for prompt in args.prompts:
        if args.image:
            print(f"{prompt} -> {answer(model, tok, args.image, prompt, args.max_new_tokens).strip()}")
        else:
            print(f"{prompt}{greedy(model, tok.tokenizer if is_processor else tok, prompt, args.max_new_tokens)}")
