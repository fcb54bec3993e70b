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

# every family this environment can build: the Qwen and LLaVA-OneVision processors need torchvision
FAMILIES = list(vlm_zoo.FAMILIES)
# the 60 held-out conversations (local image paths) as the training data: encoding 3,000 costs the tests seconds
DATA = ["data=shapes", "data.path=${asset:shapes/val.jsonl}", "data.val_path=null", "train.seq_len=64",
        "train.sample_prompts=0", "train.global_batch_size=4", "train.log_every=1", "optim.warmup_steps=0"]
STEPS = 6


MISSING = [f for f in vlm_zoo.NEEDS_TORCHVISION if f not in FAMILIES]
if MISSING:  # said once, as a skip, rather than a skip per test and family
    def test_families_whose_processor_needs_torchvision_are_left_to_an_environment_with_it():
        pytest.skip(f"{', '.join(MISSING)}: their processors need torchvision, which does not import here (python -m "
                    "automodel.install_torchvision installs the build matching torch; scripts/vlm_torchvision.sh "
                    "runs every test of this file with them)")


@pytest.fixture(scope="session")
def vlm_folders(pytestconfig, tmp_path_factory):
    cache = getattr(pytestconfig, "cache", None)
    root = str(cache.mkdir("vlm_zoo")) if cache is not None else str(tmp_path_factory.mktemp("vlm_zoo"))
    return {family: vlm_zoo.build(root, family) for family in FAMILIES}


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


def test_a_datasets_folder_with_an_image_column_encodes_as_the_jsonl_with_image_paths(vlm_folders, tmp_path):
    """The same 60 conversations as a `save_to_disk` folder whose `images` column holds the pictures (a datasets
    Image feature, as hub datasets ship them): the same token ids and targets as from local paths."""
    import datasets

    from automodel.config import RESOURCES

    with open(os.path.join(RESOURCES, "shapes", "val.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    table = datasets.Dataset.from_dict(
        {"messages": [r["messages"] for r in rows],
         "images": [[{"bytes": open(os.path.join(RESOURCES, "shapes", p), "rb").read(), "path": None}
                     for p in r["images"]] for r in rows]},  # the bytes themselves, no path to fall back on
        features=datasets.Features({"messages": datasets.Dataset.from_list(rows[:1]).features["messages"],
                                    "images": datasets.Sequence(datasets.Image())}))
    table.save_to_disk(str(tmp_path / "shapes_ds"))
    model, from_paths = _plugins(vlm_folders["llava"])
    _, from_folder = _plugins(vlm_folders["llava"], f"data.path={tmp_path / 'shapes_ds'}")
    tok = model.tokenizer()
    a, _ = from_paths.encode(tok, from_paths.records("train"), 64)
    b, _ = from_folder.encode(tok, from_folder.records("train"), 64)
    assert len(a) == len(b) == 60
    assert [(x.ids, x.labels) for x in a] == [(y.ids, y.labels) for y in b]
    batch = next(from_folder.build(tok, seq_len=64, seed=42, dp_rank=0, dp_size=1, global_batch_size=4,
                                   micro_batch_size=4))
    assert batch.micro_batches[0]["pixel_values"].shape[0] == 4


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


# 2-rank layout -> (its overrides, the one-process reference it must equal)
LAYOUTS = {"fsdp2": (["parallel=fsdp2"], "full"), "fsdp2_lora": (["parallel=fsdp2", "peft=lora"], "lora"),
           "tp": (["parallel=tp"], "full"), "tp_lora": (["parallel=tp", "peft=lora"], "lora"),
           # recomputed blocks: the language model must not fill a KV cache in training (its own sub-config's)
           "ac": (["parallel=fsdp2", "parallel.activation_checkpointing=full"], "full")}
REFERENCES = {"full": [], "lora": ["peft=lora"]}
# transformers' own plan for Qwen3-VL shards nothing inside its decoder blocks: tensor parallel is refused
TP_REFUSED = {"qwen3_vl"}
TWO_RANK = [(family, layout) for family in FAMILIES for layout in LAYOUTS]


def _common(folder, reference):
    return ["model=hf", f"model.path={folder}", *DATA, f"train.max_steps={STEPS}", "checkpoint.export_final=false",
            *REFERENCES[reference]]


@pytest.fixture(scope="module")
def two_rank_losses(vlm_folders, tmp_path_factory):
    """{(family, layout): outcome} of every 2-rank check, run by one spawned group (one start-up for all)."""
    import spawned_group

    checks = [(f"{family}/{layout}", [*_common(vlm_folders[family], reference), *over])
              for family in FAMILIES for layout, (over, reference) in LAYOUTS.items()]
    got = spawned_group.run_spawned(checks, str(tmp_path_factory.mktemp("vlm_ranks2")), pg_timeout_s=60, deadline_s=600)
    return {tuple(name.split("/")): outcome for name, outcome in got.items()}


@pytest.fixture(scope="module")
def one_process_losses(vlm_folders, tmp_path_factory):
    """{(family, reference): (losses, grad norms)}, each trained once in this process when a test first asks for it."""
    from automodel.compose import compose
    from automodel.engine.run import train

    done = {}

    def losses(family, reference):
        if (family, reference) not in done:
            out = tmp_path_factory.mktemp(f"one_{family}_{reference}")
            records = train(compose(_common(vlm_folders[family], reference)), str(out)).records
            done[(family, reference)] = [r["loss"] for r in records], [r["grad_norm"] for r in records]
        return done[(family, reference)]
    return losses


@pytest.mark.parametrize("family, layout", TWO_RANK)
def test_two_rank_layouts_equal_one_process(two_rank_losses, one_process_losses, family, layout):
    two = two_rank_losses[(family, layout)]
    if family in TP_REFUSED and layout.startswith("tp"):
        assert two["status"] == "refused", two
        assert two["reason"].startswith("parallel.tp>1: the tensor-parallel plan of ") and (
            "shards no layer inside its decoder blocks" in two["reason"]), two
        return
    assert two["status"] == "ok", two.get("traceback") or two
    one, one_grad_norms = one_process_losses(family, LAYOUTS[layout][1])
    assert len(one) == STEPS
    assert two["losses"] == pytest.approx(one, abs=1e-5)
    assert two["grad_norms"] == pytest.approx(one_grad_norms, rel=1e-5)
    assert two["replicated_mismatch"] == []  # a replicated parameter's copies (a norm on each tp rank) are equal


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
    # LoRA on the vision tower alone, or on it beside the language model
    vision_modules = {m.rsplit(".", 1)[0] for m in split["vision"]}

    def adapted(names):
        return {n.split(".lora_")[0].removeprefix("base_model.model.") for n in names}
    only_vision = adapted(trainable("model.freeze=[language,projector]", "peft=lora"))
    assert only_vision and only_vision <= vision_modules, only_vision - vision_modules
    both = adapted(trainable("model.freeze=[]", "peft=lora"))
    assert both & vision_modules and any("language_model" in n for n in both)
    with pytest.raises(UserError, match=r"model.freeze: 'eyes' is not a part of an image-text model; choose from "
                                        r"vision, projector, language"):
        trainable("model.freeze=[eyes]")
    with pytest.raises(UserError, match=r"model.freeze=\['vision'\]: random-init llama is a text model"):
        validate(compose(["model.freeze=[vision]"])).plugins["model"].build("meta")


@pytest.mark.parametrize("layout, refused", [("parallel=pp", "pp=2"), ("parallel=cp", "cp=2")])
def test_pipeline_and_context_parallel_are_refused_in_one_line_for_an_image_text_model(vlm_folders, layout, refused):
    from automodel.compose import compose
    from automodel.config import validate

    checked = validate(compose(["model=hf", f"model.path={vlm_folders['llava']}", *DATA, layout]))
    parallel = checked.plugins["parallel"]
    dims = parallel.dims(2)
    with pytest.raises(UserError, match=rf"^{refused}: llava is an image-text model, which trains here under "
                                        r"FSDP2/HSDP and tensor parallel only; use parallel=fsdp2, hsdp or tp$"):
        parallel.check_model(dims, checked.plugins["model"].hf_config())


def test_plan_counts_language_blocks_and_vision_activations_only_when_the_tower_trains(vlm_folders, capsys):
    """`automodel plan` of an image-text model: the activation estimate multiplies the language model's blocks (not
    every block _no_split_modules lists), and adds the vision blocks' only when their weights train."""
    import re

    from automodel.cli_plan import main

    def plan(*overrides):
        main(["model=hf", f"model.path={vlm_folders['gemma3']}", *DATA, "plan.world_size=2", "plan.gpu=h100",
              "parallel=fsdp2", *overrides])
        out = capsys.readouterr().out
        activations = float(re.search(r"activations\s+([\d.]+) GiB", out).group(1))
        return out, activations

    frozen, frozen_act = plan()
    assert "2 decoder blocks" in frozen and "the vision tower is frozen: it saves no activations" in frozen
    trains, trains_act = plan("model.freeze=[]")
    assert "2 decoder blocks (language model; 2 vision blocks train)" in trains
    vision = float(re.search(r"activations include ([\d.]+) GiB for 2 training vision blocks: one 16-patch image "
                             r"per sample", trains).group(1))
    assert trains_act == pytest.approx(frozen_act + vision, abs=0.011)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_lora_adapter_loads_with_peft_and_the_merged_export_with_transformers_both_with_the_trained_logits(
        vlm_folders, family, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from automodel.compose import compose
    from automodel.engine.run import train

    folder = vlm_folders[family]
    result = train(compose(["model=hf", f"model.path={folder}", *DATA, "train.max_steps=3", "peft=lora",
                            "optim.lr=1e-2"]), str(tmp_path))
    model_plugin, data = _plugins(folder)
    batch = next(data.build(model_plugin.tokenizer(), seq_len=64, seed=42, dp_rank=0, dp_size=1, global_batch_size=4,
                            micro_batch_size=4))
    inputs = {k: v for k, v in batch.micro_batches[0].items() if k != "labels"}
    with torch.no_grad():
        trained = result.model.eval()(**inputs).logits
        before = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()(**inputs).logits
        base = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32)
        adapted = PeftModel.from_pretrained(base, os.path.join(str(tmp_path), "final", "adapter")).eval()
        merged = AutoModelForImageTextToText.from_pretrained(os.path.join(str(tmp_path), "final"),
                                                             dtype=torch.float32).eval()
        assert (trained - before).abs().max().item() > 1e-3  # the adapter moved the model
        assert (adapted(**inputs).logits - trained).abs().max().item() < 1e-5
        assert (merged(**inputs).logits - trained).abs().max().item() < 1e-5
