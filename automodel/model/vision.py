"""Image-text models (transformers' `AutoModelForImageTextToText`: Gemma 3, LLaVA, Qwen2.5-VL, ...): which
configs are one, and their processors.

A config is an image-text model when transformers maps its class to an image-text-to-text model and it has a
vision sub-config; nothing else is set by the user. The processor (tokenizer + image processor + chat template)
comes from the model's folder (or model.tokenizer); without torchvision transformers uses its PIL image
processors, which need nothing more.
"""

from __future__ import annotations

import os

from automodel.errors import UserError


def is_image_text(hf_config) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return (getattr(hf_config, "vision_config", None) is not None
            and getattr(hf_config, "model_type", None) in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)


def auto_class(hf_config):
    """The transformers auto class that builds this config's model with its training head."""
    if is_image_text(hf_config):
        from transformers import AutoModelForImageTextToText

        return AutoModelForImageTextToText
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM


def load_processor(source: str, revision, trust_remote_code: bool, label: str):
    """The folder's (or hub id's) processor; one line when it has none or it cannot be built here."""
    import warnings

    from transformers import AutoProcessor

    try:
        with warnings.catch_warnings():  # "requires torchvision ... falling back to the PIL processor": intended
            warnings.simplefilter("ignore")
            processor = AutoProcessor.from_pretrained(os.path.expanduser(source), revision=revision,
                                                      trust_remote_code=trust_remote_code)
    except ImportError as e:  # e.g. a video processor that needs torchvision
        said = " ".join(str(e).split()).split(". ")[0][:160]
        fix = ("install it with python -m automodel.install_torchvision (it takes the build that matches your torch)"
               if "torchvision" in said.lower() else "pip install the package it names")
        raise UserError(f"{label}: its processor needs a package that is not installed ({said}); {fix}") from None
    except (OSError, ValueError, TypeError) as e:
        raise UserError(f"{label}: cannot load its processor ({' '.join(str(e).split())[:200]}); an image-text model "
                        "needs the processor files save_pretrained writes (processor_config.json or "
                        "preprocessor_config.json, the tokenizer)") from None
    if not hasattr(processor, "image_processor") or not hasattr(processor, "tokenizer"):
        raise UserError(f"{label}: its processor ({type(processor).__name__}) has no image processor; an image-text "
                        "model needs one (save the model's processor with it)")
    return processor


PARTS = ("vision", "projector", "language")


def parts(model, hf_config) -> dict[str, list]:
    """{part: [(name, parameter)]}: `vision`, the model built from the vision sub-config; `language`, the one built
    from the text sub-config plus the output head; `projector`, what maps vision features into the language model:
    the modules outside both (LLaVA's and Gemma 3's multi-modal projector) and, where the vision model holds its
    own projection (Qwen2.5-VL's and Qwen3-VL's mergers), its children that end in the language model's width."""
    from automodel.modules import sub_models

    owner = {name: "language" for name, _ in sub_models(model, hf_config.get_text_config())}
    for name, module in sub_models(model, hf_config.vision_config):
        owner[name] = "vision"
        owner.update({f"{name}.{child}": "projector" for child in _projections(module, hf_config)})
    head = model.get_output_embeddings()
    head_ids = {id(p) for p in head.parameters()} if head is not None else set()
    out = {part: [] for part in PARTS}
    for name, param in model.named_parameters():
        # the longest prefix decides: a projection inside the vision model is the projector's, not the tower's
        prefix = max((p for p in owner if name.startswith(p + ".")), key=len, default=None)
        kind = owner[prefix] if prefix else None
        out[kind or ("language" if id(param) in head_ids else "projector")].append((name, param))
    return out


def _projections(vision_model, hf_config) -> list[str]:
    """The vision model's children whose last linear layer outputs the language model's width: its projection into
    the language model. None when the two widths are equal (the tower's own layers would look the same)."""
    import torch

    width = getattr(hf_config.get_text_config(), "hidden_size", None)
    if width is None or getattr(hf_config.vision_config, "hidden_size", None) == width:
        return []
    found = []
    for child_name, child in vision_model.named_children():
        linears = [m for m in child.modules() if isinstance(m, torch.nn.Linear)]
        if linears and linears[-1].out_features == width:
            found.append(child_name)
    return found


def freeze(model, hf_config, which: list[str]) -> None:
    """Stop gradients for the parts named (parameters keep requires_grad=False; peft adapts none of them)."""
    for part, params in parts(model, hf_config).items():
        if part in which:
            for _, param in params:
                param.requires_grad_(False)


def check_freeze(which, model_name: str, image_text: bool) -> None:
    unknown = [w for w in which if w not in PARTS]
    if unknown:
        raise UserError(f"model.freeze: '{unknown[0]}' is not a part of an image-text model; choose from "
                        f"{', '.join(PARTS)}")
    if which and not image_text:
        raise UserError(f"model.freeze={list(which)}: {model_name} is a text model; model.freeze picks what trains "
                        "in an image-text model (use peft for a text model)")
    if set(PARTS) <= set(which):
        raise UserError(f"model.freeze={list(which)} freezes every part: nothing would train")
