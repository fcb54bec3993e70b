"""Steps that must not reach the weights: a NaN, an absurd learning rate, a loss spike.

Bitwise claims are checked on the checkpoints: with checksums on, a checkpoint's meta holds the CRC32 of each
file, and the tensor file of a skipped step's checkpoint must be byte-identical to the step before's (model and
AdamW state, whose step counter a skipped step must not advance either).
"""

import json
import os
import shutil

import pytest
from helpers import losses, train

from automodel.engine.loop import StepRunner
from automodel.engine.step_guard import BadSteps

RUN = ["train.max_steps=8", "train.log_every=1", "train.global_batch_size=8", "checkpoint.every_steps=1",
       "checkpoint.keep_last=0", "checkpoint.checksums=true", "checkpoint.export_final=false"]


@pytest.fixture
def poisoned(monkeypatch):
    """Make the loss of chosen steps NaN (or multiplied): `poisoned({3: nan})`."""
    plan = {}
    original = StepRunner.token_loss

    def token_loss(self, logits, labels):
        loss = original(self, logits, labels)
        return loss * plan[self.step] if self.step in plan else loss

    monkeypatch.setattr(StepRunner, "token_loss", token_loss)
    return plan.update


def _tensor_crcs(run, step):
    meta = json.loads((run / "checkpoints" / f"step_{step:08d}" / "automodel_ckpt.json").read_text())
    crcs = {k: v for k, v in meta["crc32"].items() if k.endswith(".distcp")}
    assert crcs, meta["crc32"]  # the comparison below is over real files
    return crcs


def _run(path, *overrides):
    path.mkdir(parents=True, exist_ok=True)  # what Hydra does for the CLI
    return train(str(path), *overrides)


def _metrics(run):
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_nan_step_is_skipped_bitwise_and_a_resume_makes_the_same_run(tmp_path, poisoned):
    poisoned({3: float("nan")})
    a = tmp_path / "a"
    result = _run(a, *RUN)
    records = {r["step"]: r for r in _metrics(a)}
    assert records[3]["skipped"].startswith("gradient norm nan") and records[3]["grad_norm"] is None
    assert [s for s, r in records.items() if "skipped" in r] == [3]
    assert _tensor_crcs(a, 3) == _tensor_crcs(a, 2)  # weights and optimizer state untouched by step 3
    assert _tensor_crcs(a, 4) != _tensor_crcs(a, 3)  # and step 4 trained again
    assert records[8]["loss"] < records[1]["loss"]

    # a run resumed from the skipped step's checkpoint makes the same decisions and the same numbers
    b = tmp_path / "b"
    shutil.copytree(a / "checkpoints" / "step_00000003", b / "checkpoints" / "step_00000003")
    resumed = _run(b, *RUN, "checkpoint.resume=auto")
    assert losses(resumed) == losses(result)[3:]
    assert _tensor_crcs(b, 8) == _tensor_crcs(a, 8)


def test_an_absurd_learning_rate_stops_in_one_line_keeping_the_last_good_checkpoint(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(BadSteps) as stopped:
        _run(run, *RUN, "optim.lr=1e30", "optim.warmup_steps=0")
    message = str(stopped.value)
    assert "\n" not in message and message.startswith("stopped at step 4: steps 2-4 were all skipped"), message
    assert "optim.lr" in message
    records = _metrics(run)
    assert [r["step"] for r in records if "skipped" in r] == [2, 3, 4]
    kept = sorted(os.listdir(run / "checkpoints"))
    assert kept == ["step_00000001", "step_00000002", "step_00000003"]  # nothing of step 4, nothing half-written
    assert _tensor_crcs(run, 3) == _tensor_crcs(run, 1)


def test_a_loss_spike_is_skipped_and_recorded_for_resumes(tmp_path, poisoned):
    spike = ["train.spike_factor=3.0", "train.spike_window=3"]
    poisoned({6: 50.0})
    a = tmp_path / "a"
    result = _run(a, *RUN, *spike)
    records = {r["step"]: r for r in _metrics(a)}
    assert records[6]["skipped"].startswith("loss spike"), records[6]
    assert [s for s, r in records.items() if "skipped" in r] == [6]
    assert _tensor_crcs(a, 6) == _tensor_crcs(a, 5)
    meta = json.loads((a / "checkpoints" / "step_00000006" / "automodel_ckpt.json").read_text())
    assert meta["extra"]["skipped"] == [6] and len(meta["extra"]["history"]) == 3

    # the guard's memory travels with the checkpoint: resumed at 4, the same step is judged a spike
    b = tmp_path / "b"
    shutil.copytree(a / "checkpoints" / "step_00000004", b / "checkpoints" / "step_00000004")
    resumed = _run(b, *RUN, *spike, "checkpoint.resume=auto")
    assert losses(resumed) == losses(result)[4:]
    assert _tensor_crcs(b, 8) == _tensor_crcs(a, 8)

    # without the guard the same spike is applied (the guard, not chance, skipped it)
    c = tmp_path / "c"
    _run(c, *RUN)
    assert not any("skipped" in r for r in _metrics(c))
