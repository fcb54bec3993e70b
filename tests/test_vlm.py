"""Image-text models (tiny random Gemma 3, LLaVA, Qwen2.5-VL and Qwen3-VL checkpoints with their processors,
tests/vlm_zoo.py) trained on the bundled `shapes` conversations with `model=hf model.path=<folder> data=vlm`: the
targets are the assistant turns only, the first step's loss is what a hand-written forward computes on the same
batch, 2-rank FSDP2 (and LoRA) equal one process, and the export loads with AutoModelForImageTextToText +
AutoProcessor with equal logits. The Qwen families need torchvision (scripts/vlm_torchvision.sh runs them)."""

from __future__ import annotations

import json
import os

import pytest
import torch
import vlm_zoo

from automodel.batch import IGNORE_INDEX
from automodel.errors import UserError

FAMILIES = [pytest.param(family, marks=pytest.mark.skipif(
    family not in vlm_zoo.FAMILIES, reason=f"{family}'s processor needs torchvision "
    "(python -m automodel.install_torchvision; scripts/vlm_torchvision.sh runs these in a venv that has it)"))
    for family in ("gemma3", "llava", *vlm_zoo.NEEDS_TORCHVISION)]
BUILT = list(vlm_zoo.FAMILIES)
# the 60 held-out conversations (local image paths) as the training data: encoding 3,000 costs the tests seconds
DATA = ["data=shapes", "data.path=${asset:shapes/val.jsonl}", "data.val_path=null", "train.seq_len=64",
        "train.sample_prompts=0", "train.global_batch_size=4", "train.log_every=1", "optim.warmup_steps=0"]
STEPS = 6


@pytest.fixture(scope="session")
def vlm_folders(pytestconfig, tmp_path_factory):
    cache = getattr(pytestconfig, "cache", None)
    root = str(cache.mkdir("vlm_zoo")) if cache is not None else str(tmp_path_factory.mktemp("vlm_zoo"))
    return {family: vlm_zoo.build(root, family) for family in BUILT}


def _plugins(folder, *overrides):
    from automodel.compose import compose
    from automodel.config import validate

    checked = validate(compose(["model=hf", f"model.path={folder}", *DATA, *overrides]))
    model, data = checked.plugins["model"], checked.plugins["data"]
    data.use_processor(model.processor())
    return model, data


@pytest.mark.parametrize("family", FAMILIES)
def test_targets_are_the_assistant_answer_and_its_closing_tokens_never_an_image_token(vlm_folders, family):
    model, data = _plugins(vlm_folders[family])
    tok, processor = model.tokenizer(), model.processor()
    records = data.records("train")
    examples, stats = data.encode(tok, records, 64)
    assert len(examples) == len(records) and stats.dropped == 0
    image_ids = data._image_token_ids()
    assert image_ids, "the processor's image tokens were not found"
    for example, record in list(zip(examples, records.rows))[:20]:
        answer = record["messages"][1]["content"][0]["text"]
        targets = tok.decode([t for t in example.labels if t != IGNORE_INDEX])
        assert targets.startswith(answer) and len(targets) <= len(answer) + 20, (targets, answer)
        assert not image_ids & {t for t in example.labels if t != IGNORE_INDEX}
        expanded = processor(text=[example.text], images=[data_image(record)], return_tensors="pt",
                             add_special_tokens=False)
        assert expanded["input_ids"][0, :-1].tolist() == list(example.ids)  # with the image tokens the model expects


def data_image(record):
    from PIL import Image

    from automodel.config import RESOURCES

    return Image.open(os.path.join(RESOURCES, "shapes", record["images"][0])).convert("RGB")


@pytest.mark.parametrize("family", FAMILIES)
def test_first_step_loss_equals_a_hand_written_forward_and_the_export_loads_with_equal_logits(vlm_folders, family,
                                                                                               tmp_path, capsys):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from automodel.compose import compose
    from automodel.engine.run import train

    folder = vlm_folders[family]
    model_plugin, data = _plugins(folder)
    batch = next(data.build(model_plugin.tokenizer(), seq_len=64, seed=42, dp_rank=0, dp_size=1, global_batch_size=4,
                            micro_batch_size=4))
    reference = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32)
    inputs = {k: v for k, v in batch.micro_batches[0].items() if k != "labels"}
    labels = batch.micro_batches[0]["labels"]
    with torch.no_grad():
        logits = reference(**inputs).logits
    by_hand = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)

    result = train(compose(["model=hf", f"model.path={folder}", *DATA, "train.max_steps=2"]), str(tmp_path))
    assert result.records[0]["loss"] == pytest.approx(by_hand.item(), abs=1e-5)
    assert result.records[1]["loss"] < result.records[0]["loss"] + 0.5  # it trains (no NaN, no blow-up)

    final = os.path.join(str(tmp_path), "final")
    exported = AutoModelForImageTextToText.from_pretrained(final, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(final)
    assert type(processor).__name__ == type(model_plugin.processor()).__name__
    trained = result.model.eval()
    with torch.no_grad():
        diff = (exported(**inputs).logits - trained(**inputs).logits).abs().max().item()
    assert diff < 1e-5, diff

    # `automodel generate FOLDER --image PATH QUESTION` answers with the exported model's own greedy answer
    from automodel.config import RESOURCES
    from automodel.generate import answer, main

    image = os.path.join(RESOURCES, "shapes", "images", "val_0000.png")
    main([final, "--image", image, "What colour are the shapes?", "--max-new-tokens", "4"])
    expected = answer(exported, processor, image, "What colour are the shapes?", 4).strip()
    assert capsys.readouterr().out.strip() == f"What colour are the shapes? -> {expected}".strip()


TWO_RANK = [pytest.param(p.values[0], layout, marks=p.marks) for p in FAMILIES for layout in ("full", "lora")]
LAYOUT = {"full": [], "lora": ["peft=lora"]}


def _common(folder, layout):
    return ["model=hf", f"model.path={folder}", *DATA, f"train.max_steps={STEPS}", "checkpoint.export_final=false",
            *LAYOUT[layout]]


@pytest.fixture(scope="module")
def two_rank_losses(vlm_folders, tmp_path_factory):
    """{(family, layout): outcome} of every 2-rank FSDP2 check, run by one spawned group (one start-up for all)."""
    import matrix_runs as mr

    checks = [(f"{family}/{layout}", [*_common(vlm_folders[family], layout), "parallel=fsdp2"])
              for family in BUILT for layout in LAYOUT]
    got = mr.run_spawned(checks, str(tmp_path_factory.mktemp("vlm_ranks2")), pg_timeout_s=60, deadline_s=600)
    return {tuple(name.split("/")): outcome for name, outcome in got.items()}


@pytest.mark.parametrize("family, layout", TWO_RANK)
def test_two_rank_fsdp2_equals_one_process(vlm_folders, two_rank_losses, family, layout, tmp_path):
    from automodel.compose import compose
    from automodel.engine.run import train

    one = [r["loss"] for r in train(compose(_common(vlm_folders[family], layout)), str(tmp_path)).records]
    two = two_rank_losses[(family, layout)]
    assert two["status"] == "ok", two.get("traceback") or two
    assert len(one) == STEPS
    assert two["losses"] == pytest.approx(one, abs=1e-5)


def test_a_text_model_with_vlm_data_and_bad_records_are_one_line(vlm_folders, tmp_path):
    from automodel.compose import compose
    from automodel.config import validate

    checked = validate(compose(["data=shapes"]))  # the tiny text model
    data, model = checked.plugins["data"], checked.plugins["model"]
    data.use_processor(model.processor())
    with pytest.raises(UserError, match=r"data=vlm needs an image-text model"):
        data.encode(model.tokenizer(), data.records("train"), 64)

    image = {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "colour?"}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "red"}]}]}
    (tmp_path / "corrupt.png").write_bytes(b"not a png at all")
    cases = {
        "missing": ({**image, "images": ["nowhere.png"]}, r"record 2: image '.*nowhere.png' does not exist"),
        "corrupt": ({**image, "images": ["corrupt.png"]}, r"record 2: image '.*corrupt.png' cannot be read as an image"),
        "url": ({**image, "images": ["https://example.com/a.png"]}, r"record 2: image 'https://example.com/a.png' is a URL"),
        "count": ({**image, "images": []}, r"record 2 has 1 image part\(s\) in its messages but 0 image\(s\)"),
    }
    from automodel.config import RESOURCES

    good = {**image, "images": [os.path.join(RESOURCES, "shapes", "images", "val_0001.png")]}
    for name, (bad, message) in cases.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
        model, data = _plugins(vlm_folders["gemma3"], f"data.path={path}")
        with pytest.raises(UserError, match=message):
            data.encode(model.tokenizer(), data.records("train"), 64)
    model, data = _plugins(vlm_folders["gemma3"], f"data.path={tmp_path / 'corrupt.jsonl'}", "data.bad_images=skip")
    examples, stats = data.encode(model.tokenizer(), data.records("train"), 64)
    assert len(examples) == 1 and stats.skipped == {"records with an unreadable image": 1}
    with pytest.raises(UserError, match=r"data=vlm: packing is not supported"):
        _plugins(vlm_folders["gemma3"], "data.packing=true")


@pytest.mark.parametrize("family", FAMILIES)
def test_freeze_picks_what_trains_and_lora_leaves_frozen_parts_alone(vlm_folders, family):
    from automodel.compose import compose
    from automodel.config import validate
    from automodel.model.vision import parts

    def trainable(*overrides):
        checked = validate(compose(["model=hf", f"model.path={vlm_folders[family]}", *DATA, *overrides]))
        model = checked.plugins["peft"].apply(checked.plugins["model"].build("meta"))
        return {n for n, p in model.named_parameters() if p.requires_grad}

    plain = checked_model = validate(compose(["model=hf", f"model.path={vlm_folders[family]}", *DATA,
                                              "model.freeze=[]"])).plugins["model"].build("meta")
    split = {k: {n for n, _ in v} for k, v in parts(checked_model, checked_model.config).items()}
    assert all(split.values()), {k: len(v) for k, v in split.items()}  # every part found
    assert trainable("model.freeze=[]") == {n for n, _ in plain.named_parameters()}
    assert trainable() == split["projector"] | split["language"]  # the default: the vision tower is frozen
    assert trainable("model.freeze=[vision,language]") == split["projector"]
    lora = trainable("peft=lora")
    assert lora and all("lora_" in n for n in lora)
    assert not any(n.split(".lora_")[0].removeprefix("base_model.model.") in {m.rsplit(".", 1)[0] for m in
                                                                                split["vision"]} for n in lora)
    assert any("language_model" in n for n in lora)
    with pytest.raises(UserError, match=r"model.freeze: 'eyes' is not a part of an image-text model; choose from "
                                        r"vision, projector, language"):
        trainable("model.freeze=[eyes]")
    with pytest.raises(UserError, match=r"model.freeze=\['vision'\]: random-init llama is a text model"):
        validate(compose(["model.freeze=[vision]"])).plugins["model"].build("meta")


@pytest.mark.parametrize("layout, refused", [("parallel=tp", "tp=2"), ("parallel=pp", "pp=2"), ("parallel=cp", "cp=2")])
def test_layouts_other_than_fsdp2_are_refused_in_one_line_for_an_image_text_model(vlm_folders, layout, refused):
    from automodel.compose import compose
    from automodel.config import validate

    checked = validate(compose(["model=hf", f"model.path={vlm_folders['llava']}", *DATA, layout]))
    parallel = checked.plugins["parallel"]
    dims = parallel.dims(2)
    with pytest.raises(UserError, match=rf"^{refused}: llava is an image-text model, which trains here under "
                                        r"FSDP2/HSDP \(data parallelism\) only; use parallel=fsdp2 or hsdp$"):
        parallel.check_model(dims, checked.plugins["model"].hf_config())
