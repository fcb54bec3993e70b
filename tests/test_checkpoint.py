"""Checkpoints on one process: exact resume, atomic commit under kill -9, retention, refusals.

A "kill" at step k is simulated in-process by raising right after step k's checkpoint (the process state
is then thrown away: the resumed run rebuilds everything from the checkpoint), and for real by a
subprocess that SIGKILLs itself between writing a checkpoint and committing it.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from ckpt_workers import SimulatedCrash, crash_after
from helpers import losses, train

from automodel.checkpoint import dcp as dcp_plugin
from automodel.errors import UserError

RUN = ["train.max_steps=6", "train.log_every=1", "train.global_batch_size=8", "train.micro_batch_size=8",
       "checkpoint.every_steps=2", "checkpoint.export_final=false"]


def train_until_crash(out: str, crash_at: int, *overrides: str):
    with crash_after(crash_at), pytest.raises(SimulatedCrash):
        train(out, *overrides)


def _ckpts(out):
    return sorted(os.listdir(os.path.join(out, "checkpoints")))


def _digest(folder):
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(folder)):
        for name in sorted(files):
            h.update(name.encode())
            with open(os.path.join(root, name), "rb") as f:
                h.update(f.read())
    return h.hexdigest()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("uninterrupted"))
    return out, train(out, *RUN, "checkpoint.keep_last=0")


def test_periodic_checkpoints_hold_model_optimizer_schedule_rng_and_step(uninterrupted):
    out, _ = uninterrupted
    assert _ckpts(out) == ["step_00000002", "step_00000004", "step_00000006"]
    folder = os.path.join(out, "checkpoints", "step_00000004")
    meta = dcp_plugin.read_meta(folder)
    assert meta["step"] == 4 and meta["scheduler"]["last_epoch"] == 4
    assert {"exp_avg", "exp_avg_sq", "step"} <= {k.split(".")[-1] for k in _dcp_keys(folder) if k.startswith("optim.")}
    assert any(k.startswith("model.") for k in _dcp_keys(folder))
    assert {".metadata", "rng_rank0.safetensors", "automodel_ckpt.json"} <= set(os.listdir(folder))


def _dcp_keys(folder):
    from torch.distributed.checkpoint import FileSystemReader

    return set(FileSystemReader(folder).read_metadata().state_dict_metadata)


def test_resume_auto_is_bitwise_identical_to_the_uninterrupted_run(uninterrupted, tmp_path):
    ref_out, ref = uninterrupted
    out = str(tmp_path)
    train_until_crash(out, 4, *RUN, "checkpoint.keep_last=2")
    assert _ckpts(out) == ["step_00000002", "step_00000004"]
    resumed = train(out, *RUN, "checkpoint.keep_last=2", "checkpoint.resume=auto")
    assert [r["step"] for r in resumed.records] == [5, 6]
    assert losses(resumed) == losses(ref)[4:]  # bitwise: the same floats
    a, b = ref.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # metrics.jsonl holds each step once; retention kept the last two checkpoints
    steps = [json.loads(ln)["step"] for ln in open(os.path.join(out, "metrics.jsonl"))]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert _ckpts(out) == ["step_00000004", "step_00000006"]


def test_resume_from_a_path_of_another_run_writes_only_into_the_new_run(uninterrupted, tmp_path):
    ref_out, ref = uninterrupted
    before = _digest(os.path.join(ref_out, "checkpoints"))
    resumed = train(str(tmp_path), *RUN, f"checkpoint.resume={ref_out}/checkpoints/step_00000002")
    assert losses(resumed) == losses(ref)[2:]
    assert _digest(os.path.join(ref_out, "checkpoints")) == before
    assert _ckpts(str(tmp_path)) == ["step_00000004", "step_00000006"]


KILL_SCRIPT = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from automodel.checkpoint import dcp
def die(staging):
    if staging.endswith("step_00000004.partial"):
        os.kill(os.getpid(), signal.SIGKILL)  # everything is written, nothing is committed
dcp._before_commit = die
from helpers import train
train({out!r}, *{run!r})
"""


def test_kill_9_between_write_and_commit_leaves_the_previous_checkpoint_latest(uninterrupted, tmp_path):
    _, ref = uninterrupted
    out = str(tmp_path)
    script = KILL_SCRIPT.format(tests=os.path.dirname(__file__), out=out, run=RUN)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "AUTOMODEL_NO_PROGRESS": "1"})
    assert proc.returncode == -9, proc.stderr[-2000:]
    partial = os.path.join(out, "checkpoints", "step_00000004.partial")
    assert _ckpts(out) == ["step_00000002", "step_00000004.partial"]
    assert os.path.isfile(os.path.join(partial, ".metadata"))  # the data was all there, but never committed
    assert dcp_plugin.latest_valid(os.path.join(out, "checkpoints")).endswith("step_00000002")
    resumed = train(out, *RUN, "checkpoint.resume=auto")
    assert [r["step"] for r in resumed.records] == [3, 4, 5, 6]
    assert losses(resumed) == losses(ref)[2:]
    assert _ckpts(out) == ["step_00000004", "step_00000006"]  # the stale .partial is gone


def _load_all(folder):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(folder).read_metadata().state_dict_metadata
    sd = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.items()}
    dcp.load(sd, checkpoint_id=folder, no_dist=True)
    return sd


def test_async_save_writes_the_same_checkpoints_and_resumes_bitwise(uninterrupted, tmp_path):
    ref_out, ref = uninterrupted
    out = str(tmp_path / "async")
    os.makedirs(out)
    train(out, *RUN, "checkpoint.async_save=true", "checkpoint.keep_last=0")
    assert _ckpts(out) == ["step_00000002", "step_00000004", "step_00000006"]  # the last one committed at the end
    for name in _ckpts(out):  # training went on while they were written: the CPU copy isolated them
        a, b = _load_all(os.path.join(ref_out, "checkpoints", name)), _load_all(os.path.join(out, "checkpoints", name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    # a crash while a background save may still be in flight: resume=auto takes the latest committed one
    crashed = str(tmp_path / "crashed")
    os.makedirs(crashed)
    train_until_crash(crashed, 5, *RUN, "checkpoint.async_save=true")
    resumed = train(crashed, *RUN, "checkpoint.async_save=true", "checkpoint.resume=auto")
    first = resumed.records[0]["step"]
    assert first in (3, 5) and losses(resumed) == losses(ref)[first - 1:]
    a, b = ref.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- refusals
def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_refuses_a_checkpoint_of_another_model_in_one_line_and_touches_nothing(uninterrupted, tmp_path):
    ref_out, _ = uninterrupted
    ckpt = os.path.join(ref_out, "checkpoints", "step_00000004")
    before = _digest(ref_out)
    with pytest.raises(UserError) as e:
        train(str(tmp_path), *RUN, f"checkpoint.resume={ckpt}", "model.config.hidden_size=32")
    msg = str(e.value)
    assert "\n" not in msg and "model.hidden_size is 64 in the checkpoint but 32 in this run" in msg, msg
    with pytest.raises(UserError, match="train.seed is 42 in the checkpoint but 7 in this run"):
        train(str(tmp_path), *RUN, f"checkpoint.resume={ckpt}", "train.seed=7")
    with pytest.raises(UserError, match="peft.plugin is 'none' in the checkpoint but 'lora'"):
        train(str(tmp_path), *RUN, f"checkpoint.resume={ckpt}", "peft=lora")
    assert _digest(ref_out) == before
    assert not os.path.exists(os.path.join(str(tmp_path), "config.yaml"))  # the failed run wrote nothing


@pytest.mark.parametrize("damage,expect", [
    ("delete_data", "file __0_0.distcp is missing"),
    ("truncate_data", "is corrupt: file __0_0.distcp has"),
    ("delete_meta", "not a complete automodel checkpoint"),
    ("garble_meta", "is corrupt: automodel_ckpt.json does not parse"),
    ("delete_dcp_metadata", "file .metadata is missing"),
    ("flip_byte", "is corrupt: file __0_0.distcp does not match its checksum"),
])
def test_refuses_a_missing_or_corrupt_checkpoint_file(uninterrupted, tmp_path, damage, expect):
    ref_out, _ = uninterrupted
    ckpt = _copy(os.path.join(ref_out, "checkpoints", "step_00000004"), str(tmp_path / "step_00000004"))
    target = {"delete_data": "__0_0.distcp", "truncate_data": "__0_0.distcp", "delete_meta": "automodel_ckpt.json",
              "garble_meta": "automodel_ckpt.json", "delete_dcp_metadata": ".metadata",
              "flip_byte": "__0_0.distcp"}[damage]
    path = os.path.join(ckpt, target)
    if damage.startswith("delete"):
        os.remove(path)
    elif damage == "truncate_data":
        os.truncate(path, os.path.getsize(path) // 2)
    elif damage == "flip_byte":  # same size, one bit different: only the checksum can tell
        with open(path, "r+b") as f:
            f.seek(os.path.getsize(path) // 2)
            byte = f.read(1)[0]
            f.seek(-1, 1)
            f.write(bytes([byte ^ 0x01]))
    else:
        with open(path, "w") as f:
            f.write("{not json")
    before = _digest(ckpt)
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(UserError, match=expect) as e:
        train(str(run), *RUN, f"checkpoint.resume={ckpt}")
    assert "\n" not in str(e.value)
    assert _digest(ckpt) == before
    assert os.listdir(run) == []  # the failed run wrote nothing (not even its lock)


def test_resume_auto_skips_a_broken_newest_checkpoint_and_refuses_a_missing_path(uninterrupted, tmp_path):
    ref_out, ref = uninterrupted
    out = str(tmp_path / "run")
    _copy(os.path.join(ref_out, "checkpoints"), os.path.join(out, "checkpoints"))
    os.remove(os.path.join(out, "checkpoints", "step_00000006", "__0_0.distcp"))
    assert dcp_plugin.latest_valid(os.path.join(out, "checkpoints")).endswith("step_00000004")
    # the run resumes from step 4 (the newest good one) past the broken step 6, and trains 5 and 6 again exactly
    # as the uninterrupted run did
    resumed = train(out, *RUN, "checkpoint.resume=auto")
    assert [r["step"] for r in resumed.records] == [5, 6]
    assert losses(resumed) == losses(ref)[4:]  # bitwise: the same floats
    a, b = ref.model.state_dict(), resumed.model.state_dict()
    assert a and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # its own step 6 replaced the broken one: complete, and the newest valid checkpoint again
    assert _ckpts(out) == ["step_00000004", "step_00000006"]
    assert dcp_plugin.latest_valid(os.path.join(out, "checkpoints")).endswith("step_00000006")
    saved, want = _load_all(os.path.join(out, "checkpoints", "step_00000006")), \
        _load_all(os.path.join(ref_out, "checkpoints", "step_00000006"))
    assert saved and saved.keys() == want.keys() and all(torch.equal(saved[k], want[k]) for k in saved)
    (tmp_path / "x").mkdir()
    with pytest.raises(UserError, match="does not exist"):
        train(str(tmp_path / "x"), *RUN, f"checkpoint.resume={tmp_path}/nowhere")


# ---------------------------------------------------------------- automodel export
def test_automodel_export_turns_a_checkpoint_into_an_hf_folder_offline(uninterrupted, tmp_path):
    from helpers import cli
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref_out, ref = uninterrupted
    out = str(tmp_path / "hf")
    proc = cli("export", ref_out, out, cwd=str(tmp_path))  # a run dir: its latest checkpoint (step 6)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(out))
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    ids = torch.tensor([tok("sort: 3 1 2 =>")["input_ids"]])
    ref.model.eval()
    with torch.no_grad():
        diff = (loaded(input_ids=ids).logits - ref.model(input_ids=ids).logits).abs().max().item()
    assert diff == 0.0, diff
    bad = cli("export", str(tmp_path / "nowhere"), out, cwd=str(tmp_path))
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "does not exist" in bad.stderr, bad.stderr


def test_export_every_save_puts_an_hf_folder_of_that_step_in_each_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM

    out = str(tmp_path)
    train(out, "train.max_steps=4", "train.log_every=1", "train.global_batch_size=8", "train.micro_batch_size=8",
          "checkpoint.every_steps=2", "checkpoint.export_final=false", "checkpoint.export_every_save=true")
    for name in ("step_00000002", "step_00000004"):
        folder = os.path.join(out, "checkpoints", name)
        dcp_plugin.read_meta(folder)  # still a valid, complete checkpoint
        hf = AutoModelForCausalLM.from_pretrained(os.path.join(folder, "hf")).state_dict()
        saved = _load_all(folder)
        matching = [k for k in hf if "model." + k in saved]
        assert matching, (sorted(hf)[:5], sorted(saved)[:5])  # not vacuous: the names line up
        assert all(torch.equal(hf[k], saved["model." + k]) for k in matching)
        assert sum(("model." + k) in saved for k in hf) == len([k for k in saved if k.startswith("model.")])


def test_cli_refusal_is_one_line_exit_2_and_leaves_no_run_dir(tmp_path):
    from helpers import cli

    run = tmp_path / "run"
    proc = cli("hydra.run.dir=" + str(run), "train.max_steps=2", f"checkpoint.resume={tmp_path}/nowhere",
               cwd=str(tmp_path))
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr[-2000:]
    assert proc.stderr.startswith("automodel: error: checkpoint '") and "does not exist" in proc.stderr
    assert not run.exists()


def test_extending_max_steps_on_resume_follows_the_new_schedule(tmp_path):
    runs = {n: str(tmp_path / n) for n in ("six", "longer", "eight")}
    for d in runs.values():
        os.makedirs(d)
    six = train(runs["six"], *RUN, "optim.warmup_steps=1")
    longer = train(runs["longer"], *RUN, "optim.warmup_steps=1", "train.max_steps=8",
                   f"checkpoint.resume={runs['six']}/checkpoints/step_00000004")
    eight = train(runs["eight"], *RUN, "optim.warmup_steps=1", "train.max_steps=8")
    # from step 5 on, the LR is the 8-step schedule's, not the 6-step one's next value
    assert [r["lr"] for r in longer.records] == [r["lr"] for r in eight.records][4:]
    assert longer.records[0]["lr"] != six.records[4]["lr"]


def test_a_preemption_signal_saves_at_the_next_step_and_the_resumed_run_is_bitwise_the_same(uninterrupted, tmp_path,
                                                                                           monkeypatch):
    """Inside a SLURM job, SIGUSR2 (SLURM's warning) makes the run save the step it is at and stop, then hands
    the signal to the handler that was there before (submitit's requeue). No periodic checkpoint is needed."""
    import signal

    _, ref = uninterrupted
    monkeypatch.setenv("SLURM_JOB_ID", "1")
    handed_over = []
    def submitit(signum, frame):
        handed_over.append(signum)

    previous = signal.signal(signal.SIGUSR2, submitit)
    original = dcp_plugin.DCPCheckpoint.after_step

    def signal_at_step_3(self, step, state, run_dir):
        original(self, step, state, run_dir)
        if step == 3:
            os.kill(os.getpid(), signal.SIGUSR2)  # arrives between steps: noted, acted on at this boundary

    out = str(tmp_path)
    try:
        monkeypatch.setattr(dcp_plugin.DCPCheckpoint, "after_step", signal_at_step_3)
        stopped = train(out, *RUN, "checkpoint.every_steps=0")
        monkeypatch.setattr(dcp_plugin.DCPCheckpoint, "after_step", original)
        assert stopped.preempted_at == 3 and handed_over == [signal.SIGUSR2]
        assert signal.getsignal(signal.SIGUSR2) is submitit  # the run's own handler is gone again
        assert _ckpts(out) == ["step_00000003"] and not os.path.exists(os.path.join(out, "final"))
        assert [r["step"] for r in stopped.records] == [1, 2, 3]
        resumed = train(out, *RUN, "checkpoint.every_steps=0", "checkpoint.resume=auto")
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert [r["step"] for r in resumed.records] == [4, 5, 6]
    assert losses(resumed) == losses(ref)[3:]
    assert handed_over == [signal.SIGUSR2]  # the resumed run, never signalled, did not call it
