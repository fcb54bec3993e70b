"""Knowledge distillation (`teacher=hf`): the KL term itself, a teacher equal to the student adding nothing, the
logged parts of the objective, the student moving toward the teacher, and the refusals. Its 2-rank parity
(FSDP2, TP with vocab-sharded logits, CP) against one process is in tests/test_parallel_layouts.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer
from helpers import random_init_model, save_micro_hf_model, train

from automodel.distill import token_sum_kl
from automodel.errors import UserError

STEPS = ["train.max_steps=4", "train.log_every=1", "train.global_batch_size=8", "train.sample_prompts=0"]


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_token_sum_kl_is_kl_div_over_target_tokens_and_zero_for_the_same_distribution(temperature):
    torch.manual_seed(0)
    student = torch.randn(2, 9, 40, requires_grad=True)
    teacher = torch.randn(2, 9, 40)
    labels = torch.randint(0, 40, (2, 9))
    labels[:, :3] = -100
    got = token_sum_kl(student, teacher, labels, temperature)
    mask = (labels != -100).unsqueeze(-1).float()
    per_token = F.kl_div(F.log_softmax(student / temperature, -1), F.log_softmax(teacher / temperature, -1),
                         log_target=True, reduction="none")
    want = (per_token * mask).sum() * temperature ** 2
    assert abs(got.item() - want.item()) <= 1e-5 * want.item()
    (g,) = torch.autograd.grad(got, student)
    (w,) = torch.autograd.grad(want, student)
    assert (g - w).abs().max().item() < 1e-6
    assert abs(token_sum_kl(student, student.detach(), labels, temperature).item()) <= 1e-6


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Teacher folders of the micro model's architecture: `same` (the weights a random-init student starts from),
    `other` (its own weights) and `wide` (64 more tokens in its vocabulary)."""
    root = tmp_path_factory.mktemp("kd")
    same = str(root / "same")
    random_init_model().save_pretrained(same, safe_serialization=True)
    AutoTokenizer.from_pretrained(save_micro_hf_model(str(root / "tok"))).save_pretrained(same)
    other = save_micro_hf_model(str(root / "other"), "model.config.initializer_range=0.2")
    wide = save_micro_hf_model(str(root / "wide"), "model.config.vocab_size=448")
    return {"same": same, "other": other, "wide": wide}


def test_a_teacher_equal_to_the_student_adds_nothing_and_the_parts_are_logged(folders, tmp_path):
    (tmp_path / "alone").mkdir()
    (tmp_path / "kd").mkdir()
    student = [*STEPS, "checkpoint.export_final=true"]
    alone = train(str(tmp_path / "alone"), *student)
    kd = train(str(tmp_path / "kd"), *student, "teacher=hf", f"teacher.model.path={folders['same']}",
               "teacher.kd_ratio=0.25")
    first = kd.records[0]
    assert abs(first["kd_loss"]) <= 1e-6  # step 1: the student is still the teacher
    assert abs(first["ce_loss"] - alone.records[0]["loss"]) <= 1e-6
    for r in kd.records:  # `loss` is the objective trained: the blend of its logged parts
        assert abs(r["loss"] - (0.75 * r["ce_loss"] + 0.25 * r["kd_loss"])) <= 1e-5
    assert kd.records[-1]["kd_loss"] > 1e-6  # once the student moved, the term is live
    # the export is the student alone: the teacher is never written
    import safetensors.torch

    exported = safetensors.torch.load_file(f"{kd.final_dir}/model.safetensors")
    assert set(exported) == set(safetensors.torch.load_file(f"{alone.final_dir}/model.safetensors"))


def test_distillation_pulls_the_student_toward_the_teacher(folders, tmp_path):
    """kd_ratio=1 (the teacher's distribution the only signal) against kd_ratio=0 (the labels only, the KL still
    measured) on the same batches: the distilled student ends closer to the teacher, and its objective is the KL."""
    kl = {}
    for ratio in ("0.0", "1.0"):
        (tmp_path / ratio).mkdir()
        run = train(str(tmp_path / ratio), *STEPS, "train.max_steps=8", "optim.warmup_steps=0", "optim.lr=3e-3", "teacher=hf",
                    f"teacher.model.path={folders['other']}", f"teacher.kd_ratio={ratio}")
        kl[ratio] = [r["kd_loss"] for r in run.records]
        target = "kd_loss" if ratio == "1.0" else "ce_loss"
        assert all(r["loss"] == pytest.approx(r[target], abs=1e-6) for r in run.records)
    assert kl["0.0"][0] == pytest.approx(kl["1.0"][0], abs=1e-6)  # the same start
    print("KL at the last step: labels only %.4f, distilled %.4f" % (kl["0.0"][-1], kl["1.0"][-1]))
    assert kl["1.0"][-1] < 0.9 * kl["0.0"][-1], kl


def test_teachers_that_cannot_teach_are_refused_in_one_line(folders, tmp_path):
    def refused(*overrides):
        with pytest.raises(UserError) as e:
            train(str(tmp_path), *STEPS, "teacher=hf", *overrides)
        assert "\n" not in str(e.value)
        return str(e.value)

    assert "one vocabulary" in refused(f"teacher.model.path={folders['wide']}")
    assert "teacher.kd_ratio=1.5" in refused(f"teacher.model.path={folders['same']}", "teacher.kd_ratio=1.5")
    assert "teacher.model.path" in refused("teacher.model.path=/nonexistent/teacher")


def test_a_teacher_the_layout_cannot_serve_is_refused_in_one_line_naming_it(tmp_path):
    """The teacher is laid out like the student: one that cannot be (under pp: tied embeddings, too few layers;
    under ep: no experts) is refused before the student is laid out, named as the teacher."""
    from helpers import compose

    from automodel.config import validate
    from automodel.engine import teacher

    for layout, override, expected in [
            ("parallel=pp", "model.config.tie_word_embeddings=true",
             "parallel.pp>1: the model ties its input embedding to its output head"),
            ("parallel=pp", "model.config.num_hidden_layers=1",
             "parallel.pp=2 x pp_virtual_stages=1 = 2 stages need at least 2 layers; the model has 1"),
            # expert parallel splits experts: a dense teacher (of an MoE student) has none
            ("parallel=fsdp2_ep", "model.config.num_hidden_layers=2", "parallel.ep=2: llama is a dense model")]:
        folder = save_micro_hf_model(str(tmp_path / f"{layout[9:]}_{override.split('=')[0].split('.')[-1]}"), override)
        p = validate(compose(layout, "teacher=hf", f"teacher.model.path={folder}")).plugins
        with pytest.raises(UserError) as e:
            teacher.check(p["teacher"], p["loss"], p["parallel"], p["parallel"].dims(2), None, None, "student")
        assert str(e.value).startswith(f"teacher {p['teacher'].model.name!r}: {expected}"), str(e.value)
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("recompute", ["false", "true"])
def test_distilling_inside_the_head_chunk_by_chunk_equals_distilling_from_full_logits(folders, tmp_path, recompute):
    """loss=chunked_ce with a teacher: the teacher's head hands back hidden states and both models' logits are
    formed a chunk of 20 tokens at a time inside the student's head; the same objective, parts and weights as
    loss=ce with full logits, to 1e-5."""
    import torch.distributed.checkpoint.state_dict as sd

    run = [*STEPS, "train.max_steps=5", "optim.warmup_steps=0", "optim.lr=3e-3", "teacher=hf",
           f"teacher.model.path={folders['other']}", "teacher.kd_ratio=0.5", "teacher.temperature=2.0"]
    (tmp_path / "full").mkdir()
    (tmp_path / "chunked").mkdir()
    full = train(str(tmp_path / "full"), *run, "checkpoint.export_final=false")
    chunked = train(str(tmp_path / "chunked"), *run, "checkpoint.export_final=false", "loss=chunked_ce",
                    "loss.chunk_tokens=20", f"loss.recompute={recompute}")
    for a, b in zip(full.records, chunked.records, strict=True):
        for key in ("loss", "ce_loss", "kd_loss", "grad_norm"):
            assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(a[key])), (key, a, b)
    assert chunked.records[-1]["kd_loss"] > 1e-3  # a live KL term, not a vanishing one
    wa, wb = (sd.get_model_state_dict(r.model) for r in (full, chunked))
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5
