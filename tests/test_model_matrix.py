"""The model matrix, CI tier: tiny random checkpoints of 20 architectures (tests/model_zoo.py), each trained by
automodel from its HF folder.

- every family, in this process: two anchors that use no automodel code beyond the data plugin's batch:
  step 1's loss equals the plain HF model's own `labels=` loss, and the parameters after step 1 equal a
  hand-written torch.optim.AdamW step (optim=adamw's settings, warmup, clipping) on the plain HF model;
- every family, one 2-rank layout (spread over fsdp2, tp, pp and LoRA under tp, each layout covered by four
  to six families of different kinds), all in ONE spawned group: 6 steps against one process (LoRA against
  one-process LoRA):
  losses within 1e-5, grad norms within 1e-4 relative, and the exported final/ folders' logits within 1e-5;
- layouts a family cannot have are refused in one line (a UserError), not with a traceback: pipeline parallel
  of tied embeddings; tensor parallel of MoE experts and of GPT-OSS either matches one process or is refused.

The whole matrix (every family x every layout) is scripts/model_matrix.py. The zoo is cached in pytest's cache
directory (.pytest_cache/d/model_zoo, or $AUTOMODEL_MODEL_ZOO), rebuilt per family only when its spec changes.
"""

from __future__ import annotations

import math
import os

import pytest

import matrix_runs as mr
import spawned_group
import model_zoo as mz

# one 2-rank layout per family; pp only for untied families (tied embeddings refuse pp, checked below)
CI_LAYOUT = {
    "llama": "fsdp2", "gemma2": "fsdp2", "phi3": "fsdp2", "qwen3_moe": "fsdp2", "deepseek_v3": "fsdp2",
    "stablelm": "fsdp2",
    "mistral": "tp", "gemma3": "tp", "glm4": "tp", "smollm3": "tp",
    "qwen2": "pp", "granite": "pp", "mixtral": "pp", "gpt_oss": "pp", "olmoe": "pp", "qwen2_moe": "pp",
    "qwen3": "lora_tp", "olmo2": "lora_tp", "cohere": "lora_tp", "ernie4_5": "lora_tp",
}
# layouts refused in one line: (family, layout, the UserError's beginning)
REFUSALS = [
    ("gemma2", "pp", "parallel.pp>1: the model ties its input embedding to its output head (tie_word_embeddings=true)"),
]
# layouts that must either match one process or be refused in one line (never a traceback): MoE experts and a
# tensor-parallel plan that covers only the embedding and the head (GPT-OSS's in transformers 5)
REFUSED_OR_MATCHING = [("qwen3_moe", "tp"), ("gpt_oss", "tp")]
# the class AutoTokenizer gives for each folder: the family's own class where transformers 5 keeps one for
# that model type, else TokenizersBackend (what it loads for the family's hub checkpoints too)
TOKENIZER_CLASS = {
    "llama": "LlamaTokenizer", "qwen2": "Qwen2Tokenizer", "qwen3": "Qwen2Tokenizer", "qwen3_moe": "Qwen2Tokenizer",
    "qwen2_moe": "Qwen2Tokenizer", "gemma2": "GemmaTokenizer", "gemma3": "GemmaTokenizer",
    "olmoe": "GPTNeoXTokenizer", "cohere": "CohereTokenizer",
}
MOE = {"mixtral": 4, "qwen3_moe": 4, "deepseek_v3": 4, "gpt_oss": 4, "qwen2_moe": 4, "olmoe": 4}


def test_the_rotation_covers_every_family_and_every_layout_several_times():
    assert set(CI_LAYOUT) == set(mz.FAMILIES) and len(mz.FAMILIES) >= 16
    for layout in mr.LAYOUTS:
        assert sum(v == layout for v in CI_LAYOUT.values()) >= 4, layout
    for fam, layout in CI_LAYOUT.items():
        if layout == "pp":
            assert not mz.FAMILIES[fam]["config"]["tie_word_embeddings"], fam


@pytest.fixture(scope="module")
def references(zoo, tmp_path_factory):
    """{family: the one-process run its 2-rank layout is compared with}"""
    folders, tasks = zoo
    out = tmp_path_factory.mktemp("ref")
    return {fam: mr.attempt(mr.run_train, str(out / fam),
                            mr.overrides(folders[fam], tasks, *mr.REFERENCES[mr.REFERENCE_OF[layout]]))
            for fam, layout in CI_LAYOUT.items()}


@pytest.fixture(scope="module")
def anchors(zoo, tmp_path_factory):
    folders, tasks = zoo
    out = tmp_path_factory.mktemp("anchor")
    return {fam: mr.anchors(folders[fam], tasks, str(out / fam)) for fam in mz.FAMILIES}


@pytest.fixture(scope="module")
def two(zoo, references, anchors, tmp_path_factory):
    """Every 2-rank check of this tier, in one spawned group of 2 ranks."""
    folders, tasks = zoo
    cells = [*CI_LAYOUT.items(), *[(fam, layout) for fam, layout, _ in REFUSALS], *REFUSED_OR_MATCHING]
    checks = mr.two_rank_checks(folders, tasks, cells)
    return spawned_group.run_spawned(checks, str(tmp_path_factory.mktemp("ranks2")), pg_timeout_s=60, deadline_s=900)


def _fail_text(outcome: dict) -> str:
    return outcome.get("error") or outcome.get("reason") or outcome.get("status")


# ---------------------------------------------------------------- the zoo itself
def test_every_folder_is_an_hf_checkpoint_with_its_family_tokenizer(zoo):
    import json

    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer

    folders, _ = zoo
    for fam, folder in folders.items():
        spec = mz.FAMILIES[fam]
        cfg = AutoConfig.from_pretrained(folder)
        tok = AutoTokenizer.from_pretrained(folder)
        assert cfg.model_type == spec["model_type"], fam
        assert type(tok).__name__ == TOKENIZER_CLASS.get(fam, "TokenizersBackend"), (fam, type(tok).__name__)
        with open(os.path.join(folder, "tokenizer_config.json")) as f:
            saved = json.load(f)["tokenizer_class"]
        assert saved.removesuffix("Fast") in (spec["tokenizer"][0].removesuffix("Fast"), "TokenizersBackend"), fam
        assert cfg.vocab_size == mz.VOCAB >= len(tok) > 300, fam
        for key in ("bos_token", "eos_token"):
            assert getattr(tok, key) == spec["tokenizer"][2].get(key, getattr(tok, key)), (fam, key)
        assert cfg.eos_token_id == tok.eos_token_id, fam
        assert (cfg.hidden_size, cfg.num_hidden_layers) == (64, 4), fam
        assert cfg.num_attention_heads % 2 == 0 and cfg.num_key_value_heads % 2 == 0, fam  # tp=2 divides them
        with safe_open(os.path.join(folder, "model.safetensors"), "pt") as f:
            dtypes = {str(f.get_slice(k).get_dtype()) for k in f.keys()}
        assert dtypes == {"F32"}, (fam, dtypes)
    granite = AutoConfig.from_pretrained(folders["granite"])
    assert (granite.embedding_multiplier, granite.residual_multiplier, granite.logits_scaling,
            granite.attention_multiplier) == (12.0, 0.22, 8.0, 0.015625)
    for fam, experts in MOE.items():
        cfg = AutoConfig.from_pretrained(folders[fam])
        n = next(getattr(cfg, k) for k in ("num_local_experts", "num_experts", "n_routed_experts") if hasattr(cfg, k))
        assert n == experts, fam


def test_the_zoo_is_built_once_and_reused(zoo):
    folders, _ = zoo
    stamp = {fam: os.path.getmtime(os.path.join(f, "model.safetensors")) for fam, f in folders.items()}
    again = mz.build_zoo(os.path.dirname(folders["llama"]))
    assert again == folders
    assert stamp == {fam: os.path.getmtime(os.path.join(f, "model.safetensors")) for fam, f in folders.items()}


# ---------------------------------------------------------------- anchors (one process, plain HF + torch)
@pytest.mark.parametrize("family", list(mz.FAMILIES))
def test_step_one_loss_is_the_hf_models_own_labels_loss(anchors, family):
    a = anchors[family]["hf_loss"]
    assert a["status"] == "ok", _fail_text(a)
    print(f"{family}: automodel {a['automodel']:.7f}, HF labels= {a['hf']:.7f} over {a['targets']} targets, "
          f"diff {a['diff']:.1e}")
    assert a["diff"] <= mr.TOL_HF_LOSS
    assert a["targets"] > 8
    assert abs(a["hf"] - math.log(mz.VOCAB)) < 0.5  # a random model: about uniform over the vocabulary


@pytest.mark.parametrize("family", list(mz.FAMILIES))
def test_parameters_after_step_one_equal_a_hand_written_adamw_step(anchors, family):
    a = anchors[family]["adamw"]
    assert a["status"] == "ok", _fail_text(a)
    lr1 = 2e-3 / 20  # conf/optim/adamw.yaml: lr 2e-3, 20 warmup steps: step 1 runs at lr / 20
    print(f"{family}: max param diff {a['diff']:.1e}; the step moved weights by up to {a['moved']:.2e}")
    assert a["diff"] <= mr.TOL_PARAM
    assert 0.9 * lr1 < a["moved"] < 1.1 * lr1  # Adam's first step moves each weight by about lr
    assert a["grad_norm"] > 0  # the step's gradient norm, the engine's against the hand-written step's
    assert abs(a["automodel_grad_norm"] - a["grad_norm"]) <= 1e-4 * a["grad_norm"], a


# ---------------------------------------------------------------- 2 ranks vs one process
@pytest.mark.parametrize("family", list(CI_LAYOUT))
def test_two_ranks_match_one_process(zoo, two, references, family):
    layout = CI_LAYOUT[family]
    ref = references[family]
    assert ref["status"] == "ok", f"{family}, one process: {_fail_text(ref)}"
    got = mr.compare(two[f"{family}/{layout}"], ref)
    assert got["status"] == "ok", f"{family} under {layout}: {_fail_text(got)}"
    moved = mr.export_moved(ref, zoo[0][family])
    print(f"{family} {layout}: max loss diff {got['loss_diff']:.1e}, grad-norm rel {got['grad_rel']:.1e}, "
          f"logits {got['logits_diff']:.1e} (training moved them by {moved:.1e})")
    assert got["loss_diff"] <= mr.TOL_LOSS and got["grad_rel"] <= mr.TOL_GRAD_REL
    assert got["logits_diff"] <= mr.TOL_LOGITS and moved > mr.MIN_EXPORT_MOVE  # the exports agree, and are trained
    assert len(ref["losses"]) == 6 and min(ref["losses"][1:]) < ref["losses"][0]  # it trains


@pytest.mark.parametrize("family,layout,text", REFUSALS)
def test_impossible_layouts_are_refused_in_one_line(two, family, layout, text):
    got = two[f"{family}/{layout}"]
    assert got["status"] == "refused", _fail_text(got)
    assert got["reason"].startswith(text) and "\n" not in got["reason"]


@pytest.mark.parametrize("family,layout", REFUSED_OR_MATCHING)
def test_layouts_either_match_one_process_or_are_refused_in_one_line(two, references, family, layout):
    got = two[f"{family}/{layout}"]
    if got["status"] == "refused":
        print(f"{family} {layout}: refused: {got['reason']}")
        assert got["reason"].startswith("parallel.tp>1:") and "\n" not in got["reason"]
        return
    assert got["status"] == "ok", f"{family} under {layout}: neither refused nor trained: {_fail_text(got)}"
    got = mr.compare(got, references[family])
    assert got["status"] == "ok", f"{family} under {layout}: {_fail_text(got)}"
