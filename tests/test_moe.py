"""Mixture-of-experts, CI tier: expert parallel against one process, router losses against transformers, EP
checkpoints, and the refusals.

- the router losses (automodel/moe/router.py) on a one-MoE-layer model equal transformers' own
  `load_balancing_loss_func` (value and every gradient), z-loss its formula;
- one spawned group of 2 ranks: the five families of the issue (tiny checkpoints of tests/model_zoo.py, with
  their own tokenizers) under fsdp2_ep (ep=2), 6 steps, balancing loss on, against one process on the same
  global micro-batches: losses within 1e-5, grad norms within 1e-4 relative, exported final/ logits within
  1e-5; each rank holds exactly half of every expert tensor and reads only its half of the pretrained experts;
  a crash after step 4 resumes bitwise; DeepSeek-V3's correction bias moves as its paper says;
- one spawned group of 4 ranks: ep=4 and ep=2 x pp=2 against one process, and the ep=2 checkpoint resumed
  there (ep=4) and on one process, within 1e-5.

The whole matrix (every family x ep2, ep4, ep x pp, dp x ep x pp on 8 ranks) is scripts/moe_matrix.py.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.multiprocessing as mp
from helpers import compose

import matrix_runs as mr
import model_zoo as mz
from automodel.config import validate
from automodel.errors import UserError

FAMILIES = ["mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss", "olmoe"]
# one micro-batch of 4 per rank, dp 2: the global micro-batch is the one process's micro-batch of 8
# the router's training signals on (matrix_runs.STEPS turns them off for its anchors): balancing loss (the five tiny
# configs' own coefficients differ, DeepSeek-V3 has none) and DeepSeek-V3's correction-bias balancing
ON = ["moe.aux_loss_coef=0.05", "moe.bias_update_rate=0.001"]
EP2 = ["parallel=fsdp2_ep", "train.micro_batch_size=4", *ON]
CKPT = ["checkpoint=dcp", "checkpoint.every_steps=2", "checkpoint.export_final=false"]


# ---------------------------------------------------------------- router losses against transformers
def _one_layer_mixtral(coef: float, z: float | None = None):
    from transformers import AutoModelForCausalLM, MixtralConfig

    cfg = MixtralConfig(vocab_size=128, hidden_size=32, intermediate_size=16, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                        router_aux_loss_coef=coef)
    if z is not None:
        cfg.router_z_loss_coef = z
    torch.manual_seed(0)
    return cfg, AutoModelForCausalLM.from_config(cfg)


def _batch():
    torch.manual_seed(1)
    x = torch.randint(0, 128, (3, 12))
    labels = x.roll(-1, 1).clone()
    labels[:, -1] = -100
    labels[0, 7:] = -100  # a padded row
    labels[1, :3] = -100  # a prompt
    return x, labels


def _router_step(model, cfg, x, labels, **moe):
    from automodel.moe.config import MoEConfig
    from automodel.moe.router import RouterLosses, valid_rows

    router = RouterLosses.attach(model, cfg, MoEConfig(**moe))
    router.begin_step(1)
    router.add_rows(valid_rows(labels))
    logits = model(x).logits
    torch.nn.functional.cross_entropy(logits.reshape(-1, 128), labels.reshape(-1), ignore_index=-100).backward()
    value = router.weighted_step_value().item()
    router.end_step()
    return router, value


def test_balancing_loss_and_its_gradients_equal_transformers_on_one_moe_layer():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    from automodel.moe.router import valid_rows

    cfg, ref = _one_layer_mixtral(0.3)
    _, ours = _one_layer_mixtral(0.3)
    x, labels = _batch()
    out = ref(x, output_router_logits=True)
    ce = torch.nn.functional.cross_entropy(out.logits.reshape(-1, 128), labels.reshape(-1), ignore_index=-100)
    aux = load_balancing_loss_func(out.router_logits, 8, 2, valid_rows(labels).long())
    (ce + 0.3 * aux).backward()
    router, value = _router_step(ours, cfg, x, labels)
    assert abs(value - 0.3 * aux.item()) < 1e-6
    diffs = [(a.grad - b.grad).abs().max().item() for a, b in zip(ref.parameters(), ours.parameters())]
    assert max(diffs) < 1e-6 and ours.model.layers[0].mlp.gate.weight.grad.abs().max() > 1e-4
    logged = router.log_values()
    assert abs(logged["aux_loss"] - aux.item()) < 1e-6
    assert sum(logged["moe_tokens_per_expert"][0]) == 2 * int(valid_rows(labels).sum())  # top-2 of every real token


def test_z_loss_is_the_mean_squared_logsumexp_and_zero_turns_the_balancing_loss_off():
    cfg, ours = _one_layer_mixtral(0.3, z=0.01)
    _, ref = _one_layer_mixtral(0.3)
    x, labels = _batch()
    from automodel.moe.router import valid_rows

    captured = {}
    ref.model.layers[0].mlp.gate.register_forward_hook(lambda m, a, o: captured.update(logits=o[0]))
    logits = ref(x).logits
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, 128), labels.reshape(-1), ignore_index=-100)
    mask = valid_rows(labels).reshape(-1)
    z = torch.logsumexp(captured["logits"].float(), -1).pow(2)[mask].mean()
    (ce + 0.01 * z).backward()
    _, value = _router_step(ours, cfg, x, labels, aux_loss_coef=0.0)
    assert abs(value - 0.01 * z.item()) < 1e-6
    assert max((a.grad - b.grad).abs().max().item() for a, b in zip(ref.parameters(), ours.parameters())) < 1e-6


def test_valid_rows_are_each_rows_positions_up_to_its_last_target():
    from automodel.moe.router import valid_rows

    labels = torch.tensor([[-100, 5, 6, -100, -100], [-100, -100, -100, -100, -100], [1, 2, 3, 4, -100]])
    assert valid_rows(labels).tolist() == [[True, True, True, False, False], [False] * 5, [True] * 4 + [False]]


# ---------------------------------------------------------------- refusals (no processes)
def _spmd(*over):
    return validate(compose(*over)).plugins["parallel"]


def test_expert_parallel_sizes_are_checked_in_one_line():
    from transformers import AutoConfig

    with pytest.raises(UserError, match=r"^parallel.ep=3 does not divide dp_shard=4"):
        _spmd("parallel=fsdp2_ep", "parallel.ep=3").dims(4)
    with pytest.raises(UserError, match=r"^parallel.ep=4 does not divide dp_shard=2 \(world 4 with tp=2\)"):
        _spmd("parallel=fsdp2_ep", "parallel.ep=4", "parallel.tp=2").dims(4)
    with pytest.raises(UserError, match=r"^parallel.ep=0: the expert-parallel size is a positive integer"):
        _spmd("parallel=fsdp2_ep", "parallel.ep=0").dims(2)
    spmd = _spmd("parallel=fsdp2_ep", "parallel.ep=8")
    dims = spmd.dims(8)
    with pytest.raises(UserError, match=r"^parallel.ep=8: llama is a dense model \(no routed experts to split\); "
                                        r"use parallel.ep=1$"):
        spmd.check_model(dims, AutoConfig.for_model("llama"))
    with pytest.raises(UserError, match=r"^parallel.ep=8 does not divide the 6 experts of mixtral; pick an ep "
                                        r"that divides 6$"):
        spmd.check_model(dims, AutoConfig.for_model("mixtral", num_local_experts=6))
    assert spmd.check_model(dims, AutoConfig.for_model("qwen3_moe", num_experts=128)) is None


def test_router_coefficients_are_checked_in_one_line():
    with pytest.raises(UserError, match=r"^moe.aux_loss_coef=-0.1 must be a finite number >= 0"):
        validate(compose("moe.aux_loss_coef=-0.1"))
    with pytest.raises(UserError, match=r"^moe.aux_los: unknown key; valid keys are: aux_loss_coef, z_loss_coef, "
                                        r"bias_update_rate"):
        validate(compose("+moe.aux_los=1"))


def test_experts_implementation_is_checked_and_reaches_the_model_config():
    plugin = lambda *o: validate(compose("model=hf", "model.path=null", *o)).plugins["model"]  # noqa: E731
    moe = ["+model.config.model_type=mixtral"]
    assert plugin(*moe, "model.experts_implementation=eager").hf_config()._experts_implementation == "eager"
    with pytest.raises(UserError, match=r"^model.experts_implementation='fast': choose one of grouped_mm, batched_mm, "
                                        r"eager \(null: grouped_mm\)$"):
        plugin(*moe, "model.experts_implementation=fast").hf_config()
    with pytest.raises(UserError, match=r"^model.experts_implementation='eager': llama has no routed experts"):
        plugin("+model.config.model_type=llama", "model.experts_implementation=eager").hf_config()


def test_ep_presets_compose_on_their_world_sizes():
    assert _spmd("parallel=fsdp2_ep").dims(4).describe() == "dp_shard=4 x ep=2 (of dp_shard)"
    assert _spmd("parallel=fsdp2_ep_pp").dims(8).describe() == "pp=2 x dp_shard=4 x ep=2 (of dp_shard)"


# ---------------------------------------------------------------- spawned groups
@pytest.fixture(scope="module")
def zoo(pytestconfig, tmp_path_factory):
    cache = getattr(pytestconfig, "cache", None)
    root = os.environ.get("AUTOMODEL_MODEL_ZOO") or (str(cache.mkdir("model_zoo")) if cache is not None
                                                     else str(tmp_path_factory.mktemp("model_zoo")))
    return mz.build_zoo(root, FAMILIES), mr.write_tasks(root)


def _spawn(out: str, world: int, plan: list) -> dict:
    mp.spawn(_entry, args=(world, os.path.join(out, f"store{world}"), out, plan), nprocs=world, join=True)
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    assert "error" not in results, results.get("error")
    return {k: {"status": "ok", **v} for k, v in results.items()}


def _entry(rank, world, store, out, plan):
    from ckpt_workers import run_plan

    run_plan(rank, world, store, out, plan, micro=False)


def _one(zoo, out, *extra) -> dict:
    folders, tasks = zoo
    fam = extra[0]
    result = mr.attempt(mr.run_train, out, mr.overrides(folders[fam], tasks, *extra[1:]))
    assert result["status"] == "ok", result
    return result


@pytest.fixture(scope="module")
def references(zoo, tmp_path_factory):
    """One process: each family with the balancing loss on (one micro-batch of 8), and qwen3_moe with micro-batches
    of 4 (what ep=2 x pp=2 groups) and a checkpointed run."""
    out = tmp_path_factory.mktemp("moe_ref")
    refs = {fam: _one(zoo, str(out / fam), fam, *ON) for fam in FAMILIES}
    refs["micro4"] = _one(zoo, str(out / "micro4"), "qwen3_moe", *ON, "train.micro_batch_size=4")
    refs["lora"] = _one(zoo, str(out / "lora"), "olmoe", *ON, "peft=lora")
    refs["kd"] = _one(zoo, str(out / "kd"), "qwen3_moe", *ON, *_kd(zoo))
    return refs


def _kd(zoo) -> list[str]:
    """Distillation from a qwen3_moe teacher of its own (the student's checkpoint, every weight moved a little):
    an MoE teacher, laid out with its experts split like the student's under ep."""
    folders, _ = zoo
    teacher = os.path.join(os.path.dirname(folders["qwen3_moe"]), "qwen3_moe_teacher")
    if not os.path.isfile(os.path.join(teacher, "model.safetensors")):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(folders["qwen3_moe"])
        noise = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=noise) * 0.02)
        model.save_pretrained(teacher)
        AutoTokenizer.from_pretrained(folders["qwen3_moe"]).save_pretrained(teacher)
    return ["teacher=hf", f"teacher.model.path={teacher}", "teacher.kd_ratio=0.5"]


@pytest.fixture(scope="module")
def two(zoo, tmp_path_factory):
    folders, tasks = zoo
    out = str(tmp_path_factory.mktemp("moe2"))
    q = lambda *extra: mr.overrides(folders["qwen3_moe"], tasks, *extra)  # noqa: E731
    plan = [(fam, fam, None, mr.overrides(folders[fam], tasks, *EP2)) for fam in FAMILIES]
    plan += [("tp", "tp", None, q(*ON, "parallel=tp")),  # MoE blocks whole on each tp rank, attention split
             ("lora_ep2", "lora_ep2", None, mr.overrides(folders["olmoe"], tasks, *EP2, "peft=lora")),
             ("kd_ep2", "kd_ep2", None, q(*EP2, *_kd(zoo))),
             ("ckpt_ref", "ckpt_ref", None, q(*EP2, *CKPT, "checkpoint.keep_last=0")),
             ("crash", "resumed", 4, q(*EP2, *CKPT)),
             ("resumed", "resumed", None, q(*EP2, *CKPT, "checkpoint.resume=auto"))]
    return out, _spawn(out, 2, plan)


@pytest.fixture(scope="module")
def four(zoo, two, tmp_path_factory):
    folders, tasks = zoo
    out = str(tmp_path_factory.mktemp("moe4"))
    ckpt = os.path.join(two[0], "ckpt_ref", "checkpoints", "step_00000004")
    q = lambda *extra: mr.overrides(folders["qwen3_moe"], tasks, *extra)  # noqa: E731
    plan = [("ep4", "ep4", None, q(*ON, "parallel=fsdp2_ep", "parallel.ep=4", "train.micro_batch_size=2")),
            ("ep2_pp2", "ep2_pp2", None, q(*ON, "parallel=fsdp2_ep_pp", "train.micro_batch_size=2")),
            ("ep2_tp2", "ep2_tp2", None, q(*EP2, "parallel.tp=2")),
            ("ep2_cp2", "ep2_cp2", None, q(*EP2, "parallel.cp=2")),
            ("ep4_resumed", "ep4_resumed", None, q(*ON, "parallel=fsdp2_ep", "parallel.ep=4", "train.micro_batch_size=2",
                                                   *CKPT, f"checkpoint.resume={ckpt}"))]
    return out, _spawn(out, 4, plan)


def _assert_matches(got: dict, ref: dict) -> None:
    outcome = mr.compare(got, ref)
    assert outcome["status"] == "ok", outcome


@pytest.mark.parametrize("family", FAMILIES)
def test_ep2_equals_one_process_with_the_balancing_loss(two, references, family):
    _, r = two
    _assert_matches(r[family], references[family])
    assert "aux_loss" in r[family]["records"][0] and r[family]["records"][0]["aux_loss"] > 0.5
    # the loss logged is the one trained: cross-entropy plus 0.05 x the balancing loss
    assert references[family]["losses"][0] != pytest.approx(r[family]["records"][0]["aux_loss"])


def test_distilling_an_moe_student_from_an_moe_teacher_under_ep2_equals_one_process(two, references):
    _, r = two
    _assert_matches(r["kd_ep2"], references["kd"])
    got, ref = ([rec["kd_loss"] for rec in x["records"]] for x in (r["kd_ep2"], references["kd"]))
    assert max(abs(a - b) for a, b in zip(got, ref)) < 1e-5 and min(ref) > 1e-3  # the teacher's KL, not 0


def test_each_rank_holds_half_of_every_expert_tensor_and_reads_only_its_half(two, zoo):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from automodel.moe.experts import experts_modules

    _, r = two
    folders, _ = zoo
    for fam in FAMILIES:
        full = sum(p.numel() for _, m in experts_modules(AutoModelForCausalLM.from_pretrained(folders[fam]))
                   for p in m.parameters(recurse=False))
        assert r[fam]["expert_numel"] == [full // 2, full // 2], fam
        with safe_open(os.path.join(folders[fam], "model.safetensors"), "pt") as f:
            stored = sum(f.get_slice(k).get_shape().numel() if hasattr(f.get_slice(k).get_shape(), "numel")
                         else int(torch.tensor(f.get_slice(k).get_shape()).prod()) for k in f.keys())
        # experts split by ep, everything else by FSDP: each rank reads its half (small replicated buffers aside)
        assert all(n <= 0.51 * stored for n in r[fam]["hf_read_numel"]), (fam, r[fam]["hf_read_numel"], stored)


def test_ep_resume_is_bitwise(two):
    out, r = two
    from safetensors.torch import load_file

    assert r["resumed"]["steps"] == [5, 6]
    assert r["resumed"]["losses"] == r["ckpt_ref"]["losses"][4:]
    a, b = (load_file(os.path.join(out, f"{n}.safetensors")) for n in ("ckpt_ref", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_an_ep2_checkpoint_resumes_on_one_process(two, zoo, tmp_path):
    out, r = two
    ckpt = os.path.join(out, "ckpt_ref", "checkpoints", "step_00000004")
    one = _one(zoo, str(tmp_path / "one"), "qwen3_moe", *ON, "train.micro_batch_size=8", *CKPT,
               f"checkpoint.resume={ckpt}")
    assert len(one["losses"]) == 2
    assert max(abs(a - b) for a, b in zip(one["losses"], r["ckpt_ref"]["losses"][4:])) < 1e-5


def test_deepseek_correction_bias_follows_the_load(two, zoo):
    """DeepSeek-V3's routers keep e_score_correction_bias; after 6 steps at rate 1e-3 each entry moved by a
    multiple of 1e-3 (sign steps), and the one-process run moved them identically (checked through the logits)."""
    out, r = two
    from safetensors.torch import load_file

    folders, _ = zoo
    start = load_file(os.path.join(folders["deepseek_v3"], "model.safetensors"))
    end = load_file(os.path.join(out, "deepseek_v3.safetensors"))
    moved = [(end[k] - start[k]) for k in end if k.endswith("e_score_correction_bias")]
    assert moved and all(m.abs().max() > 0 for m in moved)
    for m in moved:
        steps = m / 1e-3
        assert torch.allclose(steps, steps.round(), atol=1e-3) and steps.abs().max() <= 6


def test_moe_under_tp_and_lora_under_ep_equal_one_process(two, references, zoo):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, r = two
    _assert_matches(r["tp"], references["qwen3_moe"])
    _assert_matches(r["lora_ep2"], references["lora"])
    # LoRA on attention only (experts are opt-in: peft.target_experts); the adapter loads with peft
    folders, _ = zoo
    final = r["lora_ep2"]["final_dir"]
    base = AutoModelForCausalLM.from_pretrained(folders["olmoe"])
    adapted = PeftModel.from_pretrained(base, os.path.join(final, "adapter"))
    assert not any("experts" in n or ".gate." in n for n, _ in adapted.named_parameters() if "lora_" in n)
    probe = mr.probe_batch()
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(final)(probe).logits
        assert (adapted(probe).logits - merged).abs().max() < 1e-5


def test_ep4_and_ep_by_pp_tp_cp_equal_one_process(four, references):
    _, r = four
    _assert_matches(r["ep4"], references["qwen3_moe"])
    _assert_matches(r["ep2_pp2"], references["micro4"])
    _assert_matches(r["ep2_tp2"], references["qwen3_moe"])
    _assert_matches(r["ep2_cp2"], references["qwen3_moe"])
    assert len(set(r["ep4"]["expert_numel"])) == 1


def test_an_ep2_checkpoint_resumes_on_ep4(four, two):
    _, r4 = four
    _, r2 = two
    got = r4["ep4_resumed"]["losses"]
    assert len(got) == 2 and max(abs(a - b) for a, b in zip(got, r2["ckpt_ref"]["losses"][4:])) < 1e-5
