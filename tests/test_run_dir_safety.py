"""Nothing lost, nothing ignored: what a run does to a run dir it does not own, and to settings it resumes with.

- a refused run leaves the folder as it found it (a user's files, an older log), and makes nothing where it
  was refused;
- a fresh run into a dir holding another run's checkpoints or final export is refused, touching nothing;
- a resumed run that changes a setting is refused unless the change is accepted by name, and then the new
  value is the one that trains;
- two jobs started at the same instant into one dir: the refused one writes nothing there.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
from helpers import MICRO, cli, losses, train

from automodel.checkpoint import dcp as dcp_plugin
from automodel.errors import UserError

RUN = ["train.max_steps=4", "train.log_every=1", "train.global_batch_size=8", "checkpoint.every_steps=2",
       "checkpoint.keep_last=0"]


def _digest(folder: str) -> dict:
    """Every file under `folder` (but the job lock, whose holder note each job rewrites) -> its sha256."""
    found = {}
    for root, dirs, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            if name != ".lock":
                with open(path, "rb") as f:
                    found[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
        found.update({os.path.relpath(os.path.join(root, d), folder) + "/": "" for d in dirs})
    return found


def _one_line(proc) -> str:
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith("automodel: error:")]
    assert proc.returncode == 2 and len(lines) == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    return lines[0]


def test_a_refused_run_leaves_the_users_folder_and_makes_nothing(tmp_path):
    users = tmp_path / "u"
    (users / "notes").mkdir(parents=True)
    (users / "experiment-notes.log").write_text("notes\n")
    (users / "train.log").write_text("an older run's log\n")  # the refused run's log lines are cut off again
    (users / "notes" / "a.txt").write_text("x")
    before = _digest(str(users))
    line = _one_line(cli("data=instruction", "data.path=/nonexistent.jsonl", f"hydra.run.dir={users}",
                         cwd=str(tmp_path)))
    assert "data.path='/nonexistent.jsonl' does not exist" in line
    assert _digest(str(users)) == before and sorted(os.listdir(users)) == ["experiment-notes.log", "notes",
                                                                           "train.log"]
    # a folder it had to make (and its parents) goes again
    _one_line(cli("data=instruction", "data.path=/nonexistent.jsonl", f"hydra.run.dir={tmp_path}/new/a/b",
                  cwd=str(tmp_path)))
    assert not os.path.exists(tmp_path / "new")
    # a folder it cannot make: one line, not Hydra's traceback
    line = _one_line(cli("hydra.run.dir=/proc/nope", cwd=str(tmp_path)))
    assert line.startswith("automodel: error: hydra.run.dir=/proc/nope cannot be made"), line


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("finished"))
    return out, train(out, *RUN)


def test_a_fresh_run_into_a_finished_run_dir_is_refused_and_touches_nothing(finished, tmp_path):
    out, _ = finished
    before = _digest(out)
    with pytest.raises(UserError, match=r"holds another run \(checkpoints up to step 4 in checkpoints/ and a final "
                                        r"export in final/\); continue that run with checkpoint.resume=auto"):
        train(out, *RUN)
    with pytest.raises(UserError, match="holds another run"):  # nor the final/ of an export-only run
        train(out, *RUN[:3], "checkpoint=hf_export")
    # a checkpoint of another run resumed into it: the same
    other = str(tmp_path / "other")
    shutil.copytree(out, other)
    with pytest.raises(UserError, match="holds another run"):
        train(out, *RUN, "train.max_steps=6", f"checkpoint.resume={other}/checkpoints/step_00000002")
    # its own earlier checkpoint, with a later one there: two histories would mix (keep_last, resume=auto)
    with pytest.raises(UserError, match=r"is step 2, but .* also holds step 4: training on from the earlier one "
                                        "here would mix two histories"):
        train(out, *RUN, f"checkpoint.resume={out}/checkpoints/step_00000002")
    assert _digest(out) == before
    # resume=auto where only the final export is left (no checkpoint): nothing to resume, refused
    shutil.rmtree(os.path.join(other, "checkpoints"))
    with pytest.raises(UserError, match="a final export in final/, but no complete checkpoint to resume from"):
        train(other, *RUN, "checkpoint.resume=auto")


def test_keep_last_never_deletes_this_runs_checkpoint_for_a_later_one(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (2, 4, 200):
        (root / f"step_{step:08d}").mkdir(parents=True)
    plugin = dcp_plugin.DCPCheckpoint(dcp_plugin.DCPConfig(keep_last=1))
    plugin._prune(str(root), 4)  # step 4 was just saved; step 200 is not this run's history
    assert sorted(os.listdir(root)) == ["step_00000004", "step_00000200"]


def test_a_resume_with_changed_settings_is_refused_unless_accepted_and_then_uses_them(finished, tmp_path):
    out, _ = finished
    ckpt = f"{out}/checkpoints/step_00000002"
    run, fresh_dir, again_dir = (str(tmp_path / name) for name in ("run", "fresh", "again"))
    for folder in (run, fresh_dir, again_dir):
        os.makedirs(folder)
    changed = ["optim.lr=2e-3", "optim.weight_decay=0", "train.max_steps=4", f"checkpoint.resume={ckpt}"]
    with pytest.raises(UserError) as e:
        train(run, *RUN, *changed)
    assert str(e.value) == (f"cannot resume from '{ckpt}' with changed settings: optim.lr is 0.001 in the checkpoint "
                            "but 0.002 in this run; optim.weight_decay is 0.1 in the checkpoint but 0 in this run; to "
                            "train on with the new values add checkpoint.allow_changed=[optim.lr,optim.weight_decay], "
                            "or resume with the checkpoint's settings (a layout change needs neither)")
    with pytest.raises(UserError, match="checkpoint.allow_changed names 'optim.learning_rate', which is not a "
                                        "setting a checkpoint records; valid names: optim.beta1"):
        train(run, *RUN, *changed, "checkpoint.allow_changed=[optim.learning_rate,optim.weight_decay]")
    assert not os.path.exists(os.path.join(run, "config.yaml"))
    resumed = train(run, *RUN, *changed, "checkpoint.allow_changed=[optim.lr,optim.weight_decay]")
    # the learning rate follows the new schedule: what a run started with lr 2e-3 logs at these steps
    fresh = train(fresh_dir, *RUN, "optim.lr=2e-3", "optim.weight_decay=0")
    assert [r["lr"] for r in resumed.records] == [r["lr"] for r in fresh.records][2:]
    # and the optimizer trained with the new weight decay (its groups as the step-4 checkpoint recorded them)
    groups = dcp_plugin.read_meta(os.path.join(run, "checkpoints", "step_00000004"))["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.0, 0.0]
    assert [g["lr"] for g in groups] == [2e-3 * 5 / 10] * 2  # step 5's: the 10-step warmup towards the new peak
    # the new checkpoint records the new settings: resuming it with them needs no acceptance
    again = train(again_dir, *RUN, "optim.lr=2e-3", "optim.weight_decay=0", "train.max_steps=5",
                  f"checkpoint.resume={run}/checkpoints/step_00000004")
    assert [r["step"] for r in again.records] == [5]


def test_checksums_false_resumes_a_checkpoint_whose_crc_does_not_match(finished, tmp_path):
    out, ref = finished
    ckpt = shutil.copytree(f"{out}/checkpoints/step_00000002", str(tmp_path / "step_00000002"))
    path = os.path.join(ckpt, "__0_0.distcp")
    with open(path, "r+b") as f:  # the last byte: the final element of the last tensor written, one bit off
        f.seek(-1, 2)
        byte = f.read(1)[0]
        f.seek(-1, 2)
        f.write(bytes([byte ^ 0x01]))
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    with pytest.raises(UserError, match="does not match its checksum"):
        train(str(tmp_path / "a"), *RUN, f"checkpoint.resume={ckpt}")
    resumed = train(str(tmp_path / "b"), *RUN, f"checkpoint.resume={ckpt}", "checkpoint.checksums=false")
    assert [r["step"] for r in resumed.records] == [3, 4] and len(losses(resumed)) == 2


def test_two_jobs_started_at_once_into_one_dir_the_refused_one_writes_nothing_there(tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "AUTOMODEL_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    common = [sys.executable, "-m", "automodel", *MICRO, "train.max_steps=3", "train.global_batch_size=4",
              "checkpoint.every_steps=0", f"hydra.run.dir={run}"]
    jobs = {lr: subprocess.Popen([*common, f"optim.lr={lr}"], cwd=str(tmp_path), env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True) for lr in ("0.001", "0.002")}
    outs = {lr: (p.communicate(timeout=300)[0], p.returncode) for lr, p in jobs.items()}
    assert sorted(code for _, code in outs.values()) == [0, 2], outs
    ran = next(lr for lr, (_, code) in outs.items() if code == 0)
    refused = outs[next(lr for lr in outs if lr != ran)][0]
    assert f"the run dir {run} is in use by another automodel job" in refused and "Traceback" not in refused
    assert f"optim.lr={ran}" in (run / ".hydra" / "overrides.yaml").read_text()
    assert (run / ".hydra" / "config.yaml").read_text().count(f"lr: {ran}") == 1
    assert f"lr: {ran}" in (run / "config.yaml").read_text()
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 3
