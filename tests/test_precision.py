"""precision=fp16: float16 compute with dynamic loss scaling. It trains like fp32; an overflowing step is skipped,
halves the scale and is not a "bad step" (the run goes on however many there are); the scale is part of every
checkpoint, so a resumed fp16 run ends bitwise where an uninterrupted one does."""

from __future__ import annotations

import pytest
from helpers import losses, train

from automodel import registry
from automodel.errors import UserError

COMMON = ["train.log_every=1", "train.global_batch_size=8", "train.micro_batch_size=8", "checkpoint.export_final=false"]


def test_fp16_trains_close_to_fp32_and_logs_its_loss_scale(tmp_path):
    fp32 = train(str(tmp_path), *COMMON, "train.max_steps=5")
    fp16 = train(str(tmp_path), *COMMON, "train.max_steps=5", "precision=fp16")
    assert max(abs(a - b) for a, b in zip(losses(fp32), losses(fp16))) < 0.05, (losses(fp32), losses(fp16))
    assert losses(fp32) != losses(fp16)  # fp16 really ran in lower precision
    assert [r["loss_scale"] for r in fp16.records] == [65536.0] * 5 and not any("skipped" in r for r in fp16.records)


def test_overflowing_steps_are_skipped_halve_the_scale_and_never_stop_the_run(tmp_path):
    """A scale of 2^40 overflows float16 (max 65504) at once: steps are skipped, each halving it, until the
    gradients fit; far more skips than train.max_bad_steps=3, and the run still finishes."""
    run = train(str(tmp_path), *COMMON, "train.max_steps=30", "precision=fp16", "precision.init_scale=1099511627776")
    skipped = [r for r in run.records if "skipped" in r]
    assert len(skipped) > 3 and all("fp16 gradient overflow" in r["skipped"] for r in skipped)
    scales = [r["loss_scale"] for r in run.records]
    for before, after, record in zip(scales, scales[1:], run.records[1:]):
        assert after == (before / 2 if "skipped" in record else before)
    first_applied = next(r for r in run.records if "skipped" not in r)
    assert first_applied["step"] == len(skipped) + 1  # the skips came first, in a row
    assert run.records[-1]["loss"] < first_applied["loss"]  # and then it trained


def test_a_resumed_fp16_run_ends_bitwise_like_an_uninterrupted_one(tmp_path):
    steps = [*COMMON, "precision=fp16", "precision.init_scale=16777216", "precision.growth_interval=2",
             "checkpoint.every_steps=4"]  # a scale that overflows first, then grows every 2 steps
    (tmp_path / "whole").mkdir()
    whole = train(str(tmp_path / "whole"), *steps, "train.max_steps=8")
    (tmp_path / "split").mkdir()
    train(str(tmp_path / "split"), *steps, "train.max_steps=4")
    resumed = train(str(tmp_path / "split"), *steps, "train.max_steps=8", "checkpoint.resume=auto")
    assert [r["loss_scale"] for r in resumed.records] == [r["loss_scale"] for r in whole.records[4:]]
    assert losses(resumed) == losses(whole)[4:]
    assert len({r["loss_scale"] for r in whole.records}) > 2  # the scale moved both ways across the checkpoint


@pytest.mark.parametrize("field,value,text", [("init_scale", 0.5, "precision.init_scale=0.5"),
                                              ("growth_interval", 0, "precision.growth_interval=0"),
                                              ("reduce_dtype", "float99", "precision.reduce_dtype='float99'")])
def test_bad_fp16_settings_are_refused_in_one_line(field, value, text):
    with pytest.raises(UserError, match=text.replace(".", r"\.").replace("[", r"\[")):
        registry.instantiate("precision", {"plugin": "fp16", field: value})
