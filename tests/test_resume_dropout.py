"""Exact resume where training draws random numbers: dropout in the model (attention, residual, embedding) and in
the LoRA adapters. Every other resume test trains with dropout 0, so a resume that did not restore the RNG state
passed them all.

N steps uninterrupted against N/2, a crash, and a resume to N: the logged metrics and the final weights must be
the same floats. A resume whose RNG is left as the restart made it must differ (the test sees the draws).
"""

from __future__ import annotations

import os

import pytest
import torch
from ckpt_workers import SimulatedCrash, crash_after
from helpers import DROPOUT, train

STEPS = 6
RUN = [f"train.max_steps={STEPS}", "train.log_every=1", "train.global_batch_size=8", "train.micro_batch_size=4",
       f"checkpoint.every_steps={STEPS // 2}", "checkpoint.export_final=false", "checkpoint.keep_last=0"]
CASES = {
    "full_attention_dropout": ["+model.config.attention_dropout=0.2"],
    # an HF export inside each save (rank 0 builds a copy of the model: it must not draw from training's RNG)
    "lora_every_dropout": [*DROPOUT, "checkpoint.export_every_save=true"],
}
METRICS = ("loss", "grad_norm", "lr", "tokens")


def _metrics(result) -> list[tuple]:
    return [tuple(r[k] for k in ("step", *METRICS)) for r in result.records]


def _crash_and_resume(out: str, overrides: list[str]):
    os.makedirs(out)
    with crash_after(STEPS // 2), pytest.raises(SimulatedCrash):
        train(out, *RUN, *overrides)
    return train(out, *RUN, *overrides, "checkpoint.resume=auto")


@pytest.mark.parametrize("case", list(CASES))
def test_resume_with_dropout_is_bitwise_the_uninterrupted_run(tmp_path, monkeypatch, case):
    from automodel.checkpoint import dcp

    overrides = CASES[case]
    os.makedirs(tmp_path / "whole")
    whole = train(str(tmp_path / "whole"), *RUN, *overrides)
    resumed = _crash_and_resume(str(tmp_path / "resumed"), overrides)
    assert [r["step"] for r in resumed.records] == list(range(STEPS // 2 + 1, STEPS + 1))
    assert _metrics(resumed) == _metrics(whole)[STEPS // 2:]  # the same floats
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]

    # the same resume with the restart's RNG state (what a resume that forgot it would do) trains differently
    monkeypatch.setattr(dcp, "_load_rng", lambda folder, rank: None)
    os.makedirs(tmp_path / "forgot")
    forgot = train(str(tmp_path / "forgot"), *RUN, *overrides,
                   f"checkpoint.resume={tmp_path}/resumed/checkpoints/step_{STEPS // 2:08d}")
    assert [r["loss"] for r in forgot.records] != [r["loss"] for r in whole.records][STEPS // 2:]
