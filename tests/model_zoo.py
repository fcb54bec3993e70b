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


# ================================================================== the matrix: runs, comparisons, anchors
# Everything below is shared by tests/test_model_matrix.py (a cheap tier) and scripts/model_matrix.py (the
# whole family x layout matrix).

STEPS = ["train.max_steps=6", "train.log_every=1", "train.global_batch_size=8", "train.seq_len=48",
         "train.sample_prompts=0", "train.device=cpu", "checkpoint=hf_export",
         # the router's balancing loss is per global micro-batch, which these layouts group differently from one
         # process (tests/test_moe.py checks it where the grouping is the same); dense families ignore it
         "moe.aux_loss_coef=0",
         # DeepSeek-V3's correction-bias balancing is a training rule of its own (not AdamW's): off for the anchors
         "moe.bias_update_rate=0"]
# 2-rank layouts, and the one-process run each is compared with
LAYOUTS = {
    "fsdp2": ["parallel=fsdp2", "train.micro_batch_size=2"],  # dp 2 x 2 micro-batches of 2
    "tp": ["parallel=tp"],  # sequence parallel on; 1 micro-batch of 8
    "pp": ["parallel=pp", "train.micro_batch_size=2"],  # 1F1B, 4 micro-batches of 2
    "lora_tp": ["parallel=tp", "peft=lora"],
}
REFERENCE_OF = {"fsdp2": "full", "tp": "full", "pp": "full", "lora_tp": "lora"}
REFERENCES = {"full": [], "lora": ["peft=lora"]}
# MoE layouts (scripts/moe_matrix.py): name -> (world, overrides, the one-process reference's overrides). The
# balancing loss is per global micro-batch (micro_batch_size x dp rows; ep does not reduce dp), so the reference
# runs micro-batches of that size: micro x world / (tp x pp x cp). Global batch 8 (STEPS).
MOE_LAYOUTS = {
    "ep2": (2, ["parallel=fsdp2_ep", "train.micro_batch_size=4"], ["train.micro_batch_size=8"]),
    "ep4": (4, ["parallel=fsdp2_ep", "parallel.ep=4", "train.micro_batch_size=2"], ["train.micro_batch_size=8"]),
    "tp": (2, ["parallel=tp"], ["train.micro_batch_size=8"]),  # dp 1: one micro-batch of 8
    "ep2_tp2": (4, ["parallel=fsdp2_ep", "parallel.tp=2", "train.micro_batch_size=4"], ["train.micro_batch_size=8"]),
    "ep2_pp2": (4, ["parallel=fsdp2_ep_pp", "train.micro_batch_size=2"], ["train.micro_batch_size=4"]),  # dp 2
    "ep2_cp2": (4, ["parallel=fsdp2_ep", "parallel.cp=2", "train.micro_batch_size=4"], ["train.micro_batch_size=8"]),
    "lora_ep2": (2, ["parallel=fsdp2_ep", "train.micro_batch_size=4", "peft=lora"],
                 ["train.micro_batch_size=8", "peft=lora"]),
    # dp 4 (ep 2 of it): 1f1b needs >= 2 micro-batches a step, so micro-batches of 1 (global micro-batch 4)
    "dp2_ep2_pp2": (8, ["parallel=fsdp2_ep_pp", "train.micro_batch_size=1"], ["train.micro_batch_size=4"]),
}

TOL_LOSS = 1e-5  # max |loss diff| over the 6 steps (fp32)
TOL_GRAD_REL = 1e-4  # max relative grad-norm diff
TOL_LOGITS = 1e-5  # max |logit diff| of the exported final/ folders on the probe batch
TOL_HF_LOSS = 1e-5  # step 1's loss vs the model's own HF labels= loss
TOL_PARAM = 1e-6  # parameters after step 1 vs a hand-written torch AdamW step
MIN_EXPORT_MOVE = 1e-4  # the one-process final/ logits must differ from the initial checkpoint's by more
TASK_EXAMPLES = 256  # the first examples of the bundled tiny tasks: tokenizing all 20,000 costs seconds a run


def start_matrix(root: str, families: list, out: str) -> tuple[dict, str]:
    """What a matrix script does first: quiet, single-threaded runs; the zoo and the tasks under `root`."""
    import logging
    import time

    import torch

    os.environ.setdefault("AUTOMODEL_NO_PROGRESS", "1")
    torch.set_num_threads(1)
    logging.getLogger("automodel").setLevel(logging.WARNING)
    t0 = time.time()
    zoo, tasks = build_zoo(root, families), write_tasks(root)
    print(f"zoo: {len(zoo)} families in {root} ({time.time() - t0:.0f}s); runs in {out}", flush=True)
    return zoo, tasks


def write_tasks(root: str) -> str:
    """A small prompt/completion jsonl (the first TASK_EXAMPLES bundled tiny-task examples) under `root`."""
    from automodel.config import RESOURCES

    path = os.path.join(root, "tasks.jsonl")
    if not os.path.isfile(path):
        with open(RESOURCES / "tiny_tasks" / "train.jsonl") as f:
            lines = [next(f) for _ in range(TASK_EXAMPLES)]
        with open(path + ".partial", "w") as f:
            f.writelines(lines)
        os.replace(path + ".partial", path)
    return path


def overrides(folder: str, tasks: str, *extra: str) -> list[str]:
    """The CLI overrides of a run of the checkpoint in `folder` on `tasks`."""
    return ["model=hf", f"model.path={folder}", "data=instruction", f"data.path={tasks}", *STEPS, *extra]


def run_train(out_dir: str, over: list[str]) -> dict:
    """Train with automodel (in this process, or as one rank of a spawned group) and return the numbers."""
    import time

    from automodel.compose import compose
    from automodel.engine.run import train

    os.makedirs(out_dir, exist_ok=True)
    t0 = time.perf_counter()
    result = train(compose(list(over)), out_dir)
    return {"losses": [r["loss"] for r in result.records], "grad_norms": [r["grad_norm"] for r in result.records],
            "final_dir": result.final_dir, "seconds": time.perf_counter() - t0}


def short_error(exc: BaseException, tb=None) -> str:
    """One line: the exception and where it was raised (the innermost frame in automodel, else the last)."""
    import traceback

    frames = traceback.extract_tb(tb if tb is not None else exc.__traceback__)
    ours = [f for f in frames if "/automodel/" in f.filename and "/site-packages/" not in f.filename]
    at = (ours or frames or [None])[-1]
    where = f" at {os.path.relpath(at.filename)}:{at.lineno} in {at.name}" if at else ""
    text = " ".join(str(exc).split())[:300]
    return f"{type(exc).__name__}: {text}{where}"


def attempt(fn, *args) -> dict:
    """{"status": "ok", **fn(...)}, or refused (a UserError: its one line), or error (with the traceback)."""
    import traceback

    from automodel.errors import UserError

    try:
        return {"status": "ok", **fn(*args)}
    except UserError as e:
        return {"status": "refused", "reason": str(e)}
    except Exception as e:  # a bug (or a missing feature): a failure of the cell, with its traceback
        return {"status": "error", "error": short_error(e), "traceback": traceback.format_exc()}


# ------------------------------------------------------------------ comparisons
def probe_batch():
    import torch

    g = torch.Generator().manual_seed(7)
    return torch.randint(4, 360, (2, 24), generator=g)  # token ids every tokenizer here has


def probe_logits(folder: str):
    """Logits of the HF folder (plain transformers) on the probe batch."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(input_ids=probe_batch()).logits.float()


def export_moved(ref: dict, folder: str, logits_cache: dict | None = None) -> float:
    """How far training moved the exported logits from the initial checkpoint's (a final/ folder that still
    held the initial weights would match every layout's just as well)."""
    cache = logits_cache if logits_cache is not None else {}
    for f in (ref["final_dir"], folder):
        if f not in cache:
            cache[f] = probe_logits(f)
    return float((cache[ref["final_dir"]] - cache[folder]).abs().max())


def compare(got: dict, ref: dict, logits_cache: dict | None = None) -> dict:
    """The numbers of one check against its one-process reference; `ok` when every one is within tolerance."""
    if got.get("status") != "ok":
        return got
    if ref.get("status") != "ok":
        why = ref.get("error") or ref.get("reason")
        return {"status": "error", "error": f"its one-process reference failed: {why}"}
    out = {"status": "ok", "seconds": got.get("seconds")}
    n = len(ref["losses"])
    if len(got["losses"]) != n or n == 0:
        return {"status": "error", "error": f"{len(got['losses'])} logged steps, the reference has {n}"}
    out["loss_diff"] = max(abs(a - b) for a, b in zip(got["losses"], ref["losses"]))
    out["grad_rel"] = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(got["grad_norms"], ref["grad_norms"]))
    cache = logits_cache if logits_cache is not None else {}
    try:
        for run in (got, ref):
            if run["final_dir"] not in cache:
                cache[run["final_dir"]] = probe_logits(run["final_dir"])
        out["logits_diff"] = float((cache[got["final_dir"]] - cache[ref["final_dir"]]).abs().max())
    except Exception as e:
        return {**out, "status": "error", "error": "exported final/ folder: " + short_error(e)}
    problems = [f"{k}={out[k]:.2e} > {tol:g}" for k, tol in (("loss_diff", TOL_LOSS), ("grad_rel", TOL_GRAD_REL),
                                                              ("logits_diff", TOL_LOGITS)) if not out[k] <= tol]
    if problems:
        out["status"] = "mismatch"
        out["error"] = ", ".join(problems)
    return out


# ------------------------------------------------------------------ anchors: one process, plain HF and torch
def first_batch(cfg):
    """The global batch automodel trains step 1 on (the data plugin's first, with the run's own seed, seq_len and
    batch size, on one data-parallel rank); and the validated config (fresh plugin instances)."""
    from automodel.config import validate

    checked = validate(cfg)
    t = checked.train
    tok = checked.plugins["model"].tokenizer()
    batches = checked.plugins["data"].build(tok, seq_len=t.seq_len, seed=t.seed, dp_rank=0, dp_size=1,
                                            global_batch_size=t.global_batch_size,
                                            micro_batch_size=t.global_batch_size)
    return next(batches), checked


def hf_labels_inputs(micro: dict) -> dict:
    """automodel's micro-batch (labels already shifted: labels[t] is the target of position t) as the inputs
    of an HF `labels=` call, which shifts itself: one more (pad) position, labels moved right by one."""
    import torch

    ids, labels = micro["input_ids"], micro["labels"]
    pad = torch.zeros_like(ids[:, :1])
    ignore = torch.full_like(labels[:, :1], -100)
    return {"input_ids": torch.cat([ids, pad], 1), "labels": torch.cat([ignore, labels], 1)}


def hf_model(folder: str):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.train()
    return model


def lr_at_step_1(optim_cfg) -> float:
    """optim=adamw's LR for the first step: linear warmup (step+1)/warmup_steps, cosine after (1.0 at its start)."""
    return optim_cfg.lr * (1.0 / optim_cfg.warmup_steps if optim_cfg.warmup_steps > 0 else 1.0)


def anchors(folder: str, tasks: str, out_dir: str) -> dict:
    """Both anchors of one family: {"hf_loss": outcome, "adamw": outcome}.

    hf_loss: step 1's loss of a 1-step automodel run equals the plain HF model's own `labels=` loss on the
    batch automodel used (the data plugin's first batch). adamw: the parameters after that step equal a
    hand-written step on the plain HF model: that loss, backward, torch's clip_grad_norm_ to
    train.max_grad_norm, torch.optim.AdamW with optim's lr (warmup applied), betas, eps, and weight decay on
    >= 2-D parameters only."""
    import torch

    over = overrides(folder, tasks, "train.max_steps=1", "checkpoint.export_final=false")
    result = {}

    def compose_run():
        from automodel.compose import compose

        return {"cfg": compose(over)}

    composed = attempt(compose_run)
    if composed["status"] != "ok":
        return {"hf_loss": composed, "adamw": composed}
    cfg = composed["cfg"]

    def automodel_step():
        from automodel.engine.run import train

        os.makedirs(out_dir, exist_ok=True)
        r = train(cfg, out_dir)
        return (r.records[0]["loss"], {k: v.detach().clone() for k, v in r.model.state_dict().items()},
                r.records[0]["grad_norm"])

    auto = attempt(lambda: dict(zip(("loss", "state", "grad_norm"), automodel_step())))
    if auto["status"] != "ok":
        return {"hf_loss": auto, "adamw": auto}

    def hf_side():
        batch, checked = first_batch(cfg)
        (micro,) = batch.micro_batches
        ids, labels = micro["input_ids"], micro["labels"]
        # the labels are the next tokens (checked where the next position has a target too: it is inside the example)
        inside = (labels[:, :-1] != -100) & (labels[:, 1:] != -100)
        if not torch.equal(labels[:, :-1][inside], ids[:, 1:][inside]):
            raise AssertionError("the data plugin's labels are not the next input tokens")
        model = hf_model(folder)
        before = {k: v.detach().clone() for k, v in model.state_dict().items()}
        with torch.no_grad():  # HF's own shift: one more position, labels moved right by one
            hf_loss = float(model(**hf_labels_inputs(micro)).loss)
        targets = int((labels != -100).sum())
        # the step: HF's labels= loss on automodel's own shapes (pre-shifted labels through `shift_labels`), so
        # that the gradients are computed as automodel computes them, not rounded differently
        loss = model(input_ids=ids, labels=labels, shift_labels=labels).loss
        o, t = checked.plugins["optim"].cfg, checked.train
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": o.weight_decay},
                                 {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                                lr=lr_at_step_1(o), betas=(o.beta1, o.beta2), eps=o.eps)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)) if t.max_grad_norm > 0 else None
        opt.step()
        after = model.state_dict()
        return hf_loss, targets, grad_norm, before, after

    hf = attempt(lambda: dict(zip(("loss", "targets", "grad_norm", "before", "after"), hf_side())))
    if hf["status"] != "ok":
        return {"hf_loss": hf, "adamw": hf}
    diff = abs(auto["loss"] - hf["loss"])
    result["hf_loss"] = {"status": "ok" if diff <= TOL_HF_LOSS else "mismatch", "diff": diff,
                         "automodel": auto["loss"], "hf": hf["loss"], "targets": hf["targets"]}
    if diff > TOL_HF_LOSS:
        result["hf_loss"]["error"] = f"step-1 loss {auto['loss']:.6f} vs HF labels= loss {hf['loss']:.6f}"
    state, after, before = auto["state"], hf["after"], hf["before"]
    missing = sorted(set(after) ^ set(state))
    if missing:
        result["adamw"] = {"status": "error", "error": f"parameter names differ from the HF model's: {missing[:3]}"}
        return result
    pdiff = max(float((state[k].float() - after[k].float()).abs().max()) for k in after)
    moved = max(float((after[k].float() - before[k].float()).abs().max()) for k in after)
    result["adamw"] = {"status": "ok" if pdiff <= TOL_PARAM else "mismatch", "diff": pdiff, "moved": moved,
                       "grad_norm": hf["grad_norm"], "automodel_grad_norm": auto["grad_norm"]}
    if pdiff > TOL_PARAM:
        worst = max(after, key=lambda k: float((state[k].float() - after[k].float()).abs().max()))
        result["adamw"]["error"] = f"max param diff {pdiff:.2e} (at {worst}; the step moved weights by {moved:.2e})"
    return result


# ------------------------------------------------------------------ the 2-rank group: every check in one spawn
def worker(rank: int, world: int, workdir: str, checks: list, pg_timeout_s: float) -> None:
    """One rank: train every (name, overrides) check in turn. A check's failure on any rank is agreed on
    through a FileStore (not the process group, which a failed rank may have left mid-collective): every
    rank then leaves that group and joins a fresh one, so the next check starts clean. Rank 0 appends each
    check's outcome to results.jsonl as soon as it is known."""
    import datetime
    import json
    import time

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.setdefault("AUTOMODEL_NO_PROGRESS", "1")
    import logging

    logging.getLogger("automodel").setLevel(logging.WARNING)
    timeout = datetime.timedelta(seconds=pg_timeout_s)
    store = dist.FileStore(os.path.join(workdir, "agree.store"), world)
    store.set_timeout(datetime.timedelta(seconds=pg_timeout_s * 2 + 60))
    epoch = 0

    def join():
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(workdir, f'pg{epoch}.store')}", rank=rank,
                                world_size=world, timeout=timeout)

    join()
    for i, (name, over) in enumerate(checks):
        out = attempt(run_train, os.path.join(workdir, "runs", name), over)
        out["rank"], out["at"] = rank, time.time()
        if out["status"] != "ok" and dist.is_initialized():
            dist.destroy_process_group()  # a peer waiting on this rank in a collective gets an error at once
        store.set(f"{i}/{rank}", json.dumps(out))
        store.wait([f"{i}/{r}" for r in range(world)])
        every = [json.loads(store.get(f"{i}/{r}")) for r in range(world)]
        bad = [o for o in every if o["status"] != "ok"]
        if bad:
            if dist.is_initialized():
                dist.destroy_process_group()
            epoch += 1
            join()
        if rank == 0:
            # the first failure in time is the cause; a peer's later error is its consequence
            final = min(bad, key=lambda o: (o["status"] != "refused", o["at"])) if bad else every[0]
            with open(os.path.join(workdir, "results.jsonl"), "a") as f:
                f.write(json.dumps({"name": name, **final}) + "\n")
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _entry(rank, world, workdir, checks, pg_timeout_s):
    worker(rank, world, workdir, checks, pg_timeout_s)


def run_spawned(checks: list, workdir: str, world: int = 2, pg_timeout_s: float = 120.0,
                deadline_s: float = 3600.0) -> dict:
    """{check name: outcome} of every (name, overrides) check, run by one spawned group of `world` ranks.
    Should a rank die (a crash, not an exception), the check it was running is marked failed and a new
    group runs the rest."""
    import json
    import time

    import torch.multiprocessing as mp

    os.makedirs(workdir, exist_ok=True)
    results, todo, start, attempt_no = {}, list(checks), time.time(), 0
    while todo:
        sub = os.path.join(workdir, f"group{attempt_no}")
        os.makedirs(sub, exist_ok=True)
        ctx = mp.start_processes(_entry, args=(world, sub, todo, pg_timeout_s), nprocs=world, join=False,
                                 start_method="spawn")
        crash = None
        try:
            while not ctx.join(timeout=5):
                if time.time() - start > deadline_s:
                    for p in ctx.processes:
                        if p.is_alive():
                            p.kill()
                    crash = f"the matrix ran past its deadline of {deadline_s:.0f}s"
                    break
        except Exception as e:  # a rank exited abnormally; torch has terminated the others
            crash = "a rank died: " + " ".join(str(e).split())[:200]
        got = {}
        path = os.path.join(sub, "results.jsonl")
        if os.path.isfile(path):
            with open(path) as f:
                for line in f:
                    r = json.loads(line)
                    got[r.pop("name")] = r
        results.update(got)
        rest = [c for c in todo if c[0] not in got]
        if not rest:
            break
        if crash is None:
            crash = "the spawned group ended before this check reported"
        results[rest[0][0]] = {"status": "error", "error": crash}
        todo, attempt_no = rest[1:], attempt_no + 1
        if time.time() - start > deadline_s:
            for name, _ in todo:
                results[name] = {"status": "error", "error": "not run: the matrix ran past its deadline"}
            break
    return results


def two_rank_checks(zoo: dict, tasks: str, cells: list[tuple[str, str]]) -> list:
    """[(name, overrides)] of (family, layout) cells, named family/layout."""
    return [(f"{fam}/{layout}", overrides(zoo[fam], tasks, *LAYOUTS[layout])) for fam, layout in cells]



if __name__ == "__main__":  # python tests/model_zoo.py <root>: build and describe the zoo
    import sys

    from transformers import AutoConfig, AutoTokenizer

    for fam, path in build_zoo(sys.argv[1] if len(sys.argv) > 1 else "/tmp/automodel_zoo").items():
        tok = AutoTokenizer.from_pretrained(path)
        cfg = AutoConfig.from_pretrained(path)
        print(f"{fam:12s} {cfg.model_type:12s} {type(tok).__name__:18s} {len(tok):4d} tokens  bos={tok.bos_token} "
              f"eos={tok.eos_token} pad={tok.pad_token} tied={cfg.tie_word_embeddings}")
