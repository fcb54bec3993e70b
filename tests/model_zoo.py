"""A zoo of tiny random checkpoints of the architectures transformers ships, written as their hub folders are.

`build_zoo(root)` writes one folder per family under `root` (config.json, generation_config.json,
model.safetensors in fp32 from a fixed seed, and the tokenizer saved under the class that family's hub
checkpoints use, with that family's special tokens) and returns {family: folder}. Folders already
written from the same spec (their `.complete` marker holds its fingerprint) are kept, so a cache
directory is built once and rebuilt only where a family's spec (or transformers) changed.

Every model is tiny (hidden 64, 4 layers, vocab 1024, 4 experts for MoE) so that a 6-step run takes about
a second on a CPU. The tokenizers are built offline from the bundled tiny-tasks data:

- byte-level families (Qwen, GPT-2/NeoX style, Llama-3 style `PreTrainedTokenizerFast`, Cohere) take the
  bundled byte-level BPE (automodel/resources/tiny_tasks/tokenizer) as it is, with their own special tokens;
- SentencePiece-style families (Llama 2 / Mistral `LlamaTokenizer`, `GemmaTokenizer`) get a Metaspace BPE
  with byte fallback trained here on the same data: transformers 5 refuses a byte-level tokenizer.json
  under those classes (it loads `TokenizersBackend` instead).

`FAMILIES[name]` holds the model type, the config (on top of `COMMON`), the tokenizer and `notes`: what
the family needs of a layout (tied embeddings refuse pipeline parallel; kv heads divisible by tp ...).
"""

from __future__ import annotations

import json
import os
import shutil

SEED = 1234
VOCAB = 1024  # >= every family's tokenizer (< 700 tokens); divisible by tp=2
SP_VOCAB = 640  # trained SentencePiece-style vocabulary, byte tokens and specials included

COMMON = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
              num_hidden_layers=4, vocab_size=VOCAB, max_position_embeddings=256, tie_word_embeddings=False)

# tokenizer specs (SentencePiece-style ones list their specials in id order: 0, 1, 2, ...):
# (class name as the family's hub tokenizer_config.json spells it, base vocabulary, special tokens)
LLAMA2_TOK = ("LlamaTokenizerFast", "sentencepiece",
              dict(unk_token="<unk>", bos_token="<s>", eos_token="</s>", add_bos_token=True))
MISTRAL_TOK = LLAMA2_TOK
QWEN_TOK = ("Qwen2TokenizerFast", "byte_level",
            dict(bos_token=None, eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token=None,
                 additional_special_tokens=["<|im_start|>", "<|im_end|>"]))
GEMMA_TOK = ("GemmaTokenizerFast", "sentencepiece",
             dict(pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>", mask_token="<mask>",
                  add_bos_token=True, additional_special_tokens=["<start_of_turn>", "<end_of_turn>"]))
PHI3_TOK = ("LlamaTokenizerFast", "sentencepiece",
            dict(unk_token="<unk>", bos_token="<s>", eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                 additional_special_tokens=["<|user|>", "<|assistant|>", "<|end|>"]))
OLMO2_TOK = ("GPT2TokenizerFast", "byte_level",
             dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|pad|>", unk_token="<|endoftext|>"))
GRANITE_TOK = ("GPT2TokenizerFast", "byte_level",
               dict(bos_token="<|end_of_text|>", eos_token="<|end_of_text|>", pad_token="<|end_of_text|>",
                    unk_token="<|end_of_text|>", additional_special_tokens=["<|start_of_role|>", "<|end_of_role|>"]))
GLM4_TOK = ("PreTrainedTokenizerFast", "byte_level",
            dict(eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                 additional_special_tokens=["[gMASK]", "<sop>", "<|user|>", "<|assistant|>"]))
# DeepSeek-V3's hub tokenizer_config.json names LlamaTokenizerFast for a byte-level tokenizer.json, which
# transformers 5 loads as TokenizersBackend (= PreTrainedTokenizerFast): saved under that class directly.
DEEPSEEK_TOK = ("PreTrainedTokenizerFast", "byte_level",
                dict(bos_token="<｜begin▁of▁sentence｜>", eos_token="<｜end▁of▁sentence｜>",
                     pad_token="<｜end▁of▁sentence｜>"))
GPT_OSS_TOK = ("PreTrainedTokenizerFast", "byte_level",
               dict(bos_token="<|startoftext|>", eos_token="<|return|>", pad_token="<|endoftext|>",
                    additional_special_tokens=["<|start|>", "<|message|>", "<|end|>", "<|channel|>"]))
NEOX_TOK = ("GPTNeoXTokenizerFast", "byte_level",
            dict(bos_token=None, eos_token="<|endoftext|>", pad_token="<|padding|>", unk_token="<|endoftext|>"))
STABLELM_TOK = ("GPTNeoXTokenizerFast", "byte_level",
                dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>"))
COHERE_TOK = ("CohereTokenizerFast", "byte_level",
              dict(bos_token="<BOS_TOKEN>", eos_token="<|END_OF_TURN_TOKEN|>", pad_token="<PAD>", unk_token="<UNK>"))
SMOLLM3_TOK = ("PreTrainedTokenizerFast", "byte_level",
               dict(bos_token=None, eos_token="<|im_end|>", pad_token="<|finetune_right_pad_id|>",
                    additional_special_tokens=["<|im_start|>", "<|begin_of_text|>", "<|end_of_text|>"]))
ERNIE_TOK = ("LlamaTokenizerFast", "sentencepiece",
             dict(unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<unk>",
                  additional_special_tokens=["<|begin_of_sentence|>", "<|end_of_sentence|>"]))

UNTIED_NOTE = "untied here (tie_word_embeddings=false) so that pipeline parallel can split it"
MOE_TP_NOTE = "under tp each MoE block stays whole per rank (experts split by parallel.ep instead)"

FAMILIES: dict[str, dict] = {
    "llama": dict(model_type="llama", config={}, tokenizer=LLAMA2_TOK,
                  notes="Llama 2 style (LlamaTokenizer, untied); GQA: kv heads 2, divisible by tp=2"),
    "mistral": dict(model_type="mistral", config=dict(head_dim=16, sliding_window=32), tokenizer=MISTRAL_TOK,
                    notes="GQA (kv 2), sliding window 32 < seq_len (Mistral 7B v0.1 style)"),
    "qwen2": dict(model_type="qwen2", config={}, tokenizer=QWEN_TOK,
                  notes=f"q/k/v biases; no BOS token; {UNTIED_NOTE} (small Qwen2.5 ties)"),
    "qwen3": dict(model_type="qwen3", config=dict(head_dim=16), tokenizer=QWEN_TOK,
                  notes=f"per-head q/k RMSNorm (replicated under tp, input sharded by heads); {UNTIED_NOTE}"),
    "gemma2": dict(model_type="gemma2", config=dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=16,
                                                    tie_word_embeddings=True, hidden_activation="gelu_pytorch_tanh"),
                   tokenizer=GEMMA_TOK,
                   notes="tied embeddings (every Gemma): pp refused (would need tie_word_embeddings=false); "
                         "attention soft-capping: eager attention; alternating sliding window 16 < seq_len"),
    "gemma3": dict(model_type="gemma3_text", config=dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=16,
                                                         tie_word_embeddings=True,
                                                         layer_types=["sliding_attention", "sliding_attention",
                                                                      "sliding_attention", "full_attention"]),
                   tokenizer=GEMMA_TOK,
                   notes="gemma3_text; tied embeddings (every Gemma): pp refused; q/k norms; sliding window 16, "
                         "one full-attention layer in 4; scaled embeddings"),
    "phi3": dict(model_type="phi3", config=dict(pad_token_id=None), tokenizer=PHI3_TOK,
                 notes="fused qkv_proj and gate_up_proj"),
    "olmo2": dict(model_type="olmo2", config={}, tokenizer=OLMO2_TOK,
                  notes="post-norm blocks; q/k RMSNorm over all heads (hidden-sized: sharded with the heads under tp)"),
    "granite": dict(model_type="granite", config=dict(embedding_multiplier=12.0, residual_multiplier=0.22,
                                                      logits_scaling=8.0, attention_multiplier=0.015625),
                    tokenizer=GRANITE_TOK,
                    notes="multipliers != 1 inside the base model's forward (embedding, residual, attention, "
                          "logits): a pp stage must not rescale received hidden states"),
    "glm4": dict(model_type="glm4", config=dict(head_dim=16, attention_bias=True), tokenizer=GLM4_TOK,
                 notes="fused gate_up_proj, partial rotary (0.5), sandwich norms; no BOS token"),
    "mixtral": dict(model_type="mixtral", config=dict(head_dim=16, num_local_experts=4, num_experts_per_tok=2),
                    tokenizer=MISTRAL_TOK,
                    notes="MoE 4 experts top-2; on disk per expert (w1/w2/w3), fused in memory by transformers; "
                          f"{MOE_TP_NOTE}"),
    "qwen3_moe": dict(model_type="qwen3_moe", config=dict(head_dim=16, num_experts=4, num_experts_per_tok=2,
                                                          moe_intermediate_size=64, norm_topk_prob=True),
                      tokenizer=QWEN_TOK,
                      notes=f"MoE 4 experts top-2 every layer; per-head q/k norms; {MOE_TP_NOTE}"),
    "deepseek_v3": dict(model_type="deepseek_v3",
                        config=dict(num_key_value_heads=4, moe_intermediate_size=32, n_routed_experts=4,
                                    n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
                                    first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8,
                                    qk_nope_head_dim=8, v_head_dim=16, head_dim=8, routed_scaling_factor=2.5),
                        tokenizer=DEEPSEEK_TOK,
                        notes="MLA attention (q/kv LoRA ranks 32/16, rope dim 8); layer 0 dense, 1-3 MoE "
                              "(4 routed + 1 shared expert, top-2 within the best of 2 expert groups, sigmoid router "
                              "with bias correction); kv heads 4; "
                              f"{MOE_TP_NOTE}"),
    "gpt_oss": dict(model_type="gpt_oss", config=dict(head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                                                      intermediate_size=64, sliding_window=16,
                                                      layer_types=["sliding_attention", "full_attention"] * 2,
                                                      rope_parameters=dict(rope_type="yarn", factor=8.0, beta_fast=32.0,
                                                                           beta_slow=1.0, truncate=False,
                                                                           original_max_position_embeddings=32,
                                                                           rope_theta=150000.0)),
                    tokenizer=GPT_OSS_TOK,
                    notes="MoE 4 experts top-2 with biases and clamped SwiGLU; attention sinks; alternating "
                          "sliding window 16; stored unquantized (fp32), not MXFP4; transformers' tp plan covers "
                          "only the embedding and the head (experts are meant for expert parallel)"),
    "qwen2_moe": dict(model_type="qwen2_moe", config=dict(num_experts=4, num_experts_per_tok=2,
                                                          moe_intermediate_size=64,
                                                          shared_expert_intermediate_size=128),
                      tokenizer=QWEN_TOK,
                      notes=f"MoE 4 experts top-2 + a gated shared expert; q/k/v biases; {MOE_TP_NOTE}"),
    "olmoe": dict(model_type="olmoe", config=dict(num_experts=4, num_experts_per_tok=2, intermediate_size=64,
                                                  pad_token_id=None), tokenizer=NEOX_TOK,
                  notes=f"MoE 4 experts top-2; q/k RMSNorm over all heads; {MOE_TP_NOTE}"),
    "cohere": dict(model_type="cohere", config=dict(logit_scale=0.0625, tie_word_embeddings=True, pad_token_id=None),
                   tokenizer=COHERE_TOK,
                   notes="tied embeddings (Command-R ties them): pp refused; parallel attention + MLP block "
                         "with one LayerNorm; logit_scale 0.0625"),
    "stablelm": dict(model_type="stablelm", config=dict(), tokenizer=STABLELM_TOK,
                     notes="LayerNorm with biases, partial rotary (0.25); transformers ships no tp plan for it: "
                           "tp refused"),
    "smollm3": dict(model_type="smollm3", config=dict(no_rope_layer_interval=2, pad_token_id=None),
                    tokenizer=SMOLLM3_TOK,
                    notes=f"NoPE every 2nd layer (no_rope_layers); {UNTIED_NOTE} (SmolLM3 ties)"),
    "ernie4_5": dict(model_type="ernie4_5", config=dict(head_dim=16, pad_token_id=None),
                     tokenizer=ERNIE_TOK, notes=f"ERNIE 4.5 dense; {UNTIED_NOTE} (0.3B ties)"),
}

# what every family shares: a family's own `config` wins
for _fam in FAMILIES.values():
    _fam["config"] = {**COMMON, **_fam["config"]}


def _bundled_tokenizer_dir() -> str:
    from automodel.config import RESOURCES

    return str(RESOURCES / "tiny_tasks" / "tokenizer")


def _texts() -> list[str]:
    from automodel.config import RESOURCES

    texts = []
    with open(RESOURCES / "tiny_tasks" / "train.jsonl") as f:
        for line in f:
            r = json.loads(line)
            texts += [r["prompt"], r["completion"]]
    return texts


def _sentencepiece_pieces() -> tuple[list[str], list[tuple[str, str]]]:
    """A Metaspace BPE (SentencePiece style) trained on the tiny tasks: (pieces in rank order, merges)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE(byte_fallback=True))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    n_special = 3 + 256  # unk/bos/eos + <0x00>..<0xFF>, added by the caller
    trainer = trainers.BpeTrainer(vocab_size=SP_VOCAB - n_special, show_progress=False, special_tokens=[])
    tk.train_from_iterator(_texts(), trainer)
    model = json.loads(tk.to_str())["model"]
    pieces = [p for p, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return pieces, merges


def _special_strings(specials: dict) -> list[str]:
    out = [v for k, v in specials.items() if k.endswith("_token") and isinstance(v, str)]
    return list(dict.fromkeys(out + list(specials.get("additional_special_tokens") or [])))


def make_tokenizer(spec, _cache={}):
    """The tokenizer object of one family's spec (see FAMILIES)."""
    import copy

    import transformers

    class_name, base, specials = spec
    cls = getattr(transformers, class_name)
    specials = dict(specials)
    extra = specials.pop("additional_special_tokens", None)
    if base == "byte_level":
        if "byte_level" not in _cache:
            from transformers import AutoTokenizer

            _cache["byte_level"] = AutoTokenizer.from_pretrained(_bundled_tokenizer_dir())._tokenizer
        tok = cls(tokenizer_object=copy.deepcopy(_cache["byte_level"]), **specials)
    else:
        if "sentencepiece" not in _cache:
            _cache["sentencepiece"] = _sentencepiece_pieces()
        pieces, merges = _cache["sentencepiece"]
        own = _special_strings(specials)
        bytes_ = [f"<0x{i:02X}>" for i in range(256)]
        vocab = {}
        for p in own + bytes_ + pieces:
            vocab.setdefault(p, len(vocab))
        tok = cls(vocab=vocab, merges=list(merges), **specials)
    if extra:
        tok.add_special_tokens({"additional_special_tokens": list(extra)})
    return tok


def _token_ids(tok) -> dict:
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
           "pad_token_id": tok.pad_token_id}
    return ids


def seed_of(name: str) -> int:
    """The fixed seed of a family's weights (its own, so that two families of one architecture differ)."""
    import zlib

    return SEED + zlib.crc32(name.encode()) % 10_000


def build_family(name: str, folder: str) -> str:
    """Write one family's folder (model + tokenizer) into `folder`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    fam = FAMILIES[name]
    tok = make_tokenizer(fam["tokenizer"])
    if len(tok) > VOCAB:
        raise AssertionError(f"{name}: tokenizer has {len(tok)} tokens > vocab {VOCAB}")
    kwargs = {**_token_ids(tok), **fam["config"]}
    for key in ("pad_token_id", "bos_token_id"):  # a family config's explicit None wins over the tokenizer's
        if key in fam["config"]:
            kwargs[key] = fam["config"][key]
    cfg = AutoConfig.for_model(fam["model_type"], **kwargs)
    staging = folder + ".partial"
    shutil.rmtree(staging, ignore_errors=True)
    with torch.random.fork_rng():
        torch.manual_seed(seed_of(name))
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(staging, safe_serialization=True)
    tok.save_pretrained(staging)
    with open(os.path.join(staging, ".complete"), "w") as f:
        f.write(fingerprint(name))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(staging, folder)
    return folder


def fingerprint(name: str) -> str:
    """What a family's folder was built from: its spec, the seed, and the transformers version."""
    import hashlib

    import transformers

    built_from = {k: v for k, v in FAMILIES[name].items() if k != "notes"}
    spec = json.dumps({"family": built_from, "seed": seed_of(name), "sp_vocab": SP_VOCAB,
                       "transformers": transformers.__version__}, sort_keys=True, default=str)
    return f"{name} {hashlib.sha256(spec.encode()).hexdigest()[:16]}"


def _is_current(folder: str, name: str) -> bool:
    try:
        with open(os.path.join(folder, ".complete")) as f:
            return f.read() == fingerprint(name)
    except OSError:
        return False


def build_zoo(root: str, families=None) -> dict[str, str]:
    """{family: folder} under `root`, writing only the folders not already complete."""
    os.makedirs(root, exist_ok=True)
    out = {}
    for name in families or FAMILIES:
        folder = os.path.join(root, name)
        if not _is_current(folder, name):
            build_family(name, folder)
        out[name] = folder
    return out
