"""Tiny random image-text checkpoints (model + processor), written as their hub folders are: Gemma 3, LLaVA,
Qwen2.5-VL, Qwen3-VL and LLaVA-OneVision.

Each folder holds config.json, model.safetensors (fp32, fixed seed), the tokenizer under its family's class with
its image tokens, the image processor and a chat template in the family's style. Images are 32x32; the vision
towers are 2 layers of width 32. The Qwen and LLaVA-OneVision processors hold a video processor, which transformers builds
only with torchvision (`python -m automodel.install_torchvision`): without it they are not in FAMILIES.
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


def gemma3_processor(image_size: int = 32, tokens_per_image: int = 4):
    """(processor, {boi_token_index, eoi_token_index, image_token_index}): a Gemma 3 processor over the small
    sentencepiece vocabulary, at any image size (scripts/measure_memory.py rehearses gemma3_4b with 896 and 256)."""
    from transformers import Gemma3ImageProcessorPil, Gemma3Processor

    tok = mz.make_tokenizer(("GemmaTokenizerFast", "sentencepiece", dict(
        pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>", mask_token="<mask>",
        add_bos_token=True, additional_special_tokens=["<start_of_turn>", "<end_of_turn>"],
        extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                              "image_token": "<image_soft_token>"})))
    boi, eoi, image = tok.convert_tokens_to_ids(["<start_of_image>", "<end_of_image>", "<image_soft_token>"])
    processor = Gemma3Processor(
        image_processor=Gemma3ImageProcessorPil(size={"height": image_size, "width": image_size}), tokenizer=tok,
        chat_template=GEMMA3_TEMPLATE, image_seq_length=tokens_per_image)
    return processor, {"boi_token_index": boi, "eoi_token_index": eoi, "image_token_index": image}


def _gemma3(folder: str, text: dict, vision: dict):
    from transformers import AutoConfig

    processor, ids = gemma3_processor()
    config = AutoConfig.for_model(
        "gemma3", text_config=dict(text, head_dim=16, query_pre_attn_scalar=16, sliding_window=16),
        vision_config=vision, mm_tokens_per_image=4, tie_word_embeddings=True, **ids)
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


QWEN_VL_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% elif c['type'] == 'text' %}"
    "{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
QWEN_VL_SPECIALS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


def _qwen_vl(model_type: str, text: dict, vision: dict):
    """Qwen2.5-VL or Qwen3-VL: byte-level Qwen2 tokenizer, 8-pixel patches merged 2x2 (a 32x32 image is 4
    tokens), M-RoPE over the text heads' 16 dims."""
    from transformers import AutoConfig, Qwen2VLImageProcessor

    cls, base, specials = mz.QWEN_TOK
    specials = dict(specials, additional_special_tokens=[*specials["additional_special_tokens"], *QWEN_VL_SPECIALS])
    tok = mz.make_tokenizer((cls, base, specials))
    start, end, image, video = tok.convert_tokens_to_ids(QWEN_VL_SPECIALS)
    common_vision = dict(depth=vision["num_hidden_layers"], hidden_size=vision["hidden_size"],
                         intermediate_size=vision["intermediate_size"], num_heads=vision["num_attention_heads"],
                         out_hidden_size=text["hidden_size"], patch_size=vision["patch_size"], spatial_merge_size=2,
                         temporal_patch_size=2)
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    if model_type == "qwen2_5_vl":
        vision_config = dict(common_vision, window_size=32, fullatt_block_indexes=[1])
        text_config = dict(text, rope_parameters=rope)
    else:
        vision_config = dict(common_vision, num_position_embeddings=16, deepstack_visual_indexes=[0])
        text_config = dict(text, head_dim=16, rope_parameters=dict(rope, mrope_interleaved=True))
    text_config.update(bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = AutoConfig.for_model(model_type, text_config=text_config, vision_config=vision_config,
                                  image_token_id=image, video_token_id=video, vision_start_token_id=start,
                                  vision_end_token_id=end, tie_word_embeddings=False)
    import transformers

    size = {"shortest_edge": 32 * 32, "longest_edge": 32 * 32}
    image_processor = Qwen2VLImageProcessor(size=size, patch_size=vision["patch_size"], merge_size=2,
                                            temporal_patch_size=2)
    video_class = getattr(transformers, "Qwen2VLVideoProcessor" if model_type == "qwen2_5_vl" else
                          "Qwen3VLVideoProcessor")
    video_processor = video_class(size=size, patch_size=vision["patch_size"], merge_size=2, temporal_patch_size=2)
    processor_cls = getattr(transformers, "Qwen2_5_VLProcessor" if model_type == "qwen2_5_vl" else "Qwen3VLProcessor")
    processor = processor_cls(image_processor=image_processor, tokenizer=tok, video_processor=video_processor,
                              chat_template=QWEN_VL_TEMPLATE)
    return config, processor


LLAVA_OV_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>\n{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _llava_onevision(folder: str, text: dict, vision: dict):
    """LLaVA-OneVision: Qwen2 language model, SigLIP tower, any-resolution tiling (a 32x32 image is its base view
    plus one 32x32 tile, in 16-pixel patches: 4 tokens each, and a newline token per row of the tile grid)."""
    import transformers
    from transformers import AutoConfig

    cls, base, specials = mz.QWEN_TOK
    specials = dict(specials, additional_special_tokens=[*specials["additional_special_tokens"], "<image>", "<video>"])
    tok = mz.make_tokenizer((cls, base, specials))
    image, video = tok.convert_tokens_to_ids(["<image>", "<video>"])
    pinpoints = [[32, 32], [32, 64], [64, 32], [64, 64]]
    config = AutoConfig.for_model(
        "llava_onevision", text_config=dict(text, model_type="qwen2", bos_token_id=None,
                                            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(vision, patch_size=16, model_type="siglip_vision_model"), image_token_index=image,
        video_token_index=video, image_grid_pinpoints=pinpoints, vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9", tie_word_embeddings=False)
    size = {"height": 32, "width": 32}
    image_processor = transformers.LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=pinpoints)
    video_processor = transformers.LlavaOnevisionVideoProcessor(size=size)
    processor = transformers.LlavaOnevisionProcessor(
        image_processor=image_processor, tokenizer=tok, video_processor=video_processor, chat_template=LLAVA_OV_TEMPLATE,
        num_image_tokens=4, vision_feature_select_strategy="full")
    return config, processor


def torchvision_imports() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:
        return False
    return True


FAMILIES = {"gemma3": _gemma3, "llava": _llava}
NEEDS_TORCHVISION = ("qwen2_5_vl", "qwen3_vl", "llava_onevision")
WITH_TORCHVISION = {"qwen2_5_vl": lambda folder, text, vision: _qwen_vl("qwen2_5_vl", text, vision),
                    "qwen3_vl": lambda folder, text, vision: _qwen_vl("qwen3_vl", text, vision),
                    "llava_onevision": _llava_onevision}
FAMILIES.update(WITH_TORCHVISION if torchvision_imports() else {})


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
