"""Model plugin `hf`: any transformers `AutoModelForCausalLM` or image-text model (`AutoModelForImageTextToText`,
see vision.py), from a local folder, a hub id, or a config.

- `path` set: config, weights and (by default) tokenizer come from that folder or hub id; `config` (a
  preset's architecture) is ignored, so `model=llama3_8b model.path=<folder>` cannot clobber the folder's.
- `path` null: random init from `config` (it must name `model_type`); presets in conf/model/ hold the
  published architecture hyper-parameters, so sizing and random-init runs work offline.

The engine builds the model on the meta device and fills only each rank's shards: from `weights()`
(the folder's safetensors, read one tensor at a time, see hf_weights.py) or by random init.

What can be checked without transformers is checked when the config is validated (before a run directory
exists): a local model.path must be a model folder, and one that holds something else (a PEFT adapter, a
file, nothing) is named for what it is. The architecture is checked when transformers builds its config:
its strict type checks, an unknown model_type and sizes below 1 become one line naming the key.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Optional

from automodel.errors import UserError

BUNDLED_TOKENIZER = "tiny_tasks/tokenizer"


@dataclasses.dataclass
class HFModelConfig:
    path: Optional[str] = None  # local folder or hub id with weights; null = random init from `config`
    config: dict[str, Any] = dataclasses.field(default_factory=dict)  # architecture for random init (needs model_type)
    config_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)  # applied on top, in both modes
    tokenizer: Optional[str] = None  # folder or hub id; null = `path`, or the bundled tokenizer
    revision: Optional[str] = None
    trust_remote_code: bool = False  # runs code from the model repo: only for repos you trust
    attn_implementation: Optional[str] = None  # null: transformers' choice for this model (sdpa where it supports it)
    experts_implementation: Optional[str] = None  # MoE models: grouped_mm | batched_mm | eager; null: grouped_mm
    # image-text models: the parts that do not train (vision, projector, language); null: [vision]
    freeze: Optional[list[str]] = None


def _default_attention(cfg) -> str:
    """The attention transformers would pick for this model class when asked for none: sdpa where the class
    supports it (and softcapping, which only eager computes, is off), else eager."""
    from automodel.model.vision import auto_class

    try:
        cls = auto_class(cfg)._model_mapping[type(cfg)]
    except Exception:
        return "sdpa"
    softcap = getattr(cfg.get_text_config(), "attn_logit_softcapping", None)
    if not getattr(cls, "_supports_sdpa", False) or softcap:
        return "eager"
    return "sdpa"


def _is_local(path: str) -> bool:
    return os.path.isdir(os.path.expanduser(path))


def _looks_like_path(value: str) -> bool:
    """A value the user meant as a local path (a hub id is `name` or `org/name`)."""
    return value.startswith((".", "/", "~")) or value.count("/") > 1


def _hub_failure(key: str, value: str, err: Exception) -> UserError:
    if not _is_local(value) and _looks_like_path(value):
        return UserError(f"{key}='{value}' is not an existing folder")  # a path, not a hub id (org/name)
    reason = " ".join(str(err).split()).split(". ")[0][:200]
    offline = os.environ.get("HF_HUB_OFFLINE") or "connect" in reason.lower() or "offline" in reason.lower()
    where = "the Hugging Face hub is unreachable (offline?)" if offline else "the Hugging Face hub could not provide it"
    return UserError(f"{key}='{value}' is not a local folder and {where}: {reason}")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json")


def _unreadable_tokenizer(key: str, value: str, err: Exception) -> UserError:
    """One line for a local folder whose tokenizer does not load: the file that is not valid JSON (a truncated
    copy), else the loader's own words; never "not a local folder" (it is one)."""
    import json

    folder = os.path.expanduser(value)
    for name in TOKENIZER_FILES:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                json.load(f)
        except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
            return UserError(f"{key}='{value}': {name} is not valid JSON ({' '.join(str(e).split())[:200]}); the "
                             "tokenizer cannot be loaded: copy the file again or re-save it with save_pretrained")
    reason = " ".join(str(err).split())[:200] or type(err).__name__
    if isinstance(err, KeyError):
        reason = f"missing key {reason}"
    present = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(folder, n))]
    return UserError(f"{key}='{value}': the tokenizer in this folder could not be loaded ({reason}); its tokenizer "
                     f"files: {', '.join(present) or 'none'} (set model.tokenizer to a folder or hub id that has one)")


class HFModel:
    Config = HFModelConfig

    def __init__(self, config: HFModelConfig):
        self.cfg = config
        if not config.path and not config.config.get("model_type"):
            raise UserError("model: set model.path (a folder or hub id) or model.config.model_type (random init)")
        if config.path:
            _check_model_folder(config.path)
        if config.tokenizer and _looks_like_path(config.tokenizer) and not _is_local(config.tokenizer):
            raise UserError(f"model.tokenizer='{config.tokenizer}' is not an existing folder; give a tokenizer folder "
                            "(what save_pretrained writes), a hub id, or null (model.path's own tokenizer)")

    @property
    def name(self) -> str:
        return self.cfg.path or f"random-init {self.cfg.config.get('model_type')}"

    @functools.cache
    def hf_config(self):
        from transformers import AutoConfig

        from huggingface_hub.errors import StrictDataclassError

        if self.cfg.path:
            try:
                cfg = AutoConfig.from_pretrained(
                    os.path.expanduser(self.cfg.path), revision=self.cfg.revision,
                    trust_remote_code=self.cfg.trust_remote_code,
                )
            except (OSError, ValueError) as e:
                raise _config_failure(self.cfg, e) from None
            except StrictDataclassError as e:
                raise UserError(_strict_line(e, f"model.path='{self.cfg.path}': config.json")) from None
        else:
            overrides = dict(self.cfg.config)
            model_type = overrides.pop("model_type")
            if not _known_model_type(model_type):
                raise UserError(
                    f"model.config.model_type='{model_type}' is not a transformers model type (e.g. llama, qwen2, "
                    "qwen3, mistral, gemma2, phi3)"
                )
            try:
                cfg = AutoConfig.for_model(model_type, **overrides)
            except (ValueError, TypeError, StrictDataclassError) as e:
                raise UserError(_strict_line(e, "model.config", overrides)) from None
        for key, value in self.cfg.config_overrides.items():
            try:
                setattr(cfg, key, value)
            except (ValueError, TypeError, StrictDataclassError) as e:
                raise UserError(_strict_line(e, "model.config_overrides", self.cfg.config_overrides)) from None
        _check_sizes(cfg, self.cfg)
        # training never uses the KV cache; leaving it on also hides packed sequences, and an image-text model's
        # language model reads its own sub-config's (with it on, activation checkpointing's recompute appends to
        # the cache the forward filled)
        cfg.use_cache = False
        cfg.get_text_config().use_cache = False
        cfg._attn_implementation = self.cfg.attn_implementation or _default_attention(cfg)
        if self.cfg.experts_implementation is not None:
            from automodel.moe.experts import num_routed_experts

            choices = ("grouped_mm", "batched_mm", "eager")
            if self.cfg.experts_implementation not in choices:
                raise UserError(f"model.experts_implementation={self.cfg.experts_implementation!r}: choose one of "
                                f"{', '.join(choices)} (null: grouped_mm)")
            if num_routed_experts(cfg) is None:
                raise UserError(f"model.experts_implementation={self.cfg.experts_implementation!r}: "
                                f"{getattr(cfg, 'model_type', 'the model')} has no routed experts; leave it null")
            cfg._experts_implementation = self.cfg.experts_implementation
        return cfg

    def weights_folder(self) -> Optional[str]:
        """The local folder holding model.path's safetensors (a hub id resolves to its local cache, downloading
        the weights when the hub is reachable); None for random init."""
        if not self.cfg.path:
            return None
        path = os.path.expanduser(self.cfg.path)
        if _is_local(path):
            return path
        from huggingface_hub import snapshot_download

        patterns = ["*.safetensors", "*.safetensors.index.json", "*.json"]
        try:
            return snapshot_download(self.cfg.path, revision=self.cfg.revision, allow_patterns=patterns,
                                     local_files_only=True)
        except Exception:
            pass
        try:
            return snapshot_download(self.cfg.path, revision=self.cfg.revision, allow_patterns=patterns)
        except Exception as e:
            raise _hub_failure("model.path", self.cfg.path, e) from None

    def weights(self, skeleton):
        """model.path's weights under `skeleton`'s in-memory names (see hf_weights.HFWeights); None for random init."""
        folder = self.weights_folder()
        if folder is None:
            return None
        from automodel.model.hf_weights import HFWeights

        return HFWeights(folder, skeleton, label=self.cfg.path)

    @functools.cache
    def tokenizer(self):
        from transformers import AutoTokenizer

        from automodel.config import RESOURCES

        if self.processor() is not None:  # an image-text model: its processor's tokenizer
            tok = self.processor().tokenizer
        else:
            source = self.cfg.tokenizer or self.cfg.path or str(RESOURCES / BUNDLED_TOKENIZER)
            try:
                tok = AutoTokenizer.from_pretrained(
                    os.path.expanduser(source), revision=self.cfg.revision if source == self.cfg.path else None,
                    trust_remote_code=self.cfg.trust_remote_code,
                )
            except Exception as e:  # transformers/tokenizers raise OSError, ValueError, KeyError, ... for a bad file
                key = "model.tokenizer" if self.cfg.tokenizer else "model.path"
                if _is_local(source):  # a folder here: what is wrong is in it, not on the hub
                    raise _unreadable_tokenizer(key, source, e) from None
                if isinstance(e, (OSError, ValueError)):
                    raise _hub_failure(key, source, e) from None
                raise
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return tok

    @functools.cache
    def processor(self):
        """An image-text model's processor (tokenizer, image processor, chat template); None for a text model."""
        from automodel.model import vision

        if not vision.is_image_text(self.hf_config()):
            return None
        source = self.cfg.tokenizer or self.cfg.path
        if not source:
            raise UserError(f"model {self.name} is an image-text model: random init needs model.tokenizer naming a "
                            "folder with its processor (what a processor's save_pretrained writes)")
        return vision.load_processor(source, self.cfg.revision if source == self.cfg.path else None,
                                     self.cfg.trust_remote_code, f"model.{'tokenizer' if self.cfg.tokenizer else 'path'}"
                                     f"='{source}'")

    def build(self, device="cpu"):
        import torch

        from automodel.model import vision

        cfg = self.hf_config()
        image_text = vision.is_image_text(cfg)
        AutoModel = vision.auto_class(cfg)  # AutoModelForCausalLM, or AutoModelForImageTextToText
        if str(device) == "meta" or not self.cfg.path:
            try:
                with torch.device(device):
                    model = AutoModel.from_config(
                        cfg, dtype=torch.float32, trust_remote_code=self.cfg.trust_remote_code
                    )
            except ValueError as e:
                if "attn_implementation" not in str(e):
                    raise
                raise UserError(f"model.attn_implementation={self.cfg.attn_implementation!r} is not supported "
                                f"here; use null (the best this model supports), sdpa or eager "
                                f"({' '.join(str(e).split())[:300]})") from None
        else:
            try:
                model = AutoModel.from_pretrained(
                    os.path.expanduser(self.cfg.path), config=cfg, revision=self.cfg.revision,
                    dtype=torch.float32, trust_remote_code=self.cfg.trust_remote_code,
                ).to(device)
            except OSError as e:
                raise _hub_failure("model.path", self.cfg.path, e) from None
        if self.cfg.tokenizer or self.cfg.path or not image_text:  # else there is no processor to check against
            self._check_vocab(model)
        which = self.cfg.freeze if self.cfg.freeze is not None else (["vision"] if image_text else [])
        vision.check_freeze(which, self.name, image_text)
        if which:
            vision.freeze(model, cfg, which)
        return model

    def _check_vocab(self, model) -> None:
        tok = self.tokenizer()
        rows = model.get_input_embeddings().weight.shape[0]
        if len(tok) > rows:
            own = self.cfg.path and (self.cfg.tokenizer in (None, self.cfg.path))
            if own:  # the folder's own tokenizer: it (or its class) adds tokens the embeddings lack
                added = len(tok) - tok.vocab_size
                why = (f" ({added} added by {type(tok).__name__} on top of its {tok.vocab_size}-token vocabulary)"
                       if added > 0 else "")
                raise UserError(
                    f"model.path='{self.cfg.path}' has {rows} token embeddings but its own tokenizer has {len(tok)} "
                    f"tokens{why}; the checkpoint's embeddings are too small for its tokenizer: resize them "
                    f"(model.config_overrides.vocab_size >= {len(tok)} needs new weights) or give a tokenizer that "
                    "fits (model.tokenizer)")
            raise UserError(
                f"model has {rows} token embeddings but the tokenizer has {len(tok)} tokens; use the "
                "model's own tokenizer (model.tokenizer) or set model.config.vocab_size >= the tokenizer size"
            )


# sizes every architecture that has them needs at least 1 of (transformers builds a model without layers)
SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
         "num_key_value_heads", "head_dim", "max_position_embeddings")


def _known_model_type(model_type: str) -> bool:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return model_type in CONFIG_MAPPING


def _check_model_folder(path: str) -> None:
    """A local model.path must hold config.json; refuse, naming what the folder holds instead, before any load."""
    full = os.path.expanduser(path)
    if os.path.isfile(full):
        raise UserError(f"model.path='{path}' is a file; give the folder that holds config.json and the "
                        "*.safetensors weights (what save_pretrained writes), or a hub id")
    if not os.path.isdir(full):
        if _looks_like_path(path):
            raise UserError(f"model.path='{path}' is not an existing folder; give a model folder or a hub id "
                            "(org/name)")
        return  # a hub id: resolved (or refused) when the config is loaded
    if os.path.isfile(os.path.join(full, "config.json")):
        return
    if os.path.isfile(os.path.join(full, "adapter_config.json")):
        base = _adapter_base(full)
        named = f" '{base}' (named in its adapter_config.json)" if base else ""
        raise UserError(f"model.path='{path}' holds a PEFT adapter (adapter_config.json), not a model: set model.path "
                        f"to its base model{named} and add peft=lora to train an adapter on it, or point model.path "
                        "at a merged model (a run's final/ folder holds one next to its adapter/)")
    held = sorted(os.listdir(full))
    more = ", ..." if held[4:] else ""
    what = f"has no config.json (it holds {', '.join(held[:4])}{more})" if held else "is empty"
    raise UserError(f"model.path='{path}' {what}; give a model folder (config.json and *.safetensors, as "
                    "save_pretrained writes them) or a hub id")


def _adapter_base(folder: str) -> str | None:
    import json

    try:
        with open(os.path.join(folder, "adapter_config.json"), encoding="utf-8") as f:
            return json.load(f).get("base_model_name_or_path") or None
    except (OSError, ValueError, AttributeError):
        return None


def _config_failure(cfg: HFModelConfig, err: Exception) -> UserError:
    """Why transformers could not read model.path's config, in the words a user can act on."""
    import json

    folder = os.path.expanduser(cfg.path)
    if not _is_local(folder):
        return _hub_failure("model.path", cfg.path, err)
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError) as e:
        return UserError(f"model.path='{cfg.path}': config.json is not valid JSON ({' '.join(str(e).split())[:120]})")
    raw = raw if isinstance(raw, dict) else {}
    model_type = raw.get("model_type")
    if raw.get("auto_map") and not cfg.trust_remote_code:
        return UserError(f"model.path='{cfg.path}' ships its own model code (auto_map in config.json); set "
                         "model.trust_remote_code=true to run it (only for folders you trust)")
    if not model_type:
        return UserError(f"model.path='{cfg.path}': config.json names no model_type; it is not a transformers model "
                         "config (e.g. model_type: llama)")
    if not _known_model_type(model_type):
        import transformers

        return UserError(f"model.path='{cfg.path}': config.json has model_type '{model_type}', which transformers "
                         f"{transformers.__version__} does not know; upgrade transformers, or set "
                         "model.trust_remote_code=true if the folder ships its own model code")
    return UserError(f"model.path='{cfg.path}': cannot read its config ({' '.join(str(err).split())[:200]})")


def _strict_line(err: Exception, where: str, given: dict | None = None) -> str:
    """transformers' config checks (huggingface_hub strict dataclasses) as one line: 'where.key=value: wrong type,
    expected T' for a value the user gave, else 'where: <transformers' reason>'."""
    import re

    text = " ".join(str(err).split())
    m = re.search(r"Field '(\w+)' expected (.+?), got", text)
    if m and given is not None and m.group(1) in given:
        return f"{where}.{m.group(1)}={given[m.group(1)]!r}: wrong type, expected {m.group(2)}"
    m = re.search(r"(?:TypeError|ValueError): (.*)$", text)
    return f"{where}: {(m.group(1) if m else text)[:300]}"


def _check_sizes(hf_cfg, cfg: HFModelConfig) -> None:
    for key in SIZES:
        value = getattr(hf_cfg, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value < 1:
            where = ("model.config_overrides" if key in cfg.config_overrides else
                     f"model.path='{cfg.path}' config.json" if cfg.path else "model.config")
            raise UserError(f"{where}: {key}={value} must be at least 1")
