"""The `automodel` command end to end, in subprocesses, as a user runs it."""

import json
import os
import re
import shlex
import subprocess
import sys

import pytest
import torch
from helpers import MICRO, cli

FAST = [*MICRO, "train.max_steps=20", "train.log_every=10", "train.global_batch_size=8", "train.micro_batch_size=8"]


def _one_error_line(proc):
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "warn" not in ln.lower()]
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("automodel: error: "), proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    return lines[0][len("automodel: error: "):]


def test_default_run_writes_config_metrics_and_a_loadable_hf_folder(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = tmp_path / "run"
    proc = cli(*FAST, "train.sample_prompts=2", f"hydra.run.dir={run}", cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    answered = re.search(r"(\d+)/2 sample prompts answered exactly\. Try your own:  (.*)", proc.stdout)
    assert answered, proc.stdout[-2000:]
    assert len(re.findall(r"^  [✓✗] ", proc.stdout, re.M)) == 2  # the two prompts, each with its answer
    resolved = (run / "config.yaml").read_text()
    assert "max_steps: 20" in resolved and "${" not in resolved  # resolved, not interpolated
    records = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [10, 20]
    assert records[-1]["loss"] < records[0]["loss"]
    final = run / "final"
    model = AutoModelForCausalLM.from_pretrained(final)
    tok = AutoTokenizer.from_pretrained(final)
    ids = torch.tensor([tok("max: 3 9 1 =>")["input_ids"]])
    assert model(input_ids=ids).logits.shape == (1, ids.shape[1], model.config.vocab_size)
    # plain transformers as the README shows it (tokenizer(prompt), generate) answers as `automodel generate`
    # does: the exported tokenizer puts the bos first, as training did, and the answers agree token for token
    prompts = ["max: 3 9 1 =>", "last: elk bee rock =>", "sort: 8 9 2 4 1 =>", "add: 6 + 0 =>"]
    for prompt in prompts:
        assert tok(prompt)["input_ids"] == [tok.bos_token_id] + tok(prompt, add_special_tokens=False)["input_ids"]
    gen = cli("generate", str(final), *prompts, "--max-new-tokens", "6", cwd=str(tmp_path))
    assert gen.returncode == 0, gen.stderr[-2000:]
    plain = []
    for prompt in prompts:
        inputs = tok(prompt, return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        plain.append(prompt + tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    assert gen.stdout.splitlines() == plain, (gen.stdout, plain)
    hint = shlex.split(answered.group(2))  # the printed try-your-own command, as a shell would split it
    # run as `python -m automodel` (cli()), so that is what it prints; it runs as printed, from the same folder
    assert hint[:5] == [sys.executable, "-m", "automodel", "generate", str(final)], hint
    tried = subprocess.run([*hint, "--max-new-tokens", "4"], cwd=str(tmp_path), capture_output=True, text=True,
                           timeout=300, env={**os.environ, "AUTOMODEL_NO_PROGRESS": "1"})
    assert tried.returncode == 0 and tried.stdout.startswith(hint[5]), tried.stderr[-2000:]


def test_the_exported_tokenizer_encodes_as_training_did(tmp_path):
    """[bos] + the text's tokens, nothing after (data/text.py, data/pairs.py, `automodel generate`), whatever the
    run's tokenizer adds by itself: nothing (the bundled one), or an eos; the run's own tokenizer is not changed."""
    from transformers import AutoTokenizer

    from automodel.config import RESOURCES
    from automodel.engine.export import encoding_as_trained
    from automodel.model.hf import BUNDLED_TOKENIZER

    text = "last: elk bee rock =>"
    bundled = AutoTokenizer.from_pretrained(str(RESOURCES / BUNDLED_TOKENIZER))
    adds_eos = AutoTokenizer.from_pretrained(str(RESOURCES / BUNDLED_TOKENIZER))
    adds_eos.add_eos_token = True
    tokens = bundled(text, add_special_tokens=False)["input_ids"]
    assert bundled(text)["input_ids"] == tokens and adds_eos(text)["input_ids"] == tokens + [adds_eos.eos_token_id]
    for name, tok in (("bundled", bundled), ("adds_eos", adds_eos)):
        before = tok(text)["input_ids"]
        encoding_as_trained(tok).save_pretrained(tmp_path / name)
        assert tok(text)["input_ids"] == before  # a copy was changed
        exported = AutoTokenizer.from_pretrained(tmp_path / name)
        assert exported(text)["input_ids"] == [exported.bos_token_id, *tokens], name
        assert exported([text, "max: 3 9 1 =>"], padding=True)["input_ids"][0][0] == exported.bos_token_id


def test_the_printed_command_runs_where_it_was_printed(tmp_path, monkeypatch):
    """The Quick start runs .venv/bin/automodel without activating .venv: `automodel` alone is not on PATH."""
    from automodel.engine.export import automodel_command

    script = tmp_path / "venv" / "bin" / "automodel"
    script.parent.mkdir(parents=True)
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [str(script)])
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert automodel_command() == os.path.join("venv", "bin", "automodel")  # inside the working folder: relative
    monkeypatch.chdir(script.parent)
    assert automodel_command() == "./automodel"  # a bare name would be looked up on PATH
    monkeypatch.chdir("/")
    assert automodel_command() == str(script)
    monkeypatch.setenv("PATH", f"{script.parent}:/usr/bin:/bin")  # an activated venv, or a pip install
    assert automodel_command() == "automodel"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [str(tmp_path / "__main__.py")])  # python -m automodel
    assert automodel_command() == f"{sys.executable} -m automodel"  # outside the working folder: absolute


@pytest.mark.parametrize("args,expected", [
    (["parallel=fsdp3"], "parallel=fsdp3: no such option; choose one of: cp, fsdp2, fsdp2_cp, fsdp2_cp_tp_pp, "
                         "fsdp2_ep, fsdp2_ep_pp, fsdp2_pp, fsdp2_tp, fsdp2_tp_pp, hsdp, none, pp, tp"),
    (["train.max_stepz=1"], "train.max_stepz: unknown key; valid keys are: max_steps,"),
    (["train.max_steps=abc"], "train.max_steps='abc': wrong type, expected int"),
    (["parallel.plugin=nope"], "parallel.plugin='nope' is not an installed plugin; choose one of: none, spmd"),
    (["peft.r=eight", "peft=lora"], "peft.r='eight': wrong type, expected int"),
    (["+foo=1"], "unknown top-level key 'foo'"),
    (["model=hf"], "model: set model.path (a folder or hub id) or model.config.model_type"),
])
def test_bad_overrides_give_one_line_exit_2_and_no_run_dir(tmp_path, args, expected):
    msg = _one_error_line(cli(*args, cwd=str(tmp_path)))
    assert msg.startswith(expected), msg
    assert not os.listdir(tmp_path), os.listdir(tmp_path)  # no outputs/ left behind


@pytest.mark.parametrize("args,expected", [
    (["data.path=/nonexistent/pairs.jsonl"], "data.path='/nonexistent/pairs.jsonl' does not exist"),
    (["model.config.model_type=nosuch"], "model.config.model_type='nosuch' is not a transformers model type"),
    (["model=llama3_8b", "peft=lora"], "model 'random-init llama' (8.05B parameters, 0.02B trainable) needs about"),
    (["model=llama3_8b", "parallel=fsdp2_tp", "peft=lora"], "parallel: world size 1 is not divisible by tp=2"),
])
def test_runtime_refusals_are_one_line_and_remove_the_fresh_run_dir(tmp_path, args, expected):
    msg = _one_error_line(cli(*args, cwd=str(tmp_path)))
    assert msg.startswith(expected), msg
    assert not os.listdir(tmp_path), os.listdir(tmp_path)


def test_malformed_data_names_file_and_line(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", oops}\n')
    msg = _one_error_line(cli("data=instruction", f"data.path={data}", cwd=str(tmp_path)))
    assert msg.startswith(f"{data}:2: not valid JSON")
    data.write_text('{"question": "a", "answer": "b"}\n')
    msg = _one_error_line(cli("data=instruction", f"data.path={data}", cwd=str(tmp_path)))
    assert msg == (f"{data}:1: no column 'prompt'; the columns are: question, answer "
                   "(map yours with data.prompt_column / data.completion_column)")


def test_headline_command_composes(tmp_path):
    proc = cli("model=llama3_8b", "parallel=fsdp2_tp", "peft=lora", "--cfg", "job", cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    for fragment in ("hidden_size: 4096", "num_hidden_layers: 32", "tp: 2", "plugin: lora", "plugin: spmd"):
        assert fragment in proc.stdout, fragment
    assert not os.listdir(tmp_path)


def test_help_lists_groups_and_options(tmp_path):
    proc = cli("--help", cwd=str(tmp_path))
    assert proc.returncode == 0
    for fragment in ("model: deepseek_v3, gemma3_4b, gpt_oss_120b, gpt_oss_20b, hf, llama3_2_1b, llama3_70b, llama3_8b, mistral_7b, mixtral_8x7b, qwen2_5_7b, qwen2_5_vl_3b, qwen2_5_vl_7b, qwen3_0_6b, qwen3_30b_a3b, tiny",
                     "parallel: cp, fsdp2, fsdp2_cp, fsdp2_cp_tp_pp, fsdp2_ep, fsdp2_ep_pp, fsdp2_pp, fsdp2_tp, fsdp2_tp_pp, hsdp, none, pp, tp",
                     "peft: dora, lora, none, qlora", "precision: bf16, fp16, fp32, fp8, te_fp8", "loss: ce, chunked_ce, liger",
                     "teacher: hf, none", "logger: jsonl, mlflow, tensorboard, wandb", "logger=[jsonl,wandb,tensorboard,mlflow]",
                     "automodel plan [overrides] plan.world_size=N", "automodel eval RUN_OR_FOLDER [eval.key=value ...]",
                     "checkpoint: dcp, hf_export", "optim: adamw", "data: alpaca, chat, hellaswag, instruction, shapes, sharegpt, squad, text, tiny_tasks, vlm", "automodel list"):
        assert fragment in proc.stdout, fragment


def test_list_shows_every_builtin_option_with_its_package(tmp_path):
    proc = cli("list", cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    rows = [ln for ln in proc.stdout.splitlines() if "│" in ln]
    assert any("parallel" in r and "fsdp2" in r and "spmd" in r and "automodel" in r for r in rows), proc.stdout
    assert any("model" in r and "llama3_70b" in r for r in rows)


def test_a_reader_that_leaves_early_gets_no_traceback(tmp_path):
    """`automodel -m ... --cfg job | head -1`: the pipe closes under the printing process (40 configs: more than
    a pipe holds, so the printer is still writing when the reader leaves)."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "automodel", "-m", "train.seed=range(0,40)", "--cfg", "job"],
                            cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline().startswith(b"# sweep job #0")
    proc.stdout.close()  # as `head -1` does
    stderr = proc.stderr.read().decode()
    proc.wait(timeout=60)
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr[-2000:]
