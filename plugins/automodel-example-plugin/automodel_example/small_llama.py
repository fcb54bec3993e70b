"""Model plugin `small_llama`: a small Llama-architecture model with typed size fields, random init.

A model plugin hands the engine three things: the transformers config (`hf_config()`, cheap), a tokenizer
(`tokenizer()`) and the model (`build(device)`), plus a `name` for the log. Training always calls
`build("meta")`: the engine lays the weightless skeleton out and fills it itself, by random init through the
model's own `_init_weights` (seeded per module, the same values on every layout) or, when the plugin has the
optional `weights(skeleton)`, from the tensors that returns. The model must be a transformers
`PreTrainedModel` for causal LM: the engine reads `.logits`, and exports with `save_pretrained`.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from automodel.errors import UserError


@dataclasses.dataclass
class SmallLlamaConfig:
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 176
    max_position_embeddings: int = 512
    tokenizer: Optional[str] = None  # a tokenizer folder or hub id (the YAML option names automodel's bundled one)


class SmallLlama:
    Config = SmallLlamaConfig

    def __init__(self, config: SmallLlamaConfig):
        if not config.tokenizer:
            raise UserError("model.tokenizer is not set; give a tokenizer folder or hub id")
        if config.hidden_size % config.num_heads or config.num_heads % config.num_kv_heads:
            raise UserError(f"model.hidden_size={config.hidden_size}, num_heads={config.num_heads}, "
                            f"num_kv_heads={config.num_kv_heads}: heads must divide hidden_size and kv heads the heads")
        self.cfg = config
        self._tokenizer = None
        self._hf_config = None

    @property
    def name(self) -> str:
        return f"small_llama {self.cfg.num_layers}x{self.cfg.hidden_size}"

    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            try:
                tok = AutoTokenizer.from_pretrained(self.cfg.tokenizer)
            except (OSError, ValueError) as e:
                reason = " ".join(str(e).split())[:200]
                raise UserError(f"model.tokenizer='{self.cfg.tokenizer}' cannot be loaded: {reason}") from None
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token
            self._tokenizer = tok
        return self._tokenizer

    def hf_config(self):
        if self._hf_config is None:
            from transformers import LlamaConfig

            c = self.cfg
            cfg = LlamaConfig(
                vocab_size=-(-len(self.tokenizer()) // 64) * 64,  # every token id fits, rounded up
                hidden_size=c.hidden_size, intermediate_size=c.intermediate_size, num_hidden_layers=c.num_layers,
                num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
                max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=False, use_cache=False,
                bos_token_id=self.tokenizer().bos_token_id, eos_token_id=self.tokenizer().eos_token_id,
                pad_token_id=self.tokenizer().pad_token_id,
            )
            cfg._attn_implementation = "sdpa"
            self._hf_config = cfg
        return self._hf_config

    def build(self, device="cpu"):
        import torch
        from transformers import AutoModelForCausalLM

        with torch.device(device):
            return AutoModelForCausalLM.from_config(self.hf_config(), dtype=torch.float32)
