"""Tiny random image-text checkpoints (model + processor), written as their hub folders are: Gemma 3 and LLaVA.

Each folder holds config.json, model.safetensors (fp32, fixed seed), the tokenizer under its family's class with
its image tokens, the image processor (the PIL one: no torchvision here) and a chat template in the family's
style. Images are 32x32; the vision towers are 2 layers of width 32. Qwen2.5-VL / Qwen3-VL are not here: their
processors need a video processor, which needs torchvision, and this machine has no CPU build of it for its torch.
"""

from __future__ import annotations

import json
import os

import model_zoo as mz

SEED = 4321
TEXT = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
            vocab_size=1024, max_position_embeddings=512)
VISION = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2, image_size=32,
              patch_size=8)

GEMMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<start_of_image>{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
# the generation prompt ends without a space ("ASSISTANT:"), as LLaVA's own: the answer's first token carries it
LLAVA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'].upper() }}: "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>\n{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %}{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}")


def _gemma3(folder: str, text: dict, vision: dict):
    from transformers import AutoConfig, Gemma3ImageProcessorPil, Gemma3Processor

    tok = mz.make_tokenizer(("GemmaTokenizerFast", "sentencepiece", dict(
        pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>", mask_token="<mask>",
        add_bos_token=True, additional_special_tokens=["<start_of_turn>", "<end_of_turn>"],
        extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                              "image_token": "<image_soft_token>"})))
    boi, eoi, image = tok.convert_tokens_to_ids(["<start_of_image>", "<end_of_image>", "<image_soft_token>"])
    config = AutoConfig.for_model(
        "gemma3", text_config=dict(text, head_dim=16, query_pre_attn_scalar=16, sliding_window=16),
        vision_config=vision, mm_tokens_per_image=4, boi_token_index=boi, eoi_token_index=eoi,
        image_token_index=image, tie_word_embeddings=True)
    processor = Gemma3Processor(image_processor=Gemma3ImageProcessorPil(size={"height": 32, "width": 32}),
                                tokenizer=tok, chat_template=GEMMA3_TEMPLATE, image_seq_length=4)
    return config, processor


def _llava(folder: str, text: dict, vision: dict):
    from transformers import AutoConfig, CLIPImageProcessorPil, LlavaProcessor

    tok = mz.make_tokenizer(("LlamaTokenizerFast", "sentencepiece", dict(
        unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<unk>", add_bos_token=True,
        extra_special_tokens={"image_token": "<image>"})))
    image = tok.convert_tokens_to_ids("<image>")
    config = AutoConfig.for_model("llava", text_config=dict(text, model_type="llama"),
                                  vision_config=dict(vision, model_type="clip_vision_model", projection_dim=32),
                                  image_token_index=image, vision_feature_layer=-1, projector_hidden_act="gelu",
                                  tie_word_embeddings=False)
    processor = LlavaProcessor(image_processor=CLIPImageProcessorPil(size={"shortest_edge": 32},
                                                                     crop_size={"height": 32, "width": 32}),
                               tokenizer=tok, chat_template=LLAVA_TEMPLATE, patch_size=8,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1)
    return config, processor


FAMILIES = {"gemma3": _gemma3, "llava": _llava}


def build(root: str, family: str, text: dict | None = None, vision: dict | None = None, name: str | None = None) -> str:
    """The folder of one family's tiny checkpoint under `root` (written once); `text`/`vision` override sizes."""
    import torch
    from transformers import AutoModelForImageTextToText
    from transformers.utils import logging as hf_logging

    folder = os.path.join(root, name or f"vlm_{family}")
    if os.path.isfile(os.path.join(folder, ".complete")):
        return folder
    hf_logging.disable_progress_bar()
    config, processor = FAMILIES[family](folder, {**TEXT, **(text or {})}, {**VISION, **(vision or {})})
    torch.manual_seed(SEED)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    with open(os.path.join(folder, ".complete"), "w") as f:
        json.dump({"family": family}, f)
    return folder
