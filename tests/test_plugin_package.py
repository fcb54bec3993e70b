"""The example third-party package under plugins/: pip-installed, its plugins and options appear and train;
gone, they vanish.

It is installed with pip (once, for the module) into a target folder that only the "installed" subprocesses
see on PYTHONPATH, so the test environment itself is never modified. The package holds one plugin per group
(docs/plugins.md walks through them); one training run uses all eight together, a second resumes it.
"""

import csv
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from helpers import MICRO, cli

from automodel.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "plugins", "automodel-example-plugin")

# group -> the example package's option (and plugin) for it
EXAMPLES = {"model": "small_llama", "parallel": "checkpointed", "data": "arith", "peft": "top_layers",
            "precision": "autocast", "checkpoint": "torch_save", "optim": "lion", "loss": "smoothed_ce",
            "logger": "csv"}
KIT = [
    *(f"{group}={option}" for group, option in EXAMPLES.items()),
    *(o for o in MICRO if o.startswith("train.")),  # (MICRO's model keys are the hf plugin's)
    "model.hidden_size=48", "optim.lr=1e-3", "optim.warmup_steps=0", "data.num_examples=256", "data.val_examples=32",
    "train.global_batch_size=8", "train.max_steps=6", "train.log_every=1", "train.val_every=3",
    "train.sample_prompts=2", "checkpoint.every_steps=3",
]


def _one_error_line(proc) -> str:
    """A refusal: exit code 2, exactly one line on stderr, no traceback anywhere."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def _records(run) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    target = str(tmp_path_factory.mktemp("site"))
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--target", target,
         PACKAGE], capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"PYTHONPATH": target}


@pytest.fixture
def example_modules(installed, monkeypatch):
    """The installed package importable in this process (its classes only: the registry is not involved)."""
    monkeypatch.syspath_prepend(installed["PYTHONPATH"])
    yield
    for name in [m for m in sys.modules if m == "automodel_example" or m.startswith("automodel_example.")]:
        del sys.modules[name]


@pytest.fixture(scope="module")
def kit_run(installed, tmp_path_factory):
    """Six steps with every example plugin at once (checkpoints at steps 3 and 6, validation at 3 and 6)."""
    cwd = tmp_path_factory.mktemp("kit")
    run = cwd / "run"
    proc = cli(*KIT, f"hydra.run.dir={run}", cwd=str(cwd), env=installed)
    return proc, run


def test_installed_plugins_are_listed_with_their_package(tmp_path, installed):
    proc = cli("list", cwd=str(tmp_path), env=installed)
    assert proc.returncode == 0, proc.stderr
    for group, option in EXAMPLES.items():
        row = next((ln for ln in proc.stdout.splitlines() if f" {option} " in ln and f" {group} " in ln), None)
        assert row is not None, (group, option, proc.stdout)
        assert "automodel-exa" in row  # rich may abbreviate long cells


def test_every_example_plugin_trains_together(kit_run):
    proc, run = kit_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    config = (run / "config.yaml").read_text()
    for group, option in EXAMPLES.items():  # each group's node names the example plugin
        indent = "    " if group == "logger" else "  "  # a logger's node is under its option's name
        assert re.search(rf"^{group}:\n(  .*\n)*?{indent}plugin: {option}$", config, re.M), (group, config)
    records = _records(run)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert records[-1]["loss"] < records[0]["loss"]  # optim=lion on data=arith learns
    # logger: metrics.jsonl (always on) and the plugin's CSV hold the same steps
    rows = list(csv.DictReader((run / "metrics.csv").read_text().splitlines()))
    assert [(int(r["step"]), float(r["loss"])) for r in rows] == [(r["step"], r["loss"]) for r in records]
    # data: its val_batches ran every train.val_every steps, its sample prompts were tried on the export
    assert [r["step"] for r in records if "val_loss" in r] == [3, 6]
    assert "/2 sample prompts answered exactly" in proc.stdout
    # model: the export is the plugin's architecture, with the overridden width
    hf = json.loads((run / "final" / "config.json").read_text())
    assert (hf["hidden_size"], hf["num_hidden_layers"], hf["model_type"]) == (48, 2, "llama")
    # parallel and precision were applied
    assert "activation checkpointing on 2 of 2 decoder blocks" in proc.stdout
    assert "precision=autocast: bfloat16 autocast on cpu" in proc.stdout
    # peft: only the top block and the head trained; the export wrote the plugin's own file too
    total, trainable = map(float, re.search(r"([\d.]+)M parameters \(([\d.]+)M trainable\)", proc.stdout).groups())
    assert 0 < trainable < total
    trained = json.loads((run / "final" / "top_layers.json").read_text())["trained_parameters"]
    assert trained and all(n.startswith(("model.layers.1.", "lm_head.")) for n in trained), trained


def test_example_peft_froze_the_rest_and_checkpoints_hold_the_run(kit_run):
    import torch
    from safetensors.torch import load_file

    proc, run = kit_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = sorted(p.name for p in (run / "torch_checkpoints").iterdir())
    assert saved == ["step_00000003.pt", "step_00000006.pt"]
    at3 = torch.load(run / "torch_checkpoints" / "step_00000003.pt", weights_only=True)
    assert at3["step"] == 3
    final = load_file(str(run / "final" / "model.safetensors"))
    for name, tensor in at3["model"].items():
        moved = not torch.equal(tensor, final[name])
        assert moved == name.startswith(("model.layers.1.", "lm_head.")), name  # frozen stay, trained move


def test_example_checkpoint_resumes_exactly(kit_run, installed, tmp_path):
    proc, run = kit_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    os.remove(resumed / "torch_checkpoints" / "step_00000006.pt")  # the latest is now step 3's
    shutil.rmtree(resumed / "final")
    again = cli(*KIT, "checkpoint.resume=auto", "train.sample_prompts=0", "checkpoint.export_final=false",
                f"hydra.run.dir={resumed}", cwd=str(tmp_path), env=installed)  # later overrides win
    assert again.returncode == 0, again.stderr[-3000:]
    assert "(step 3)" in again.stdout and "step 3/6" not in again.stdout  # trained 4..6 only
    want = {r["step"]: r for r in _records(run)}
    got = _records(resumed)
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6]  # the lines past the checkpoint were replaced
    for r in got[3:]:  # data order, weights, optimizer, schedule: all as in the uninterrupted run
        assert r["loss"] == pytest.approx(want[r["step"]]["loss"], rel=1e-5), r["step"]
        assert r["lr"] == pytest.approx(want[r["step"]]["lr"], rel=1e-9), r["step"]
    assert got[-1]["val_loss"] == pytest.approx(want[6]["val_loss"], rel=1e-5)


def test_example_checkpoint_refuses_another_config(example_modules, tmp_path):
    import torch
    from automodel_example.torch_save import TorchSave, TorchSaveConfig

    folder = tmp_path / "torch_checkpoints"
    folder.mkdir()
    torch.save({"step": 3, "fingerprint": json.dumps({"data": {"max_operand": 9}, "seed": 1}), "model": {}},
               folder / "step_00000003.pt")
    plugin = TorchSave(TorchSaveConfig(resume="auto"))
    assert plugin.resume_point(str(tmp_path), {"data": {"max_operand": 9}, "seed": 1}).step == 3
    with pytest.raises(UserError, match=r"it was saved with other data settings; resume with the same settings"):
        plugin.resume_point(str(tmp_path), {"data": {"max_operand": 5}, "seed": 1})
    torch.save({"weights": torch.zeros(1)}, folder / "step_00000004.pt")  # the latest, but not one of ours
    with pytest.raises(UserError, match=r"step_00000004.pt' is not a checkpoint=torch_save checkpoint$"):
        plugin.resume_point(str(tmp_path), {})


def test_val_every_message_fits_a_plugin_without_val_keys(example_modules):
    """The data plugin has no data.val_path/val_split/val_size: the message must not tell the user to set them."""
    from automodel_example.arith import ArithConfig, ArithData

    from automodel.config import TrainConfig
    from automodel.engine import validate

    t = TrainConfig(val_every=2)
    with pytest.raises(UserError) as e:
        validate.batches(ArithData(ArithConfig(val_examples=0)), None, t, 0, 1, 4)
    assert "val_path" not in str(e.value) and "val_size" not in str(e.value)
    assert str(e.value).startswith("train.val_every=2 but the data plugin (ArithData) gave no validation set")

    @dataclasses.dataclass
    class NoValConfig:
        path: str = "x"

    class NoVal:  # a data plugin without val_batches at all
        Config = NoValConfig

    with pytest.raises(UserError, match=r"^train.val_every=2 but the data plugin \(NoVal\) offers no validation "
                                        r"\(it has no `val_batches`\); set train.val_every=0$"):
        validate.batches(NoVal(), None, t, 0, 1, 4)

    @dataclasses.dataclass
    class SomeValConfig:
        val_path: str = ""
        val_size: int = 0

    class SomeVal:  # has two of the three keys: only those are named
        Config = SomeValConfig

        def val_batches(self, tokenizer, **kw):
            return None

    with pytest.raises(UserError) as e:
        validate.batches(SomeVal(), None, t, 0, 1, 4)
    assert str(e.value) == ("train.val_every=2 but the data has no validation set; set data.val_path or "
                            "data.val_size (or train.val_every=0)")


def test_docs_excerpts_are_the_example_files():
    """docs/plugins.md quotes the example package: every block headed `# file: <path>` is that file's text,
    verbatim, apart from `...` lines that stand for left-out parts."""
    docs = open(os.path.join(REPO, "docs", "plugins.md"), encoding="utf-8").read()
    blocks = re.findall(r"^```\w*\n# file: (\S+)\n(.*?)^```$", docs, re.M | re.S)
    assert {path.split("/")[-1] for path, _ in blocks} >= {
        "pyproject.toml", "small_llama.py", "checkpointed.py", "arith.py", "top_layers.py", "autocast.py",
        "torch_save.py", "lion.py", "smoothed_ce.py"}
    for path, block in blocks:
        text = open(os.path.join(REPO, path), encoding="utf-8").read()
        chunks = re.split(r"^\s*\.\.\.\n", block, flags=re.M)
        for chunk in chunks:
            assert chunk.strip() and chunk in text, (path, chunk[:300])


def test_uninstalled_plugin_is_gone(tmp_path):
    proc = cli("list", cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "lion" not in proc.stdout and "automodel-exa" not in proc.stdout
    proc = cli("optim=lion", cwd=str(tmp_path))
    assert _one_error_line(proc) == "automodel: error: optim=lion: no such option; choose one of: adamw"


def test_a_third_party_adapter_trains_alone_and_exports_merged_into_a_plain_model(installed, tmp_path):
    """peft=output_scales: the example package's own adapter (a learned scale per output feature, IA3-style).
    At step 1 it is the base model; only its scales train; the export is plain transformers weights with the
    scales merged, giving the trained model's logits, and the scales alone are written beside it."""
    run = tmp_path / "run"
    common = [*(o for o in MICRO), "train.max_steps=4", "train.log_every=1", "train.global_batch_size=8",
              "optim.lr=1e-2", "optim.warmup_steps=0"]
    proc = cli(*common, "peft=output_scales", f"hydra.run.dir={run}", cwd=str(tmp_path), env=installed)
    assert proc.returncode == 0, proc.stderr[-3000:]
    full = tmp_path / "full"
    proc = cli(*common, "checkpoint.export_final=false", f"hydra.run.dir={full}", cwd=str(tmp_path), env=installed)
    assert proc.returncode == 0, proc.stderr[-3000:]
    scaled, plain = _records(run), _records(full)
    assert abs(scaled[0]["loss"] - plain[0]["loss"]) < 1e-6  # scales start at 1: the base model
    assert scaled[-1]["loss"] != plain[-1]["loss"]  # and then only they trained
    # the frozen base (the seed's random init) with the saved scales applied = the merged export
    code = f"""
import sys, torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
sys.path.insert(0, {os.path.join(REPO, 'tests')!r})
from helpers import random_init_model
scales = load_file({str(run / 'final' / 'output_scales.safetensors')!r})
merged = AutoModelForCausalLM.from_pretrained({str(run / 'final')!r}).eval()
assert not any('output_scale' in n for n, _ in merged.named_parameters())
moved = max((s - 1).abs().max().item() for s in scales.values())
assert len(scales) == 12 and moved > 1e-4, (len(scales), moved)
base = random_init_model().eval()
for name, s in scales.items():
    base.get_submodule(name).register_forward_hook(lambda m, i, o, s=s: o * s)
ids = torch.tensor([[1, 40, 41, 42, 43, 44]])
with torch.no_grad():
    diff = (base(input_ids=ids).logits - merged(input_ids=ids).logits).abs().max().item()
assert diff < 1e-5, diff
print('ok', diff)
"""
    check = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env={**os.environ, **installed})
    assert check.returncode == 0 and check.stdout.startswith("ok"), check.stderr[-3000:]
