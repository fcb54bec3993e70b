"""Every implemented DTensor preset against one process on the same global batches (gloo, CPU).

Per-step losses over 6 steps must equal the single-process run within 1e-5 (fp32). A layout bug can keep the
losses that close (AdamW barely feels a gradient's scale), so `_parity` asks for more: each step's grad norm within
1e-5 relative, every trained weight within 1e-5, and a replicated parameter's copies on the ranks (the
sequence-parallel norms on each tp rank) bitwise equal. One spawned group each of 2, 4 and 8 ranks runs the
multi-rank checks the selected tests need (spawning costs seconds here); each one-process reference runs in this
process when first compared with. Also FSDP2's per-rank memory; refusals and presets are tests/test_layout_refusals.py.

Two tiers. CI runs each mechanism once (every layout, composition, schedule, loss, adapter and precision that
changes how a step is laid out). The full matrix (AUTOMODEL_LAYOUTS=full, what `scripts/layout_matrix.py` runs)
adds the variants named in FULL_ONLY: more schedules and sizes of a layout CI already checks, and tensor
parallel of each family (CI checks every family at two ranks in tests/test_model_matrix.py).
"""

import json
import os

import pytest
import torch.multiprocessing as mp
from helpers import GRANITE, losses, save_micro_hf_model, train, with_extras

# the bundled set packs by default; pp and cp refuse packed rows, and layout parity is not about packing
STEPS = ["train.max_steps=6", "train.log_every=1", "train.global_batch_size=8", "checkpoint.export_final=false",
         "data.packing=false"]
TOL = 1e-5
GRAD_REL = 1e-5  # max relative grad-norm diff of a step
WEIGHT_TOL = 1e-5  # max |weight diff| after the 6 steps
LORA = ["peft=lora", "optim.lr=1e-2"]
DORA = ["peft=dora", "optim.lr=1e-2"]

# tiny random configs of the other families (MICRO in helpers.py sets the sizes)
FAMILIES = {
    "qwen2": ["model.config.model_type=qwen2"],
    "qwen3": ["model.config.model_type=qwen3", "+model.config.head_dim=16"],
    "mistral": ["model.config.model_type=mistral"],
    "gemma2": ["model.config.model_type=gemma2", "+model.config.head_dim=16", "model.attn_implementation=eager"],
    "gemma3": ["model.config.model_type=gemma3_text", "+model.config.head_dim=16",
               "model.config.tie_word_embeddings=true"],
    "phi3": ["model.config.model_type=phi3", "+model.config.pad_token_id=0"],
}
CHUNKED = ["loss=chunked_ce", "loss.chunk_tokens=20"]
# distillation from a frozen teacher folder (made by the `teacher` fixture; {teacher} is its path)
KD = ["teacher=hf", "teacher.model.path={teacher}", "teacher.kd_ratio=0.5", "teacher.temperature=2.0"]
KV4 = ["model.config.num_key_value_heads=4"]  # so that tp=4 divides the KV heads
# Gemma 2 with untied embeddings (pp cannot split tied ones) and a sliding window shorter than the sequence:
# its layers alternate sliding and full attention, which each stage must keep by the layer's own index.
GEMMA2_SLIDING = [*FAMILIES["gemma2"], "model.config.tie_word_embeddings=false", "+model.config.sliding_window=8"]

FULL = os.environ.get("AUTOMODEL_LAYOUTS") == "full"
FULL_ONLY = {"tp_llama", "tp_no_sp", "fsdp2_ac_selective", *(f"tp_{family}" for family in FAMILIES), "pp_gpipe",
             "pp_ac_full", "tp_lora_loss_parallel", "cp_kd", "tp4", "pp4", "fsdp2_pp_interleaved", "tp_pp_lora",
             "fsdp2_tp_pp", "pp_interleaved_kd", "fsdp2_pp_kd",
             # in CI their mechanisms run inside a composition: pp_kd (1F1B), tp_pp_kd (tp x pp), cp_tp_pp (cp x pp)
             "pp_1f1b", "tp_pp", "cp_pp"}


def tier(items: list) -> list:
    """The items (names, or tuples whose first element is a check's name) of this run's tier."""
    return [i for i in items if FULL or (i[0] if isinstance(i, tuple) else i) not in FULL_ONLY]


TWO = [
    ("tp_llama", ["parallel=tp", *STEPS, "train.micro_batch_size=8"]),
    ("tp_loss_parallel", ["parallel=tp", "parallel.loss_parallel=true", *STEPS, "train.micro_batch_size=4"]),
    ("tp_no_sp", ["parallel=tp", "parallel.sequence_parallel=false", *STEPS, "train.micro_batch_size=8"]),
    ("fsdp2_tp", ["parallel=fsdp2_tp", *STEPS, "train.micro_batch_size=8"]),
    ("fsdp2_ac_full", ["parallel=fsdp2", "parallel.activation_checkpointing=full", *STEPS, "train.micro_batch_size=4"]),
    ("fsdp2_ac_selective", ["parallel=fsdp2", "parallel.activation_checkpointing=selective", *STEPS,
                            "train.micro_batch_size=4"]),
    *[(f"tp_{fam}", ["parallel=tp", *over, *STEPS, "train.micro_batch_size=8"]) for fam, over in FAMILIES.items()],
    ("cp_llama", ["parallel=cp", *STEPS, "train.micro_batch_size=4"]),
    ("cp_gemma2", ["parallel=cp", *FAMILIES["gemma2"], *STEPS, "train.micro_batch_size=8"]),  # eager attention
    ("pp_1f1b", ["parallel=pp", *STEPS, "train.micro_batch_size=2"]),
    ("pp_gpipe", ["parallel=pp", "parallel.pp_schedule=gpipe", *STEPS, "train.micro_batch_size=4"]),
    ("pp_interleaved", ["parallel=pp", "parallel.pp_schedule=interleaved_1f1b", "parallel.pp_virtual_stages=2", *STEPS,
                        "train.micro_batch_size=2"]),
    ("pp_interleaved_gemma2", ["parallel=pp", "parallel.pp_schedule=interleaved_1f1b", "parallel.pp_virtual_stages=2",
                               *GEMMA2_SLIDING, *STEPS, "train.micro_batch_size=2"]),
    ("pp_ac_full", ["parallel=pp", "parallel.activation_checkpointing=full", *STEPS, "train.micro_batch_size=2"]),
    # Granite scales inputs_embeds inside its base model: the received hidden states must enter a stage's first
    # block unchanged, also from outside the activation-checkpoint wrapper (a recompute sees the same input)
    ("pp_granite", ["parallel=pp", "parallel.activation_checkpointing=full", *GRANITE, *STEPS,
                    "train.micro_batch_size=2"]),
    # LoRA under tensor parallel: the adapters laid out around their sharded base layers (the first one exports)
    ("tp_lora", ["parallel=tp", *LORA, *[s for s in STEPS if "export_final" not in s], "train.micro_batch_size=8"]),
    ("tp_lora_loss_parallel", ["parallel=tp", "parallel.loss_parallel=true", *LORA, *STEPS, "train.micro_batch_size=4"]),
    # the loss inside the output head, chunk by chunk (a 48-token row: 3 chunks of 20): an FSDP2 unit of its own
    # (untied), the root's tied to the embedding (gemma3), and split by sequence under CP (gradients recomputed)
    ("fsdp2_chunked_ce", ["parallel=fsdp2", *CHUNKED, *STEPS, "train.micro_batch_size=4"]),
    ("fsdp2_chunked_ce_gemma3", ["parallel=fsdp2", *FAMILIES["gemma3"], *CHUNKED, *STEPS, "train.micro_batch_size=4"]),
    ("cp_chunked_ce", ["parallel=cp", *CHUNKED, "loss.recompute=true", *STEPS, "train.micro_batch_size=4"]),
    # the teacher laid out like the student: FSDP2-sharded, split by heads under TP (vocab-sharded logits), and
    # fed each rank's part of the sequence under CP
    ("fsdp2_kd", ["parallel=fsdp2", *KD, *STEPS, "train.micro_batch_size=4"]),
    # float8 linear layers (torchao, emulated on CPU) with FSDP2 all-gathering their weights in float8
    ("fsdp2_fp8", ["parallel=fsdp2", "precision=fp8", "precision.emulate=true", "precision.fsdp_float8_all_gather=true",
                   *STEPS, "train.micro_batch_size=4"]),
    # DoRA's magnitudes start as the row norms of the FSDP2-sharded base weights, each rank its own rows
    ("fsdp2_dora", ["parallel=fsdp2", *DORA, *STEPS, "train.micro_batch_size=4"]),
    # the teacher's logits formed chunk by chunk inside the student's head: its FSDP2-sharded head gathered whole
    ("fsdp2_kd_chunked", ["parallel=fsdp2", *KD, *CHUNKED, *STEPS, "train.micro_batch_size=4"]),
    ("tp_kd", ["parallel=tp", "parallel.loss_parallel=true", *KD, *STEPS, "train.micro_batch_size=8"]),
    ("cp_kd", ["parallel=cp", *KD, *STEPS, "train.micro_batch_size=8"]),
    # the teacher cut into stages like the student, forward only; its last stage run per micro-batch in the loss
    ("pp_kd", ["parallel=pp", *KD, *STEPS, "train.micro_batch_size=2"]),
    ("pp_interleaved_kd", ["parallel=pp", "parallel.pp_schedule=interleaved_1f1b", "parallel.pp_virtual_stages=2", *KD,
                           *STEPS, "train.micro_batch_size=2"]),
]
FOUR = [
    ("fsdp2", ["parallel=fsdp2", *STEPS, "train.micro_batch_size=2"]),
    ("hsdp", ["parallel=hsdp", *STEPS, "train.micro_batch_size=2"]),
    ("fsdp2_tp", ["parallel=fsdp2_tp", "parallel.loss_parallel=true", *STEPS, "train.micro_batch_size=4"]),
    ("tp4", ["parallel=tp", *KV4, *STEPS, "train.micro_batch_size=8"]),
    ("hsdp_bf16", ["parallel=hsdp", "precision=bf16", *STEPS, "train.micro_batch_size=2"]),
    ("fsdp2_cp", ["parallel=fsdp2_cp", *STEPS, "train.micro_batch_size=2"]),
    ("cp_tp", ["parallel=fsdp2_tp", "parallel.cp=2", "parallel.loss_parallel=true", *STEPS, "train.micro_batch_size=8"]),
    ("fsdp2_pp", ["parallel=fsdp2_pp", *STEPS, "train.micro_batch_size=2"]),
    ("tp_pp", ["parallel=fsdp2_tp_pp", "parallel.loss_parallel=true", *STEPS, "train.micro_batch_size=4"]),
    ("cp_pp", ["parallel=fsdp2_pp", "parallel.cp=2", *STEPS, "train.micro_batch_size=4"]),
    ("pp4", ["parallel=pp", *STEPS, "train.micro_batch_size=2"]),
    ("fsdp2_pp_interleaved", ["parallel=fsdp2_pp", "parallel.pp_schedule=interleaved_1f1b", "parallel.pp_virtual_stages=2",
                              *STEPS, "train.micro_batch_size=2"]),
    ("fsdp2_tp_lora", ["parallel=fsdp2_tp", *LORA, *STEPS, "train.micro_batch_size=4"]),  # dp 2 x tp 2
    ("tp_pp_lora", ["parallel=fsdp2_tp_pp", *LORA, *STEPS, "train.micro_batch_size=4"]),  # tp 2 x pp 2
    # the teacher's last stage split by heads (vocab-sharded logits) and its stages' blocks by FSDP2 (dp 2 x pp 2)
    ("tp_pp_kd", ["parallel=fsdp2_tp_pp", "parallel.loss_parallel=true", *KD, *STEPS, "train.micro_batch_size=4"]),
    ("fsdp2_pp_kd", ["parallel=fsdp2_pp", *KD, *STEPS, "train.micro_batch_size=2"]),
]
EIGHT = [
    ("fsdp2_tp_pp", ["parallel=fsdp2_tp_pp", *STEPS, "train.micro_batch_size=2"]),  # dp 2 x tp 2 x pp 2
    ("cp_tp_pp", ["parallel=fsdp2_cp_tp_pp", *STEPS, "train.micro_batch_size=4"]),  # cp 2 x tp 2 x pp 2
]


def _spawn(tmp_path_factory, world, checks, teacher: str):
    from layout_workers import run_layouts  # noqa: F401  (importable by the spawned ranks)

    checks = [(name, [o.replace("{teacher}", teacher) for o in over]) for name, over in checks]
    out = str(tmp_path_factory.mktemp(f"ranks{world}"))
    mp.spawn(_entry, args=(world, os.path.join(out, "store"), out, checks), nprocs=world, join=True)
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    assert "error" not in results, results.get("error")
    return results


def _entry(rank, world, store, out, checks):
    from layout_workers import run_layouts

    run_layouts(rank, world, store, out, checks)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> str:
    """A teacher folder: the micro model's architecture with its own (seeded) weights."""
    return save_micro_hf_model(str(tmp_path_factory.mktemp("teacher")))


class _References(dict):
    """{reference name: its one-process run's losses, grad norms, KD losses and final weights}, each trained in this
    process the first time a test asks for it (a selection of tests trains only the references it compares with)."""

    def __init__(self, out, runs: dict):
        super().__init__()
        self.out, self.runs = out, runs

    def __missing__(self, name):
        os.makedirs(self.out / name)
        result = train(str(self.out / name), *self.runs[name], *STEPS, "train.micro_batch_size=8")
        self[name] = {"losses": losses(result), "grad_norms": [r["grad_norm"] for r in result.records],
                      "kd_losses": [r.get("kd_loss") for r in result.records],
                      "weights": {k: v.detach().float().clone() for k, v in result.model.state_dict().items()}}
        return self[name]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, teacher):
    kd = [o.replace("{teacher}", teacher) for o in KD]
    return _References(tmp_path_factory.mktemp("ref"), {
        "llama": [], "llama_kv4": KV4, "gemma2_sliding": GEMMA2_SLIDING, "granite": GRANITE, "lora": LORA,
        "dora": DORA, "kd": kd, **FAMILIES})


def _selected(request, fixture: str, checks: list) -> list:
    """The checks of `fixture`'s spawn that the selected tests need: a test parametrized by a check's name needs
    that one; any other test that uses the fixture needs them all. A whole-file run spawns every check; one test
    (`pytest 'tests/test_parallel_layouts.py::test_x[tp_lora]'`, as scripts/mutants.py runs them) spawns its own."""
    names = {c[0] for c in checks}
    wanted = set()
    for item in request.session.items:
        if item.module is not request.module:
            continue
        params = item.callspec.params if hasattr(item, "callspec") else {}
        if fixture not in item.fixturenames and fixture not in params.values():
            continue
        used = {v for v in params.values() if isinstance(v, str) and v in names}
        if not used:
            return checks
        wanted |= used
    return [c for c in checks if c[0] in wanted]


@pytest.fixture(scope="module")
def two(request, tmp_path_factory, teacher):
    with_extras()  # torchao, for fsdp2_fp8 (the spawned ranks inherit the path)
    return _spawn(tmp_path_factory, 2, _selected(request, "two", tier(TWO)), teacher)


@pytest.fixture(scope="module")
def four(request, tmp_path_factory, teacher):
    return _spawn(tmp_path_factory, 4, _selected(request, "four", tier(FOUR)), teacher)


@pytest.fixture(scope="module")
def eight(request, tmp_path_factory, teacher):
    return _spawn(tmp_path_factory, 8, _selected(request, "eight", tier(EIGHT)), teacher)


def _diff(a, b):
    assert len(a) == len(b) == 6
    return max(abs(x - y) for x, y in zip(a, b))


def _parity(name, got, ref):
    """Assert what every parity check shares and return (max loss diff, max grad-norm diff). Beyond the losses
    (1e-5, which a layout that sums a norm weight's gradient over half the sequence once passed by 9e-6): every
    step's grad norm within GRAD_REL of the one-process run's, every trained weight within WEIGHT_TOL of its
    one-process value, and a replicated parameter's copies (a sequence-parallel norm on each tp rank) bitwise equal."""
    from safetensors.torch import load_file

    d = _diff(got["losses"], ref["losses"])
    g = _diff(got["grad_norms"], ref["grad_norms"])
    rel = max(abs(x - y) / y for x, y in zip(got["grad_norms"], ref["grad_norms"]))
    weights = load_file(got["weights"])
    assert weights.keys() == ref["weights"].keys(), sorted(set(weights) ^ set(ref["weights"]))[:5]
    w, worst = max(((weights[k] - v).abs().max().item(), k) for k, v in ref["weights"].items())
    print(f"{name}: max loss diff {d:.2e}, max grad-norm diff {g:.2e} ({rel:.2e} relative), max weight diff "
          f"{w:.2e} ({worst}), replicated copies that differ: {got['replicated_mismatch'] or 'none'}")
    assert d < TOL and g < 1e-4 and rel < GRAD_REL and w < WEIGHT_TOL, name
    assert got["replicated_mismatch"] == [], name
    return d, g


@pytest.mark.parametrize("name", tier(["tp_llama", "tp_loss_parallel", "tp_no_sp", "fsdp2_tp", "fsdp2_ac_full",
                                       "fsdp2_ac_selective"]))
def test_llama_layouts_on_two_ranks_match_one_process(two, reference, name):
    d, g = _parity(f"2 ranks {name}", two[name], reference["llama"])
    assert d < TOL and g < 1e-4
    assert reference["llama"]["losses"][-1] < reference["llama"]["losses"][0]


@pytest.mark.parametrize("name,ref", [("fsdp2_chunked_ce", "llama"), ("fsdp2_chunked_ce_gemma3", "gemma3"),
                                      ("cp_chunked_ce", "llama")])
def test_chunked_loss_on_two_ranks_matches_one_process_of_full_logits(two, reference, name, ref):
    d, g = _parity(f"2 ranks {name}", two[name], reference[ref])
    assert d < TOL and g < 1e-4


def test_dora_under_fsdp2_matches_one_process(two, reference):
    d, g = _parity("2 ranks fsdp2 dora", two["fsdp2_dora"], reference["dora"])
    assert d < TOL and g < 1e-4
    assert reference["dora"]["losses"] != reference["lora"]["losses"]  # the magnitudes made it DoRA


@pytest.mark.parametrize("name", tier(["fsdp2_kd", "fsdp2_kd_chunked", "tp_kd", "cp_kd", "pp_kd", "pp_interleaved_kd"]))
def test_distillation_on_two_ranks_matches_one_process(two, reference, name):
    _check_distilled(f"2 ranks {name}", two[name], reference)


@pytest.mark.parametrize("name", tier(["tp_pp_kd", "fsdp2_pp_kd"]))
def test_distillation_under_pipeline_compositions_on_four_ranks_matches_one_process(four, reference, name):
    _check_distilled(f"4 ranks {name}", four[name], reference)


def _check_distilled(name, got, reference):
    d, g = _parity(name, got, reference["kd"])
    kd = _diff(got["kd_losses"], reference["kd"]["kd_losses"])  # the KL part, logged beside the blend
    assert d < TOL and g < 1e-4 and kd < TOL
    assert reference["kd"]["losses"] != reference["llama"]["losses"]  # the teacher changed the objective
    assert min(reference["kd"]["kd_losses"]) > 1e-3  # a teacher that differs: the KL term is not 0


@pytest.mark.parametrize("name,ref", [("cp_llama", "llama"), ("cp_gemma2", "gemma2")])
def test_context_parallel_on_two_ranks_matches_one_process(two, reference, name, ref):
    d, g = _parity(f"2 ranks {name}", two[name], reference[ref])
    assert d < TOL and g < 1e-4


@pytest.mark.parametrize("name,ref", tier([("pp_1f1b", "llama"), ("pp_gpipe", "llama"), ("pp_interleaved", "llama"),
                                           ("pp_interleaved_gemma2", "gemma2_sliding"), ("pp_ac_full", "llama"),
                                           ("pp_granite", "granite")]))
def test_pipeline_on_two_ranks_matches_one_process(two, reference, name, ref):
    d, g = _parity(f"2 ranks {name}", two[name], reference[ref])
    rel = max(abs(x - y) / y for x, y in zip(two[name]["grad_norms"], reference[ref]["grad_norms"]))
    assert d < TOL and g < 1e-4 and rel < 1e-4


@pytest.mark.parametrize("name", tier(["fsdp2_pp", "tp_pp", "cp_pp", "pp4", "fsdp2_pp_interleaved"]))
def test_pipeline_compositions_on_four_ranks_match_one_process(four, reference, name):
    d, g = _parity(f"4 ranks {name}", four[name], reference["llama"])
    assert d < TOL and g < 1e-4


@pytest.mark.parametrize("name", tier(["fsdp2_tp_pp", "cp_tp_pp"]))
def test_three_and_four_dimensional_layouts_on_eight_ranks_match_one_process(eight, reference, name):
    d, g = _parity(f"8 ranks {name}", eight[name], reference["llama"])
    assert d < TOL and g < 1e-4


if FULL:  # the full matrix's only (see the module docstring)
    @pytest.mark.parametrize("family", list(FAMILIES))
    def test_tensor_parallel_of_each_family_matches_one_process(two, reference, family):
        d, g = _parity(f"2 ranks tp {family}", two[f"tp_{family}"], reference[family])
        assert d < TOL and g < 1e-4


@pytest.mark.parametrize("name,ref", tier([("fsdp2", "llama"), ("hsdp", "llama"), ("fsdp2_tp", "llama"),
                                           ("tp4", "llama_kv4"), ("fsdp2_cp", "llama"), ("cp_tp", "llama")]))
def test_layouts_on_four_ranks_match_one_process(four, reference, name, ref):
    d, g = _parity(f"4 ranks {name}", four[name], reference[ref])
    assert d < TOL and g < 1e-4


@pytest.mark.parametrize("ranks,name", [p for p in [("two", "tp_lora"), ("two", "tp_lora_loss_parallel"),
                                                     ("four", "fsdp2_tp_lora"), ("four", "tp_pp_lora")]
                                         if FULL or p[1] not in FULL_ONLY])
def test_lora_under_tensor_parallel_matches_one_process(request, reference, ranks, name):
    got, ref = request.getfixturevalue(ranks)[name], reference["lora"]
    d, g = _parity(f"{ranks} ranks {name}", got, ref)
    rel = max(abs(x - y) / y for x, y in zip(got["grad_norms"], ref["grad_norms"]))
    print(f"{name}: max relative grad-norm diff {rel:.2e}")
    assert d < TOL and rel < 1e-4
    assert ref["losses"][-1] < ref["losses"][0]


def test_lora_under_tensor_parallel_exports_a_whole_peft_adapter_that_reloads_onto_its_base(two):
    import torch
    from helpers import random_init_model
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    final = os.path.join(two["tp_lora"]["dir"], "final")
    probe = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46]])
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(final).eval()(probe).logits
        base = random_init_model(seed=42)  # the random-init base is a function of the seed
        bare = base(probe).logits
        adapted = PeftModel.from_pretrained(base, os.path.join(final, "adapter")).eval()
        got = adapted(probe).logits
    # every adapter matrix, whole (gathered from its tp shards), under peft's own names
    saved = load_file(os.path.join(final, "adapter", "adapter_model.safetensors"))
    live = {n.replace(".default", ""): p for n, p in adapted.named_parameters() if "lora_" in n}
    assert saved.keys() == live.keys() and all(saved[k].shape == live[k].shape for k in saved)
    d = (got - merged).abs().max().item()
    print(f"tp=2 LoRA export: adapter on its base vs merged model, max logits diff {d:.2e}")
    assert d < TOL and (bare - merged).abs().max().item() > 1e-3  # the adapter was trained and is applied


def test_hsdp_with_bf16_params_and_fp32_reduce_trains_close_to_fp32(four, reference):
    d = _diff(four["hsdp_bf16"]["losses"], reference["llama"]["losses"])
    print(f"4 ranks hsdp bf16: max loss diff vs fp32 {d:.2e}")
    assert 0 < d < 0.05


def test_fsdp2_with_float8_all_gather_trains_close_to_fp32(two, reference):
    d = _diff(two["fsdp2_fp8"]["losses"], reference["llama"]["losses"])
    print(f"2 ranks fsdp2 fp8 (emulated, float8 all-gather): max loss diff vs fp32 {d:.2e}")
    assert 0 < d < 0.05


def test_fsdp2_holds_one_nth_of_the_parameters_per_rank(four):
    r = four["fsdp2"]
    share = r["full_param_bytes"] / 4
    print("fsdp2 local parameter bytes per rank:", r["local_param_bytes"], "total / 4:", share)
    assert all(abs(b - share) / share < 0.05 for b in r["local_param_bytes"])
    # tp x fsdp shards too: each rank holds about a quarter of the parameters
    r = four["fsdp2_tp"]
    assert all(abs(b - r["full_param_bytes"] / 4) / (r["full_param_bytes"] / 4) < 0.05 for b in r["local_param_bytes"])


@pytest.mark.skipif(not os.environ.get("AUTOMODEL_SLOW_TESTS"), reason="torch.compile costs minutes on 2 CPU cores; "
                    "set AUTOMODEL_SLOW_TESTS=1")
def test_compile_and_activation_checkpointing_under_fsdp2_match_one_process(tmp_path_factory, reference):
    checks = [("compile_ac", ["parallel=fsdp2", "parallel.compile=true", "parallel.activation_checkpointing=full",
                              *STEPS, "train.micro_batch_size=4"])]
    got = _spawn(tmp_path_factory, 2, checks, teacher="")["compile_ac"]
    d, g = _parity("2 ranks fsdp2 + compile + full AC", got, reference["llama"])
    assert d < TOL


def test_parity_script_prints_both_curves_and_their_largest_difference(tmp_path):
    import subprocess
    import sys

    from helpers import MICRO

    script = os.path.join(os.path.dirname(__file__), "..", "scripts", "parity.py")
    proc = subprocess.run(
        [sys.executable, script, "train.micro_batch_size=8", "train.micro_batch_size=4", "--steps", "3",
         "--out", str(tmp_path), "--", "train.global_batch_size=8", *MICRO],
        capture_output=True, text=True, timeout=600, env={**os.environ, "AUTOMODEL_NO_PROGRESS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    rows = [ln.split() for ln in proc.stdout.splitlines() if ln.strip()[:1].isdigit()]
    assert [r[0] for r in rows] == ["1", "2", "3"]
    assert all(abs(float(r[1]) - float(r[2])) < TOL for r in rows)
    assert "largest loss difference:" in proc.stdout and "within tolerance" in proc.stdout
